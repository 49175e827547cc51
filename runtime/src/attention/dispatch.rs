//! The dispatcher: from (variant, kernel, head dim, dtype, arch) to a compiled, loaded kernel.
//! Unsupported combinations are refused here with a message that says what is supported.

use std::sync::Arc;

use ferrinfer_kernels::abi::AttnArgs;
use ferrinfer_kernels::{DType, HEAD_DIMS, KernelConfig, KernelKind, VariantSource};

use crate::attention::launch::{self, Kernel};
use crate::device::gpu::{Gpu, SmResources};
use crate::error::{Error, Result};
use crate::jit::{Arch, CompiledKernel, Jit};
use crate::variant::VariantSpec;
use crate::variant::params::cuda_struct;

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

/// Every kernel instance (short of the variant) the runtime may load on a device with SMs like
/// `sm`: each kind, query tile (prefill 16, 64, 128; decode none), head dim and dtype, plus the
/// wide-K/V-tile instances that device runs ([`wide_instance`]). For filling caches ahead of time
/// and for checking every instance compiles.
pub fn instances(sm: &SmResources) -> Vec<KernelConfig> {
    let mut out = Vec::new();
    for kind in KernelKind::ALL {
        let tiles: &[u32] = match kind {
            KernelKind::Prefill => &[16, 64, 128],
            KernelKind::Decode => &[0],
        };
        for head_dim in HEAD_DIMS {
            for dtype in DType::ALL {
                for &cta_tile_q in tiles {
                    let cfg = KernelConfig {
                        kind,
                        head_dim,
                        dtype,
                        cta_tile_q,
                        kv_tile: 0,
                    };
                    out.push(cfg);
                    out.extend(wide_instance(&cfg, sm));
                }
            }
        }
    }
    out
}

/// The wide-K/V-tile instance of `cfg` ([`ferrinfer_kernels::wide_kv_tile`]) that the runtime
/// tries first on SMs like `sm`: where the template offers one and two CTAs of it are resident
/// (with the most registers a variant may take; one CTA alone would hide no latency).
pub fn wide_instance(cfg: &KernelConfig, sm: &SmResources) -> Option<KernelConfig> {
    let wide = ferrinfer_kernels::wide_kv_tile(cfg)?;
    let dims = ferrinfer_kernels::launch_dims(&wide, &AttnArgs::default());
    (sm.resident_ctas(dims.block[0], dims.shared_bytes, 255) >= 2).then_some(wide)
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
/// the config's wide-K/V-tile instance ([`wide_instance`]) when the device runs one and the
/// variant's instance of it does not spill, else the config's own.
pub(crate) fn kernel(gpu: &Gpu, spec: &VariantSpec, cfg: &KernelConfig) -> Result<Kernel> {
    let arch = gpu.arch();
    check_supported(cfg, arch)?;
    let wide = wide_instance(cfg, &gpu.sm_resources());
    // Keyed by what was asked for: the spill test runs once per process.
    launch::load(gpu, &key(spec, cfg, arch), || {
        if let Some(w) = wide {
            let k = compile(spec, &w, arch)?;
            if k.stats.spill_stores == 0 && k.stats.spill_loads == 0 {
                return Ok((k, w));
            }
        }
        Ok((compile(spec, cfg, arch)?, *cfg))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instances_cover_every_tile_and_the_wide_ones_where_offered() {
        let hopper = instances(&SmResources::typical(Arch::new(9, 0)));
        let a100 = instances(&SmResources::typical(Arch::new(8, 0)));
        // Prefill 3 tiles x 3 head dims x 2 dtypes, decode 3 x 2, and on Hopper the 64-key
        // instances of the 128-row tile at head dim 128 (both dtypes).
        assert_eq!(a100.len(), 18 + 6);
        assert_eq!(hopper.len(), 18 + 6 + 2);
        assert!(
            hopper
                .iter()
                .filter(|c| c.kv_tile == 64)
                .all(|c| c.head_dim == 128)
        );
        let mut names: Vec<String> = hopper.iter().map(|c| c.name()).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), hopper.len(), "every instance has its own name");
        // Two CTAs of the 64-key instance (99.9 KB of shared memory each) fit a Hopper SM; an
        // A100 (164 KiB an SM) would hold one, so it keeps 32 keys.
        let cfg = KernelConfig {
            kind: KernelKind::Prefill,
            head_dim: 128,
            dtype: DType::Bf16,
            cta_tile_q: 128,
            kv_tile: 0,
        };
        let on = |arch| wide_instance(&cfg, &SmResources::typical(arch));
        assert_eq!(on(Arch::new(9, 0)).map(|w| w.kv_tile), Some(64));
        assert_eq!(on(Arch::new(8, 0)), None);
    }
}
