//! NVRTC compiles every op instance, and every built-in variant x {prefill (each query tile, and the wide K/V tile),
//! decode} x head dims x dtypes x {sm_80, sm_90a}, and reports registers and spills. Runs in CI without a GPU; without NVRTC it fails, never skips.

use std::sync::Mutex;

use ferrinfer::attention::dispatch;
use ferrinfer::device::SmResources;
use ferrinfer::jit::{Arch, Jit, JitConfig};

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
            // Each arch's class, with the wide K/V tiles of a Hopper SM on both: the code must
            // compile anywhere.
            for cfg in dispatch::instances(arch, &SmResources::typical(Arch::new(9, 0))) {
                jobs.push((*spec, cfg, arch));
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

#[test]
fn nvrtc_compiles_every_op_instance() {
    let units = ferrinfer::ops::units().unwrap();
    let jit = Jit::new(JitConfig {
        cache_dir: None,
        compile: true,
        extra_options: Vec::new(),
    });
    let jobs: Vec<_> = [Arch::new(8, 0), Arch::new(9, 0)]
        .into_iter()
        .flat_map(|arch| units.iter().map(move |tu| (tu, arch)))
        .collect();
    let next = Mutex::new(jobs.iter());
    let report = Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..2 {
            s.spawn(|| {
                loop {
                    let Some((tu, arch)) = next.lock().unwrap().next() else {
                        break;
                    };
                    let k = jit
                        .compile(tu, *arch)
                        .unwrap_or_else(|e| panic!("{} {}: {e}", tu.name, arch.sm_name()));
                    assert!(!k.cubin.is_empty());
                    assert!(k.stats.registers > 0, "no ptxas report for {}", tu.name);
                    report.lock().unwrap().push(format!(
                        "{:<36} {:<7} {:>4} regs {:>5} B spill st {:>5} B spill ld {:>6.2} s",
                        tu.name,
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
