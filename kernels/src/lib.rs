//! ferrinfer's CUDA kernel templates, and the code that assembles one NVRTC translation unit from a
//! template, a lowered variant and a [`KernelConfig`].
//!
//! The templates live in `cuda/<concept>/` and are compiled into this crate; `FERRINFER_KERNEL_DIR`
//! points at a checkout's `kernels/cuda` to read them from disk instead while developing.
//!
//! | module | what |
//! |---|---|
//! | [`config`] | [`KernelConfig`] and its parts: [`KernelKind`], [`DType`], [`ArchClass`], tiles |
//! | [`abi`] | the kernels' launch arguments, mirrored from `cuda/abi.cuh` |
//! | [`attention`] | the family table ([`attention::FAMILIES`]), one file per family, tile functions |
//! | [`ops`] | kernels beside attention (merge states, norms, activations, RoPE and KV append, sampling), one file per op; [`ops::OPS`] lists every instance |
//! | `tu` | assembling a translation unit: [`translation_unit`] |

pub mod abi;
pub mod attention;
pub mod config;
pub mod ops;
mod sources;
mod tu;
pub mod workspace;

pub use attention::merge::merge_launch_dims;
pub use attention::tiles::{SmResidency, TileInput, Tiles};
pub use attention::{FAMILIES, Family, launch_dims};
pub use config::{
    ArchClass, DType, HEAD_DIMS, InstanceTiles, KernelConfig, KernelKind, LaunchDims,
};
pub use ops::merge_states::{
    MERGE_STATES_VEC_WIDTHS, MergeStatesArgs, merge_states_launch_dims, merge_states_unit,
    merge_states_vec_width,
};
pub use sources::{HEADER_NAMES, KERNEL_DIR_VAR, header};
pub use tu::{TranslationUnit, VariantSource, translation_unit};
