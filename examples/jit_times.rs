//! Compile time of the prefill kernel (its 32- and 64-key instances), on sm_90a also the FA3
//! instance (Standard, a soft-capped and a masked variant), and the decode kernel: cold (NVRTC),
//! from the disk cache (a fresh JIT on the same directory, as a new process would see it) and
//! from memory.
//!
//!     cargo run --release --example jit_times [sm_80|sm_90a]
//!
//! Needs NVRTC but no GPU.

use std::time::Instant;

use ferrinfer::attention::dispatch;
use ferrinfer::device::SmResources;
use ferrinfer::jit::{Arch, Jit, JitConfig};
use ferrinfer::variants::{SlidingWindow, SoftCap, Standard};
use ferrinfer::{DType, KernelConfig, KernelKind, Variant, VariantSpec};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let arch = match std::env::args().nth(1).as_deref() {
        Some("sm_80") => Arch::new(8, 0),
        _ => Arch::new(9, 0),
    };
    let dir = std::env::temp_dir().join(format!("ferrinfer-jit-times-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let jit = |dir: &std::path::Path| {
        Jit::new(JitConfig {
            cache_dir: Some(dir.to_path_buf()),
            compile: true,
            extra_options: Vec::new(),
        })
        .with_announce(false) // the table is the report
    };
    println!(
        "{:<14} {:<36} {:<8} {:>8} {:>8} {:>10}",
        "variant", "kernel", "arch", "cold s", "disk s", "memory s"
    );
    let standard = <Standard as Variant>::SPEC;
    let base = |kind| dispatch::config(arch, kind, 128, DType::Bf16);
    let prefill = base(KernelKind::Prefill)?;
    let mut rows: Vec<(&VariantSpec, KernelConfig)> = vec![(standard, prefill)];
    let hd128: Vec<KernelConfig> = dispatch::instances(arch, &SmResources::typical(arch))
        .into_iter()
        .filter(|c| c.head_dim_qk == 128 && c.dtype == DType::Bf16)
        .collect();
    // The 64-key instance, which the runtime tries first where two of it fit an SM (Hopper).
    let wide = hd128.iter().filter(|c| c.kv_tile == 64);
    rows.extend(wide.map(|&c| (standard, c)));
    // The FA3 instance (sm_90a only; its K/V tile of 128 keys is the template's), with a
    // logits hook and with a mask hook beside Standard.
    let fa3 = hd128.iter().copied().find(|c| c.kv_tile == 128);
    for spec in [
        standard,
        <SoftCap as Variant>::SPEC,
        <SlidingWindow as Variant>::SPEC,
    ] {
        rows.extend(fa3.map(|c| (spec, c)));
    }
    rows.push((standard, base(KernelKind::Decode)?));
    for (spec, cfg) in rows {
        let time = |j: &Jit| -> Result<f64, ferrinfer::Error> {
            let t = Instant::now();
            dispatch::compile_with(j, spec, &cfg, arch)?;
            Ok(t.elapsed().as_secs_f64())
        };
        let first = jit(&dir);
        let cold = time(&first)?;
        let memory = time(&first)?;
        let disk = time(&jit(&dir))?;
        println!(
            "{:<14} {:<36} {:<8} {cold:>8.3} {disk:>8.4} {memory:>10.6}",
            spec.name,
            cfg.name(),
            arch.sm_name()
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
