//! ferrinfer's runtime: the variant registry, the NVRTC JIT and its caches, the dispatcher that picks
//! a compiled kernel, the wrappers a serving engine calls, and the CPU reference backend.
//!
//! Most users depend on the facade crate `ferrinfer`, which re-exports this one.

pub mod batch;
pub mod dtype;
pub mod error;
pub mod gpu;
pub mod hash;
pub mod jit;
pub mod params;
pub mod reference;
pub mod variant;

pub use batch::{Batch, Heads, KvIndex, KvLayout};
pub use dtype::Element;
pub use error::{Error, Result};
pub use ferrinfer_kernels::{DType, KernelConfig, KernelKind, HEAD_DIMS};
pub use params::{Array, AttentionParams};
pub use variant::{Hooks, Pos, Variant, VariantSpec};

/// The names a variant definition and a typical caller need.
pub mod prelude {
    pub use crate::batch::{Batch, Heads, KvIndex, KvLayout};
    pub use crate::params::Array;
    pub use crate::variant::Pos;
    pub use half::{bf16, f16};
}
