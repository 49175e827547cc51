//! The dispatcher: from (variant, kernel family, head dims, dtypes, arch, tiles) to a compiled,
//! loaded kernel. Unsupported combinations are refused here with a message that says what is
//! supported.

use std::sync::Arc;

use ferrinfer_kernels::attention::prefill::{
    Sm90Loop, is_sm90_long, sm90_form, sm90_in_order, sm90_overlaps,
};
use ferrinfer_kernels::{ArchClass, DType, HEAD_DIMS, KernelConfig, KernelKind, VariantSource};

use crate::attention::launch::{self, Kernel};
use crate::attention::tma;
use crate::device::gpu::{Gpu, SmResources};
use crate::error::{Error, Result};
use crate::jit::{Arch, CompiledKernel, Jit, KernelStats};
use crate::variant::VariantSpec;
use crate::variant::params::cuda_struct;

/// The class of kernels a device of `arch` runs (sm_90 gets sm90a instances, every other arch from
/// sm_80 on the sm80 ones); an error below sm_80.
pub fn arch_class(arch: Arch) -> Result<ArchClass> {
    ArchClass::of(arch.major, arch.minor).ok_or_else(|| {
        Error::unsupported(format!(
            "this GPU is {}; ferrinfer's kernels need sm_80 (Ampere) or newer",
            arch.sm_name()
        ))
    })
}

/// The instance of family `kind` for `head_dim` and `dtype` on a device of `arch`, with the
/// family's default tiles (a plan's [`ferrinfer_kernels::Tiles::config`] sets them).
pub fn config(arch: Arch, kind: KernelKind, head_dim: u32, dtype: DType) -> Result<KernelConfig> {
    Ok(KernelConfig::new(kind, head_dim, dtype, arch_class(arch)?))
}

/// Refuse what no kernel implements, before anything is compiled.
pub fn check_supported(cfg: &KernelConfig, arch: Arch) -> Result<()> {
    if !HEAD_DIMS.contains(&cfg.head_dim_qk) {
        return Err(Error::unsupported(format!(
            "head_dim {} (kernels exist for head dims {HEAD_DIMS:?})",
            cfg.head_dim_qk
        )));
    }
    arch_class(arch)?;
    if !cfg.arch.runs_on(arch.major, arch.minor) {
        return Err(Error::unsupported(format!(
            "{} is built for {} devices; this one is {}",
            cfg.name(),
            cfg.arch.name(),
            arch.sm_name()
        )));
    }
    cfg.kind
        .family()
        .check(cfg)
        .map_err(|e| Error::unsupported(format!("{}: {e}", cfg.name())))
}

/// Every kernel instance (short of the variant) the runtime may load on a device of `arch` with
/// SMs like `sm`: each family's instances (prefill: query tiles 16, 64, 128, the wide K/V tile
/// and the two-warp 16-row tile where its tile function may choose them; decode: one), for every
/// head dim and dtype, of the device's arch class. For filling caches ahead of time and for
/// checking every instance compiles. None below sm_80.
pub fn instances(arch: Arch, sm: &SmResources) -> Vec<KernelConfig> {
    let Ok(class) = arch_class(arch) else {
        return Vec::new();
    };
    ferrinfer_kernels::FAMILIES
        .iter()
        .flat_map(|f| (f.instances)(class, sm))
        .collect()
}

/// [`instances`] that `spec` can run (see [`supports`]).
pub fn instances_for(spec: &VariantSpec, arch: Arch, sm: &SmResources) -> Vec<KernelConfig> {
    instances(arch, sm)
        .into_iter()
        .filter(|cfg| supports(spec, cfg).is_ok())
        .collect()
}

