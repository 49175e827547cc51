//! `check_variant` compiles a variant with NVRTC into every kernel instance the runtime may load,
//! for sm_80 and sm_90a, without a GPU: a built-in variant and one of another crate (this test is
//! one) compile everywhere, and a variant whose CUDA only NVRTC refuses is reported with its name
//! and every failing instance. Needs NVRTC (`CUDA_HOME`); without it these tests fail, never skip.

use std::collections::BTreeSet;

use ferrinfer::Sm90Loop;
use ferrinfer::attention::dispatch;
use ferrinfer::device::SmResources;
use ferrinfer::jit::{Arch, Jit, JitConfig, Origin};
use ferrinfer::prelude::*;
use ferrinfer::variant::params::{ParamField, ParamType, ParamWriter};
use ferrinfer::variants::SoftCap;
use ferrinfer::{CheckReport, DType, Error, Hooks, KernelConfig, KernelKind, Variant, VariantSpec};

/// A variant outside the `ferrinfer` crate: a sliding window with a per-head bias, an ALiBi-like
/// slope and a switch, so that the parameter struct has every kind of field.
#[derive(AttentionParams)]
pub struct BiasedWindow {
    pub slope: f32,
    pub window: u32,
    pub biased: bool,
    #[cover(qo_heads)]
    pub bias: Array<f32>,
}

#[attention_variant]
impl BiasedWindow {
    fn logits(&self, s: f32, at: Pos) -> f32 {
        let distance = at.qo_pos as i32 + at.kv_len as i32 - at.qo_len as i32 - at.kv_pos as i32;
        let s = s - self.slope * distance as f32;
        if self.biased {
            s + self.bias[at.qo_head]
        } else {
            s
        }
    }

    fn mask(&self, at: Pos) -> bool {
        let q_abs = at.qo_pos as i32 + at.kv_len as i32 - at.qo_len as i32;
        let kv_pos = at.kv_pos as i32;
        kv_pos > q_abs || q_abs - kv_pos < self.window as i32
    }
}

/// Every (build name, arch) the runtime may load: each instance in each FA3 consumer loop it may
/// be launched with (`dispatch::loops`), what a check must cover (the variants here have no key
/// hook, which the long prompts' FA3 tile refuses, so every instance is theirs).
fn every_build() -> BTreeSet<(String, Arch)> {
    [Arch::SM80, Arch::SM90]
        .into_iter()
        .flat_map(|arch| {
            dispatch::instances(arch, &SmResources::typical(arch))
                .into_iter()
                .flat_map(move |cfg| {
                    dispatch::loops(&cfg)
                        .into_iter()
                        .map(move |lp| (dispatch::build_name(&cfg, lp), arch))
                })
        })
        .collect()
}

/// A JIT with no disk cache, so that every instance really goes through NVRTC.
fn memory_only() -> Jit {
    Jit::new(JitConfig {
        cache_dir: None,
        ..JitConfig::default()
    })
}

/// `all_compiled`: every build went through NVRTC, none reused another's compile (a variant whose
/// overlapping FA3 builds do not spill, so each loop is a build of its own).
fn assert_covers_every_instance(report: &CheckReport, variant: &str, all_compiled: bool) {
    println!("{report}");
    assert_eq!(report.variant, variant);
    let checked: BTreeSet<_> = report
        .instances
        .iter()
        .map(|i| (i.name(), i.arch))
        .collect();
    assert_eq!(checked.len(), report.instances.len(), "a build twice");
    // Head dim 128's FA3 instances are also built in order (every_build follows
    // FERRINFER_SM90_OVERLAP, as the runtime does).
    assert_eq!(checked, every_build());
    for i in &report.instances {
        assert!(i.stats.registers > 0, "no ptxas report for {i}");
        if all_compiled {
            assert_eq!(i.origin, Origin::Compiled, "{i}");
        } else {
            // Every instance went through NVRTC; its two FA3 builds may share one compile where
            // the overlapping build spills (the default loop is then rebuilt in order).
            let compiled = report
                .instances
                .iter()
                .any(|j| j.config == i.config && j.arch == i.arch && j.origin == Origin::Compiled);
            assert!(compiled, "{i}");
        }
    }
    let summary = format!(
        "variant {variant}: all {} kernel builds compile",
        every_build().len()
    );
    assert!(report.to_string().starts_with(&summary), "{report}");
}

