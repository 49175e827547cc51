//! The dispatcher: from (variant, kernel, head dim, dtype, arch) to a compiled, loaded kernel.
//! Unsupported combinations are refused here with a message that says what is supported.

use std::sync::Arc;

use ferrinfer_kernels::{HEAD_DIMS, KernelConfig, VariantSource};

use crate::error::{Error, Result};
use crate::gpu::{Gpu, Kernel};
use crate::jit::{Arch, CompiledKernel, Jit};
use crate::params::cuda_struct;
use crate::variant::VariantSpec;

/// Refuse what no kernel implements, before anything is compiled.
pub fn check_supported(cfg: &KernelConfig, arch: Arch) -> Result<()> {
    if !HEAD_DIMS.contains(&cfg.head_dim) {
        return Err(Error::unsupported(format!(
            "head_dim {} (kernels exist for head dims {HEAD_DIMS:?})",
            cfg.head_dim
        )));
    }
    if arch.major < 8 {
        return Err(Error::unsupported(format!(
            "this GPU is {}; ferrinfer's kernels need sm_80 (Ampere) or newer",
            arch.sm_name()
        )));
    }
    Ok(())
}

/// The dispatch key of an instance: variant (name and hash of its lowered CUDA), kernel, arch.
pub fn key(spec: &VariantSpec, cfg: &KernelConfig, arch: Arch) -> String {
    format!(
        "{}#{:016x}/{}/{}",
        spec.qualified_name(),
        spec.cuda_hash(),
        cfg.name(),
        arch.sm_name()
    )
}

/// Compile (or fetch from the global caches) one kernel instance. Needs NVRTC but no GPU.
pub fn compile(spec: &VariantSpec, cfg: &KernelConfig, arch: Arch) -> Result<Arc<CompiledKernel>> {
    compile_with(Jit::global(), spec, cfg, arch)
}

/// [`compile`] with a given JIT (its own caches and options).
pub fn compile_with(
    jit: &Jit,
    spec: &VariantSpec,
    cfg: &KernelConfig,
    arch: Arch,
) -> Result<Arc<CompiledKernel>> {
    check_supported(cfg, arch)?;
    let params = cuda_struct(spec.params);
    let tu = ferrinfer_kernels::translation_unit(
        cfg,
        &VariantSource {
            name: spec.name,
            params_struct: &params,
            cuda: spec.cuda,
        },
    )
    .map_err(|e| Error::unsupported(format!("{} for {}: {e}", cfg.name(), spec.name)))?;
    jit.compile(&tu, arch)
}

/// The loaded kernel (and its merge pass, for work-list kernels) for this variant and config:
/// the config's wide-K/V-tile instance ([`ferrinfer_kernels::wide_kv_tile`]) when the device
/// offers one and the variant's instance of it does not spill, else the config's own.
pub(crate) fn kernel(gpu: &Gpu, spec: &VariantSpec, cfg: &KernelConfig) -> Result<Kernel> {
    let arch = gpu.arch();
    check_supported(cfg, arch)?;
    let wide = ferrinfer_kernels::wide_kv_tile(cfg, gpu.sm_resources().shared_bytes);
    // Keyed by what was asked for: the spill test runs once per process.
    gpu.kernel(&key(spec, cfg, arch), || {
        if let Some(w) = wide {
            let k = compile(spec, &w, arch)?;
            if k.stats.spill_stores == 0 && k.stats.spill_loads == 0 {
                return Ok((k, Some(w)));
            }
        }
        Ok((compile(spec, cfg, arch)?, Some(*cfg)))
    })
}
