//! NVRTC compiles every built-in variant x {prefill (each query tile, and the wide K/V tile),
//! decode} x head dims x dtypes x {sm_80, sm_90a}, and reports registers and spills. Runs in CI without a GPU; without NVRTC it fails, never skips.

use std::sync::Mutex;

use ferrinfer::jit::{Arch, Jit, JitConfig};
use ferrinfer::{DType, HEAD_DIMS, KernelConfig, KernelKind, dispatch, wide_kv_tile};

/// The query tiles the plan may choose for each kernel kind.
fn tiles(kind: KernelKind) -> Vec<u32> {
    match kind {
        KernelKind::Prefill => vec![16, 64, 128],
        KernelKind::Decode => vec![0],
    }
}

#[test]
fn nvrtc_compiles_every_builtin_kernel_instance() {
    let specs: Vec<_> = ferrinfer::variants()
        .filter(|s| s.module_path.starts_with("ferrinfer::variants"))
        .collect();
    assert!(
        specs.len() >= 8,
        "expected the 8 built-in variants, found {}",
        specs.len()
    );
    let mut jobs = Vec::new();
    for arch in [Arch::new(8, 0), Arch::new(9, 0)] {
        for spec in &specs {
            for kind in KernelKind::ALL {
                for head_dim in HEAD_DIMS {
                    for dtype in DType::ALL {
                        for cta_tile_q in tiles(kind) {
                            let cfg = KernelConfig {
                                kind,
                                head_dim,
                                dtype,
                                cta_tile_q,
                                kv_tile: 0,
                            };
                            jobs.push((*spec, cfg, arch));
                            // The wide K/V tile the runtime tries first on a Hopper-sized SM.
                            if let Some(wide) = wide_kv_tile(&cfg, 228 * 1024) {
                                jobs.push((*spec, wide, arch));
                            }
                        }
                    }
                }
            }
        }
    }
    // A JIT with no disk cache, so that every instance really goes through NVRTC.
    let jit = Jit::new(JitConfig {
        cache_dir: None,
        compile: true,
        extra_options: Vec::new(),
    });
    let next = Mutex::new(jobs.iter());
    let report = Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..2 {
            s.spawn(|| {
                loop {
                    let Some((spec, cfg, arch)) = next.lock().unwrap().next() else { break };
                    let k = dispatch::compile_with(&jit, spec, cfg, *arch).unwrap_or_else(|e| {
                        panic!("{} {} {}: {e}", spec.name, cfg.name(), arch.sm_name())
                    });
                    assert!(!k.cubin.is_empty());
                    assert!(k.stats.registers > 0, "no ptxas report for {}", cfg.name());
                    report.lock().unwrap().push(format!(
                        "{:<14} {:<20} {:<7} {:>4} regs {:>5} B spill st {:>5} B spill ld {:>6.2} s",
                        spec.name,
                        cfg.name(),
                        arch.sm_name(),
                        k.stats.registers,
                        k.stats.spill_stores,
                        k.stats.spill_loads,
                        k.seconds
                    ));
                }
            });
        }
    });
    let mut lines = report.into_inner().unwrap();
    lines.sort();
    println!("{}", lines.join("\n"));
    assert_eq!(lines.len(), jobs.len());
}