#[test]
fn a_builtin_variant_compiles_for_every_instance() {
    let jit = memory_only();
    let report = ferrinfer::check_variant_with::<SoftCap>(&jit).unwrap_or_else(|e| panic!("{e}"));
    // SoftCap's FA3 builds are spill-free in both loops (the_fa3_instances_keep_their_registers).
    assert_covers_every_instance(&report, "ferrinfer::variants::soft_cap::SoftCap", true);
    // A second check is served by the JIT's memory cache.
    let again = ferrinfer::check_variant_with::<SoftCap>(&jit).unwrap_or_else(|e| panic!("{e}"));
    assert!(again.instances.iter().all(|i| i.origin == Origin::Memory));
}

#[test]
fn a_variant_of_another_crate_compiles_for_every_instance() {
    let report = ferrinfer::check_variant_with::<BiasedWindow>(&memory_only())
        .unwrap_or_else(|e| panic!("{e}"));
    // Its overlapping head-dim-128 build spills, so the default loop is the in-order build.
    assert_covers_every_instance(&report, "check_variant::BiasedWindow", false);
}

/// A variant made by hand, as the macro would emit it, whose logits hook reads a field `Pos` does
/// not have, on sm_90a only: C++ that only NVRTC sees, and fails on one arch class.
struct BrokenOnHopper {
    scale: f32,
}

impl AttentionParams for BrokenOnHopper {
    const FIELDS: &'static [ParamField] = &[ParamField::new("scale", ParamType::F32)];
    fn pack(&self, w: &mut ParamWriter<'_>) {
        w.f32(self.scale);
    }
}

impl Variant for BrokenOnHopper {
    const SPEC: &'static VariantSpec = &VariantSpec {
        name: "BrokenOnHopper",
        module_path: module_path!(),
        hooks: Hooks {
            logits: true,
            query: false,
            key: false,
            mask: false,
            output: false,
            sink: false,
        },
        softmax: true,
        params: Self::FIELDS,
        cuda: r#"// BrokenOnHopper: written by hand
struct Variant {
  static constexpr bool kSoftmax = true;
  static constexpr bool kHasQuery = false;
  static constexpr bool kHasKey = false;
  static constexpr bool kHasLogits = true;
  static constexpr bool kHasMask = false;
  static constexpr bool kHasOutput = false;
  static constexpr bool kHasSink = false;
  __device__ __forceinline__ static float logits(const Params& self, float s, const fi::Pos& at) {
#if __CUDA_ARCH__ >= 900
    return s * self.scale + at.no_such_field;
#else
    return s * self.scale;
#endif
  }
};
"#,
    };
}

