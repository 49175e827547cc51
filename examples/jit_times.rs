//! Compile time of the prefill kernel (its 32- and 64-key instances) and the decode kernel: cold
//! (NVRTC), from the disk cache (a fresh JIT on the same directory, as a new process would see it)
//! and from memory.
//!
//!     cargo run --release --example jit_times [sm_80|sm_90a]
//!
//! Needs NVRTC but no GPU.

use std::time::Instant;

use ferrinfer::attention::dispatch;
use ferrinfer::device::SmResources;
use ferrinfer::jit::{Arch, Jit, JitConfig};
use ferrinfer::variants::Standard;
use ferrinfer::{DType, KernelKind, Variant};

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
        "{:<28} {:<8} {:>10} {:>10} {:>10}",
        "kernel", "arch", "cold s", "disk s", "memory s"
    );
    let base = |kind| dispatch::config(arch, kind, 128, DType::Bf16);
    let prefill = base(KernelKind::Prefill)?;
    // The 64-key instance, which the runtime tries first where two of it fit an SM (Hopper).
    let wide = dispatch::instances(arch, &SmResources::typical(arch))
        .into_iter()
        .filter(|c| c.head_dim_qk == 128 && c.dtype == DType::Bf16 && c.kv_tile == 64);
    for cfg in std::iter::once(prefill)
        .chain(wide)
        .chain([base(KernelKind::Decode)?])
    {
        let spec = <Standard as Variant>::SPEC;
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
            "{:<28} {:<8} {cold:>10.3} {disk:>10.4} {memory:>10.6}",
            cfg.name(),
            arch.sm_name()
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
