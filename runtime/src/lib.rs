//! ferrinfer's runtime: the variant registry, the NVRTC JIT and its caches, the dispatcher that picks
//! a compiled kernel, the wrappers a serving engine calls, and the CPU reference backend.
//!
//! Most users depend on the facade crate `ferrinfer`, which re-exports this one.

pub mod backend;
pub mod batch;
pub mod cascade;
pub mod dispatch;
pub mod dtype;
pub mod error;
pub mod fast_math;
pub mod gpu;
pub mod hash;
pub mod jit;
pub mod params;
pub mod plan;
pub mod reference;
pub mod rng;
pub mod single;
pub mod variant;
pub mod wrappers;

pub use backend::{Backend, Buffer};
pub use batch::{Batch, Heads, KvIndex, KvLayout, indptr};
pub use cascade::{State, StateMut, StateShape, merge_state, merge_state_in_place, merge_states};
pub use dtype::Element;
pub use error::{Error, Result};
pub use fast_math::FastMath;
pub use ferrinfer_kernels::{DType, HEAD_DIMS, KernelConfig, KernelKind, wide_kv_tile};
pub use params::{Array, AttentionParams};
pub use variant::{Hooks, Pos, Variant, VariantSpec};
pub use wrappers::{BatchDecode, BatchPrefill, DecodeKernel, GraphCapacity, PlanConfig};

/// The names a variant definition and a typical caller need.
pub mod prelude {
    pub use crate::backend::{Backend, Buffer};
    pub use crate::batch::{Batch, Heads, KvIndex, KvLayout};
    pub use crate::fast_math::FastMath;
    pub use crate::params::Array;
    pub use crate::single::Single;
    pub use crate::variant::Pos;
    pub use crate::wrappers::{BatchDecode, BatchPrefill, DecodeKernel, GraphCapacity, PlanConfig};
    pub use half::{bf16, f16};
}