#[test]
fn a_variant_nvrtc_refuses_is_reported_with_every_failing_instance() {
    // The CPU side is fine: only the CUDA is broken.
    let v = BrokenOnHopper { scale: 2.0 };
    assert_eq!(Variant::logits(&v, 1.5, Pos::default()), 1.5);

    // Through the process-wide JIT, as a user's CI calls it (a failed compile stores nothing).
    let e = ferrinfer::check_variant::<BrokenOnHopper>().unwrap_err();
    let text = e.to_string();
    println!("{text}");
    let Error::Compile { kernel, log } = &e else {
        panic!("expected a compile error, got {e}")
    };
    let hopper: Vec<String> = every_build()
        .into_iter()
        .filter(|(_, arch)| *arch == Arch::SM90)
        .map(|(name, _)| name)
        .collect();
    assert_eq!(
        kernel,
        &format!(
            "variant check_variant::BrokenOnHopper in {} of {} kernel builds",
            hopper.len(),
            every_build().len()
        )
    );
    // Each failing instance on a line of its own, named with its arch; nothing else.
    let named: BTreeSet<&str> = log
        .lines()
        .filter(|l| !l.starts_with(' '))
        .map(|l| {
            l.split_once(" on sm_90a:")
                .unwrap_or_else(|| panic!("{l}"))
                .0
        })
        .collect();
    assert_eq!(named, hopper.iter().map(String::as_str).collect());
    // NVRTC's message, with the variant's name, at least once per distinct message.
    assert!(log.contains("no_such_field"), "{log}");
    assert!(log.contains("BrokenOnHopper."), "{log}");
    // Printed in full once; the instances with the same message refer to the first.
    let first = dispatch::instances(Arch::SM90, &SmResources::typical(Arch::SM90))[0].name();
    let same = format!(": the same error as {first} on sm_90a");
    assert!(log.lines().any(|l| l.ends_with(&same)), "{log}");
    assert_eq!(log.matches("no_such_field\"").count(), 1, "{log}");
    assert!(text.starts_with("NVRTC failed to compile variant check_variant::BrokenOnHopper"));
}

/// The FA3 template at head dims 64 (128-key tiles, P V by m64n64k16), 128 and 256 (64-key
/// tiles, O as two n128 accumulators) compiles for sm_90a without spills, in the forms the
/// runtime runs (`dispatch::compile_loop_with` for each of `dispatch::loops`: the consumers'
/// overlap, or in order where the overlap spills or a key hook keeps it so; at head dim 128 also
/// in order, for caches whose K/V go through cp.async), for every built-in variant; the
/// attention sink at head dims 64 and 128 (at 256 its spilling build runs FA2, see `dispatch`).
/// The long prompts' tile at head dim 128 (176 keys) only in its overlapping form, which fits
/// `Standard` alone today (the others run the 128-key tile: `dispatch::kernel`).
#[test]
fn the_fa3_instances_keep_their_registers() {
    const SPILL_FREE: [(&str, &[u32]); 8] = [
        ("Standard", &[64, 128, 256]),
        ("LlamaRope", &[64, 128, 256]),
        ("SoftCap", &[64, 128, 256]),
        ("SlidingWindow", &[64, 128, 256]),
        ("FlashSigmoid", &[64, 128, 256]),
        ("Alibi", &[64, 128, 256]),
        ("CustomMask", &[64, 128, 256]),
        ("AttentionSink", &[64, 128]),
    ];
    const LONG_SPILL_FREE: [&str; 1] = ["Standard"];
    use ferrinfer_kernels::attention::prefill::{is_sm90_long, sm90_form};
    let jit = memory_only();
    let sm = SmResources::typical(Arch::SM90);
    let mut checked = 0;
    for spec in ferrinfer::variants() {
        let (long, fa3): (Vec<_>, Vec<_>) = dispatch::instances_for(spec, Arch::SM90, &sm)
            .into_iter()
            .filter(|c| sm90_form(c) == Some(*c) && c.dtype == ferrinfer::DType::Bf16)
            .partition(is_sm90_long);
        for cfg in &long {
            assert_eq!(dispatch::loops(cfg), [Sm90Loop::Default], "{}", cfg.name());
            let b = dispatch::build_loop_with(&jit, spec, cfg, Sm90Loop::Default, Arch::SM90)
                .unwrap_or_else(|e| panic!("{} {}: {e}", spec.name, cfg.name()));
            println!("{:<14} {:<36} {:?}", spec.name, cfg.name(), b.kernel.stats);
            let fits = b.overlap_spilled.is_none() && b.kernel.stats.spill_stores == 0;
            assert_eq!(fits, LONG_SPILL_FREE.contains(&spec.name), "{}", spec.name);
        }
        if spec.hooks.key {
            assert!(
                long.is_empty(),
                "{}: a key hook keeps the loop in order",
                spec.name
            );
        }
        let spills: Vec<(u32, bool)> = fa3
            .iter()
            .flat_map(|cfg| dispatch::loops(cfg).into_iter().map(move |lp| (cfg, lp)))
            .map(|(cfg, lp)| {
                let k = dispatch::compile_loop_with(&jit, spec, cfg, lp, Arch::SM90)
                    .unwrap_or_else(|e| panic!("{} {} {lp:?}: {e}", spec.name, cfg.name()));
                println!("{:<14} {:<36} {lp:?} {:?}", spec.name, cfg.name(), k.stats);
                let s = k.stats;
                (cfg.head_dim_qk, s.spill_stores + s.spill_loads > 0)
            })
            .collect();
        let mut head_dims: Vec<u32> = spills.iter().map(|&(hd, _)| hd).collect();
        head_dims.sort();
        assert_eq!(
            head_dims,
            [64, 128, 128, 256],
            "{}: one bf16 FA3 instance a head dim, two builds at 128",
            spec.name
        );
        if let Some((_, free)) = SPILL_FREE.iter().find(|(name, _)| *name == spec.name) {
            for &(hd, spilled) in &spills {
                assert_eq!(
                    spilled,
                    !free.contains(&hd),
                    "{} at {hd}: {spills:?}",
                    spec.name
                );
            }
            checked += 1;
        }
    }
    assert_eq!(checked, 8, "the variants named above are built in");
}