/// Whether instance `cfg` can run variant `spec`: every instance runs every hook, but the sm_90a
/// template's long prompts' tile (176 keys) takes no key hook. A key hook keeps FA3's loop in
/// order (both consumers rewrite each K tile before either's S), and in order the wider tile
/// gains nothing over the 128-key one, which runs such variants.
pub fn supports(spec: &VariantSpec, cfg: &KernelConfig) -> Result<()> {
    if spec.hooks.key && is_sm90_long(cfg) {
        return Err(Error::unsupported(format!(
            "{} (the sm_90a prefill template's long prompts' tile) does not run key hooks, which \
             variant {} has; its 128-key tile does",
            cfg.name(),
            spec.name
        )));
    }
    Ok(())
}

/// The dispatch key of an instance: variant (name and hash of its lowered CUDA), kernel, the FA3
/// consumers' loop where it is not the default (both builds may be loaded at once), arch.
pub fn key(spec: &VariantSpec, cfg: &KernelConfig, lp: Sm90Loop, arch: Arch) -> String {
    let lp = match variant_loop(spec, cfg, lp) {
        Sm90Loop::Default => "",
        Sm90Loop::InOrder => "/in-order",
    };
    format!(
        "{}#{:016x}/{}{lp}/{}",
        spec.qualified_name(),
        spec.cuda_hash(),
        cfg.name(),
        arch.sm_name()
    )
}

/// `lp` where it changes `cfg`'s build: an FA3 instance at a head dim whose default overlaps.
fn loop_of(cfg: &KernelConfig, lp: Sm90Loop) -> Sm90Loop {
    let fa3 = sm90_form(cfg) == Some(*cfg);
    if fa3 && sm90_overlaps(cfg.head_dim_qk) {
        lp
    } else {
        Sm90Loop::Default
    }
}

/// [`loop_of`] for variant `spec`: one with a key hook runs FA3's consumers in order in its
/// default build already (the kernel's `kSm90Overlap`), so it has that build alone, one key and
/// one compile for both loops.
fn variant_loop(spec: &VariantSpec, cfg: &KernelConfig, lp: Sm90Loop) -> Sm90Loop {
    if spec.hooks.key {
        Sm90Loop::Default
    } else {
        loop_of(cfg, lp)
    }
}

/// The consumers' loops the runtime may launch `cfg` with, under this process's
/// `FERRINFER_SM90_OVERLAP`: for an FA3 instance, the default and the one for a launch without
/// TMA maps (in order at head dim 128), or what the variable forces; one build otherwise.
/// [`crate::precompile()`] builds each, so a process that forces a loop precompiles that one too
/// (with `FERRINFER_NO_JIT` it could not compile it later).
pub fn loops(cfg: &KernelConfig) -> Vec<Sm90Loop> {
    loops_with(cfg, tma::forced_overlap_setting())
}

/// A build's name: the instance's ([`KernelConfig::name`]), with `/in-order` for an FA3 build of
/// the in-order loop. What [`crate::CheckReport`] lists for each of [`loops`]' builds.
///
/// ```
/// use ferrinfer_runtime::attention::dispatch::build_name;
/// use ferrinfer_runtime::{ArchClass, DType, KernelConfig, KernelKind, Sm90Loop};
///
/// let cfg = KernelConfig::new(KernelKind::Prefill, 128, DType::Bf16, ArchClass::Sm90a);
/// assert_eq!(build_name(&cfg, Sm90Loop::Default), cfg.name());
/// assert_eq!(build_name(&cfg, Sm90Loop::InOrder), format!("{}/in-order", cfg.name()));
/// ```
pub fn build_name(cfg: &KernelConfig, lp: Sm90Loop) -> String {
    match lp {
        Sm90Loop::Default => cfg.name(),
        Sm90Loop::InOrder => format!("{}/in-order", cfg.name()),
    }
}

/// [`loops`] given `FERRINFER_SM90_OVERLAP`'s value (`Some(overlap)`). The long prompts' FA3
/// tile runs only over TMA tiles, in the default loop (the runtime takes the 128-key tile where
/// its overlap spills), so it has that build alone.
fn loops_with(cfg: &KernelConfig, forced: Option<bool>) -> Vec<Sm90Loop> {
    let mut loops = vec![Sm90Loop::Default];
    if sm90_form(cfg) == Some(*cfg) && !is_sm90_long(cfg) {
        for tma_tiles in [true, false] {
            let lp = loop_of(cfg, tma::choose_loop(cfg.head_dim_qk, tma_tiles, forced));
            if !loops.contains(&lp) {
                loops.push(lp);
            }
        }
    }
    loops
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
    compile_loop_with(jit, spec, cfg, Sm90Loop::Default, arch)
}

