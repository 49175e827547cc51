//! Assembling one translation unit (stub: filled in by the kernel work).

use crate::abi::AttnArgs;
use crate::{KernelConfig, LaunchDims};

/// The lowered variant, as the runtime hands it over.
pub struct VariantSource<'a> {
    /// Variant name, for comments and the program name.
    pub name: &'a str,
    /// `struct Params { ... };` (from `ferrinfer_runtime::params::cuda_struct`).
    pub params_struct: &'a str,
    /// `struct Variant { ... };` (from `VariantSpec::cuda`).
    pub cuda: &'a str,
}

/// A self-contained CUDA source (every header inlined) and the name of its `extern "C"` entry.
pub struct TranslationUnit {
    pub name: String,
    pub source: String,
    pub entry: String,
}

pub fn translation_unit(cfg: &KernelConfig, variant: &VariantSource<'_>) -> Result<TranslationUnit, String> {
    let _ = (cfg, variant);
    Err("not implemented".into())
}

pub(crate) fn launch_dims(cfg: &KernelConfig, args: &AttnArgs) -> LaunchDims {
    let _ = (cfg, args);
    LaunchDims { grid: [1, 1, 1], block: [128, 1, 1], shared_bytes: 0 }
}