/// The 16-row tile (decode on tensor cores, prefill of very short requests) compiles without
/// spills in both its forms, one warp along the keys and two (merged in shared memory), for every
/// built-in variant at every head dim, bf16, on sm_80 and sm_90a: the plan picks either per
/// batch (or the caller forces one), and a spill there would be paid by every decode step. The
/// one exception is `ONE_WARP_SPILLS` below.
#[test]
fn the_16_row_tile_does_not_spill() {
    // (variant, head dim, arch) whose one-warp 16-row build spills: main's kernel, kept as it
    // was measured (its launch bounds name 32 threads, and ptxas holds it to 128 registers).
    const ONE_WARP_SPILLS: [(&str, u32, Arch); 1] = [("CustomMask", 64, Arch::SM80)];
    let jit = memory_only();
    let mut checked = 0;
    for arch in [Arch::SM80, Arch::SM90] {
        for spec in ferrinfer::variants() {
            for hd in ferrinfer::HEAD_DIMS {
                // One warp, two warps, one warp with the narrow K/V tile (head dim 128 only).
                let narrow = if hd == 128 { &[(0, 16)][..] } else { &[] };
                for &(kv_warps, kv_tile) in [(0, 0), (2, 0)].iter().chain(narrow) {
                    let base = dispatch::config(arch, KernelKind::Prefill, hd, DType::Bf16);
                    let cfg = KernelConfig {
                        cta_tile_q: 16,
                        kv_warps,
                        kv_tile,
                        ..base.unwrap()
                    };
                    let k = dispatch::compile_with(&jit, spec, &cfg, arch)
                        .unwrap_or_else(|e| panic!("{} {}: {e}", spec.name, cfg.name()));
                    let s = k.stats;
                    println!("{:<14} {:<36} {:?}", spec.name, cfg.name(), s);
                    // The exception is exact: it spills (else the list is stale), and
                    // nothing else does.
                    let known = ONE_WARP_SPILLS.contains(&(spec.name, hd, arch))
                        && (kv_warps, kv_tile) == (0, 0);
                    assert_eq!(
                        s.spill_stores + s.spill_loads > 0,
                        known,
                        "{} {} on {}: {s:?}",
                        spec.name,
                        cfg.name(),
                        arch.sm_name()
                    );
                    checked += 1;
                }
            }
        }
    }
    assert!(
        checked >= 2 * 8 * (3 * 2 + 1),
        "every built-in variant at every head dim, both warp counts, and the narrow form: {checked}"
    );
}