/// [`compile_with`] with the FA3 consumers' loop `lp` (see [`loops`]; other instances have one
/// build and ignore it).
pub fn compile_loop_with(
    jit: &Jit,
    spec: &VariantSpec,
    cfg: &KernelConfig,
    lp: Sm90Loop,
    arch: Arch,
) -> Result<Arc<CompiledKernel>> {
    build_loop_with(jit, spec, cfg, lp, arch).map(|b| b.kernel)
}

/// What [`build_loop_with`] built: the kernel, and whether it is the in-order form of an FA3
/// build that was asked to overlap.
#[derive(Clone, Debug)]
pub struct Build {
    /// The kernel the runtime launches for this build.
    pub kernel: Arc<CompiledKernel>,
    /// ptxas' numbers for the overlapping form when it spilled, so `kernel` is the in-order
    /// build (measured 8-13% slower on long prompts: kernels/notes/fa3.md), or for the long
    /// prompts' tile the spilling build itself, which the runtime does not run; `None`
    /// otherwise.
    pub overlap_spilled: Option<KernelStats>,
}

/// What happened to an FA3 build of `cfg` whose overlapping form spilled (`spilled`, its numbers):
/// the line the check report and kernel_report print beside it.
pub fn overlap_spill_note(cfg: &KernelConfig, spilled: &KernelStats) -> String {
    if is_sm90_long(cfg) {
        "the 128-key FA3 tile runs instead".into()
    } else {
        format!(
            "in order: the overlapping loop spilled {} B stores, {} B loads",
            spilled.spill_stores, spilled.spill_loads
        )
    }
}

/// [`compile_loop_with`], saying whether an overlapping FA3 build fell back to the in-order
/// loop (a variant author's check should show it: its kernel then has no spills, but is slower).
pub fn build_loop_with(
    jit: &Jit,
    spec: &VariantSpec,
    cfg: &KernelConfig,
    lp: Sm90Loop,
    arch: Arch,
) -> Result<Build> {
    check_supported(cfg, arch)?;
    supports(spec, cfg)?;
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
    if variant_loop(spec, cfg, lp) == Sm90Loop::InOrder {
        let kernel = jit.compile(&sm90_in_order(&tu), arch)?;
        return Ok(Build {
            kernel,
            overlap_spilled: None,
        });
    }
    let k = jit.compile(&tu, arch)?;
    // An FA3 build that spills with the consumers' overlap is rebuilt with them in order (heavy
    // hooks fit then); [`kernel`] falls back to FA2 if that one spills too. Not the long
    // prompts' tile: in order it would lose what the wider tile gains, so [`kernel`] takes the
    // 128-key tile instead, and this build stays the spilling one.
    if spills(&k) && sm90_form(cfg) == Some(*cfg) {
        let kernel = if is_sm90_long(cfg) {
            k.clone()
        } else {
            jit.compile(&sm90_in_order(&tu), arch)?
        };
        return Ok(Build {
            kernel,
            overlap_spilled: Some(k.stats),
        });
    }
    Ok(Build {
        kernel: k,
        overlap_spilled: None,
    })
}

fn spills(k: &CompiledKernel) -> bool {
    k.stats.spill_stores > 0 || k.stats.spill_loads > 0
}

