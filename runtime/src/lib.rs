//! ferrinfer's runtime: the variant registry, the NVRTC JIT and its caches, the dispatcher that picks
//! a compiled kernel, the wrappers a serving engine calls, and the CPU reference backend.
//!
//! Most users depend on the facade crate `ferrinfer`, which re-exports this one.
//!
//! | module | what |
//! |---|---|
//! | [`device`] | `Gpu` (context, stream, launches), `Backend`, `Buffer`, element types, `Arch`, CUDA discovery |
//! | [`jit`] | NVRTC, the memory and disk caches |
//! | [`variant`] | `Variant`, its parameters, the registry, `FastMath`, `check_variant` |
//! | [`attention`] | `Batch`/`KvIndex`, plan, dispatch, the plan/run wrappers, single-request calls, the CPU reference |
//! | [`distributed`] | context parallelism: KV sharding, the cross-rank merge, NCCL communicators and the context-parallel decode (feature `nccl`) |
//! | [`ops`] | the serving ops beside attention (norms, activations, RoPE, KV append, sampling, cascade merging), one file per op |

pub mod attention;
pub mod device;
pub mod distributed;
pub mod error;
pub mod jit;
pub mod ops;
mod parallel;
pub mod variant;

pub use attention::batch::{Batch, Heads, KvIndex, KvLayout, indptr};
pub use attention::wrappers::{
    BatchDecode, BatchPrefill, DecodeKernel, GraphCapacity, GraphRun, Input, KvTile, KvWarps,
    PlanConfig, PrefillKernel, RunBuffers,
};
/// The cudarc ferrinfer is built on, for [`Backend::on_stream`] and [`device::Gpu::on_stream`]: a
/// caller's stream must be a `CudaStream` of this very version.
///
/// ```no_run
/// use ferrinfer_runtime::cudarc::driver::CudaContext;
/// let stream = CudaContext::new(0).unwrap().new_stream().unwrap();
/// let backend = ferrinfer_runtime::Backend::on_stream(stream).unwrap();
/// ```
pub use cudarc;
pub use device::{Backend, Buffer, Dst, Element, Src, View, ViewMut};
pub use error::{Error, Result};
pub use ferrinfer_kernels::attention::prefill::Sm90Loop;
pub use ferrinfer_kernels::{ArchClass, DType, HEAD_DIMS, KernelConfig, KernelKind, Tiles};
pub use jit::{Arch, Precompile, PrecompileReport, precompile};
pub use ops::cascade::{
    State, StateMut, StateShape, merge_state, merge_state_in_place, merge_states,
};
pub use variant::check::{CheckReport, CheckedInstance, check_variant, check_variant_with};
pub use variant::fast_math::FastMath;
pub use variant::params::{Array, AttentionParams};
pub use variant::{Hooks, Pos, Variant, VariantSpec};

/// The names a variant definition and a typical caller need.
pub mod prelude {
    pub use crate::attention::batch::{Batch, Heads, KvIndex, KvLayout};
    pub use crate::attention::single::Single;
    pub use crate::attention::wrappers::{
        BatchDecode, BatchPrefill, DecodeKernel, GraphCapacity, GraphRun, Input, KvTile, KvWarps,
        PlanConfig, PrefillKernel, RunBuffers,
    };
    pub use crate::device::{Backend, Buffer, Dst, Src, View, ViewMut};
    pub use crate::variant::Pos;
    pub use crate::variant::fast_math::FastMath;
    pub use crate::variant::params::Array;
    pub use half::{bf16, f16};
}
