//! NVRTC compiles every op instance, and every built-in variant x {prefill (each query tile, and
//! the wide K/V tile), decode} x head dims x dtypes x {sm_80, sm_90a}, and reports registers and
//! spills. Runs in CI without a GPU; without NVRTC it fails, never skips.

use std::sync::{Arc, Mutex};

use ferrinfer::attention::dispatch;
use ferrinfer::device::SmResources;
use ferrinfer::jit::{Arch, CompiledKernel, Jit, JitConfig};

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
            for cfg in dispatch::instances_for(spec, arch, &SmResources::typical(Arch::new(9, 0))) {
                jobs.push((*spec, cfg, arch));
            }
        }
    }
    let jit = uncached_jit();
    compile_all(&jobs, |(spec, cfg, arch)| {
        let name = format!("{:<14} {:<20} {:<7}", spec.name, cfg.name(), arch.sm_name());
        let k = dispatch::compile_with(&jit, spec, cfg, *arch);
        (name, k)
    });
}

#[test]
fn nvrtc_compiles_every_op_instance() {
    let units = ferrinfer::ops::units().unwrap();
    let jobs: Vec<_> = [Arch::new(8, 0), Arch::new(9, 0)]
        .into_iter()
        .flat_map(|arch| units.iter().map(move |tu| (tu, arch)))
        .collect();
    let jit = uncached_jit();
    compile_all(&jobs, |(tu, arch)| {
        let name = format!("{:<36} {:<7}", tu.name, arch.sm_name());
        (name, jit.compile(tu, *arch))
    });
}

/// A JIT with no disk cache, so that every instance really goes through NVRTC, and quiet: the
/// table below is the report.
fn uncached_jit() -> Jit {
    Jit::new(JitConfig {
        cache_dir: None,
        compile: true,
        extra_options: Vec::new(),
    })
    .with_announce(false)
}

/// Compile every job on two threads (CI has two cores); each must give a CUBIN with a ptxas
/// report. Prints one line per job: its name, registers, spills and seconds.
fn compile_all<J: Sync>(
    jobs: &[J],
    compile: impl Fn(&J) -> (String, ferrinfer::Result<Arc<CompiledKernel>>) + Sync,
) {
    let next = Mutex::new(jobs.iter());
    let report = Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..2 {
            s.spawn(|| {
                loop {
                    let Some(job) = next.lock().unwrap().next() else {
                        break;
                    };
                    let (name, k) = compile(job);
                    let k = k.unwrap_or_else(|e| panic!("{name}: {e}"));
                    assert!(!k.cubin.is_empty(), "{name}: empty CUBIN");
                    assert!(k.stats.registers > 0, "{name}: no ptxas report");
                    report.lock().unwrap().push(format!(
                        "{name} {:>4} regs {:>5} B spill st {:>5} B spill ld {:>6.2} s",
                        k.stats.registers, k.stats.spill_stores, k.stats.spill_loads, k.seconds
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