/// The loaded kernel and its merge pass for this variant, config and FA3 loop, or for the first
/// of `fallbacks` whose build spills no registers where the ones before do (the long prompts'
/// FA3 tile counts as spilling when its overlap does: [`build_loop_with`]). The last candidate is
/// taken as it is. `cfg.arch` must be the device's class (see [`config`]).
pub(crate) fn kernel(
    gpu: &Gpu,
    spec: &VariantSpec,
    cfg: &KernelConfig,
    lp: Sm90Loop,
    fallbacks: &[KernelConfig],
) -> Result<Kernel> {
    let arch = gpu.arch();
    check_supported(cfg, arch)?;
    // Keyed by what was asked for: the spill test runs once per process.
    launch::load(gpu, &key(spec, cfg, lp, arch), || {
        let mut candidates = std::iter::once(cfg).chain(fallbacks).peekable();
        loop {
            let c = candidates.next().expect("cfg is the first candidate");
            let b = build_loop_with(Jit::global(), spec, c, lp, arch)?;
            if candidates.peek().is_none() || !spills(&b.kernel) {
                return Ok((b.kernel, *c));
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instances_cover_every_tile_and_the_wide_ones_where_offered() {
        let hopper = instances(Arch::new(9, 0), &SmResources::typical(Arch::new(9, 0)));
        let a100 = instances(Arch::new(8, 0), &SmResources::typical(Arch::new(8, 0)));
        // Prefill 3 tiles x 3 head dims x 2 dtypes, decode 3 x 2, the two-warp 16-row tile where
        // an SM holds as many warps of it (A100: every head dim; Hopper: 64 and 128), the narrow
        // 16-row tile at head dim 128 (both dtypes), and on Hopper the 64-key instances of the
        // 128-row tile at head dim 128 (both dtypes) and the FA3 form of the 128-row tile at each
        // head dim (both dtypes), with the long prompts' one at head dim 128.
        assert_eq!(a100.len(), 18 + 6 + 6 + 2);
        assert_eq!(hopper.len(), 18 + 6 + 4 + 2 + 2 + 3 * 2 + 2);
        assert!(
            hopper
                .iter()
                .filter(|c| c.kv_warps == 2)
                .all(|c| c.cta_tile_q == 16)
        );
        let fa3 =
            |c: &&KernelConfig| ferrinfer_kernels::attention::prefill::sm90_form(c) == Some(**c);
        assert_eq!(hopper.iter().filter(fa3).count(), 8);
        assert!(a100.iter().filter(fa3).count() == 0);
        assert!(
            hopper
                .iter()
                .filter(|c| c.kv_tile >= 64 && !fa3(c))
                .all(|c| c.head_dim_qk == 128)
        );
        let mut names: Vec<String> = hopper.iter().map(|c| c.name()).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), hopper.len(), "every instance has its own name");
        // Each device gets the instances of its class.
        assert!(hopper.iter().all(|c| c.arch == ArchClass::Sm90a));
        assert!(a100.iter().all(|c| c.arch == ArchClass::Sm80));
        for c in hopper.iter() {
            check_supported(c, Arch::new(9, 0)).unwrap();
            assert!(check_supported(c, Arch::new(8, 0)).is_err(), "{}", c.name());
        }
        // Two CTAs of the 64-key instance (99.9 KB of shared memory each) fit a Hopper SM; an
        // A100 (164 KiB an SM) would hold one, so it keeps 32 keys.
        let on = |arch| {
            let sm = SmResources::typical(arch);
            let tiles = (KernelKind::Prefill.family().tiles)(&ferrinfer_kernels::TileInput {
                packed_rows: 8192 * 4,
                requests: 1,
                group_size: 4,
                page_size: None,
                head_dim_qk: 128,
                head_dim_vo: 128,
                sm: Some(&sm),
                num_sms: 132,
                work_items: &|_| 1,
                batch_invariant: false,
                one_row_per_request: false,
                query_tile: Some(128),
                kv_warps: None,
            });
            tiles.fallback.map(|_| tiles.instance.kv_tile)
        };
        assert_eq!(on(Arch::new(9, 0)), Some(64));
        assert_eq!(on(Arch::new(8, 0)), None);
    }

    #[test]
    fn the_in_order_fa3_build_has_its_own_key_at_head_dim_128() {
        let spec = VariantSpec {
            name: "Plain",
            module_path: "tests",
            hooks: crate::variant::Hooks::default(),
            softmax: true,
            params: &[],
            cuda: "",
        };
        let hopper = Arch::new(9, 0);
        let fa3 = |hd| {
            let cfg = config(hopper, KernelKind::Prefill, hd, DType::Bf16).unwrap();
            let tiles = ferrinfer_kernels::InstanceTiles {
                cta_tile_q: 128,
                ..Default::default()
            };
            sm90_form(&cfg.with_tiles(tiles)).unwrap()
        };
        let key_of = |cfg: &KernelConfig, lp| key(&spec, cfg, lp, hopper);
        // Head dim 128: both builds, each under its own key, so both can be loaded at once.
        let c128 = fa3(128);
        assert_eq!(
            loops_with(&c128, None),
            [Sm90Loop::Default, Sm90Loop::InOrder]
        );
        assert_ne!(
            key_of(&c128, Sm90Loop::InOrder),
            key_of(&c128, Sm90Loop::Default)
        );
        assert!(key_of(&c128, Sm90Loop::InOrder).contains("/in-order"));
        // Head dim 64 keeps the overlap; 256 and FA2 have one build, whatever is asked.
        assert_eq!(loops_with(&fa3(64), None), [Sm90Loop::Default]);
        // Forced in order: head dim 64 gets its in-order build too; forced overlap: the default.
        assert_eq!(
            loops_with(&fa3(64), Some(false)),
            [Sm90Loop::Default, Sm90Loop::InOrder]
        );
        assert_eq!(loops_with(&c128, Some(true)), [Sm90Loop::Default]);
        // The long prompts' tile runs over TMA tiles in the default loop only.
        let long = ferrinfer_kernels::attention::prefill::sm90_long_form(&c128).unwrap();
        for forced in [None, Some(false), Some(true)] {
            assert_eq!(loops_with(&long, forced), [Sm90Loop::Default]);
        }
        let fa2 = config(hopper, KernelKind::Prefill, 128, DType::Bf16).unwrap();
        for one in [fa3(256), fa2] {
            assert_eq!(loops_with(&one, Some(false)), [Sm90Loop::Default]);
            assert_eq!(loops_with(&one, None), [Sm90Loop::Default]);
            assert_eq!(
                key_of(&one, Sm90Loop::InOrder),
                key_of(&one, Sm90Loop::Default)
            );
        }
        // A key hook keeps the default build in order: one build, one key for both loops.
        let keyed = VariantSpec {
            hooks: crate::variant::Hooks {
                key: true,
                ..Default::default()
            },
            ..spec
        };
        assert_eq!(
            key(&keyed, &c128, Sm90Loop::InOrder, hopper),
            key(&keyed, &c128, Sm90Loop::Default, hopper)
        );
    }

    #[test]
    fn unbuilt_shapes_are_refused_before_compiling() {
        let cfg = config(Arch::new(8, 0), KernelKind::Decode, 128, DType::Bf16).unwrap();
        check_supported(&cfg, Arch::new(8, 0)).unwrap();
        let mla = cfg.with_head_dims(576, 512);
        let e = check_supported(&mla, Arch::new(8, 0))
            .unwrap_err()
            .to_string();
        assert!(e.contains("576"), "{e}");
        let e = check_supported(&cfg.with_head_dims(128, 64), Arch::new(8, 0))
            .unwrap_err()
            .to_string();
        assert!(e.contains("128 and 64"), "{e}");
        let fp8ish = cfg.with_kv_dtype(DType::F16);
        let e = check_supported(&fp8ish, Arch::new(8, 0))
            .unwrap_err()
            .to_string();
        assert!(e.contains("KV cache"), "{e}");
        let e = config(Arch::new(7, 5), KernelKind::Decode, 128, DType::Bf16).unwrap_err();
        assert!(e.to_string().contains("sm_80"), "{e}");
    }
}
