//! Fill the disk cache with every built-in kernel instance for this machine's GPU (or a named
//! arch), compiling on all cores: run it once at deployment, then serve with FERRINFER_NO_JIT=1.
//!
//!     cargo run --release --example precompile [sm_80|sm_90a]

use std::sync::Mutex;
use std::time::Instant;

use ferrinfer::jit::{Arch, Jit};
use ferrinfer::{Backend, DType, HEAD_DIMS, KernelConfig, KernelKind, dispatch, wide_kv_tile};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let arch = match std::env::args().nth(1).as_deref() {
        Some("sm_80") => Arch::new(8, 0),
        Some("sm_90a") => Arch::new(9, 0),
        Some(other) => return Err(format!("unknown arch {other} (sm_80 or sm_90a)").into()),
        None => Backend::cuda(0)?.gpu().expect("a CUDA backend").arch(),
    };
    let mut jobs = Vec::new();
    for spec in ferrinfer::variants() {
        for kind in KernelKind::ALL {
            let tiles: &[u32] = match kind {
                KernelKind::Prefill => &[16, 64, 128],
                KernelKind::Decode => &[0],
            };
            for &head_dim in &HEAD_DIMS {
                for dtype in DType::ALL {
                    for &cta_tile_q in tiles {
                        let cfg = KernelConfig {
                            kind,
                            head_dim,
                            dtype,
                            cta_tile_q,
                            kv_tile: 0,
                        };
                        jobs.push((spec, cfg));
                        // The runtime tries the wide K/V tile first where an SM holds two of it
                        // (Hopper's 228 KiB), and keeps it unless it spills: cache both.
                        if let Some(wide) =
                            wide_kv_tile(&cfg, 228 * 1024).filter(|_| arch.major >= 9)
                        {
                            jobs.push((spec, wide));
                        }
                    }
                }
            }
        }
    }
    let started = Instant::now();
    let next = Mutex::new(jobs.iter());
    let failed = Mutex::new(Vec::new());
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                loop {
                    let Some((spec, cfg)) = next.lock().unwrap().next() else {
                        break;
                    };
                    if let Err(e) = dispatch::compile(spec, cfg, arch) {
                        failed
                            .lock()
                            .unwrap()
                            .push(format!("{} {}: {e}", spec.name, cfg.name()));
                    }
                }
            });
        }
    });
    let failed = failed.into_inner().unwrap();
    println!(
        "{} kernel instances for {} in {:.1} s on {threads} threads, cache {:?}",
        jobs.len() - failed.len(),
        arch.sm_name(),
        started.elapsed().as_secs_f64(),
        Jit::global().cache_dir()
    );
    for f in &failed {
        eprintln!("failed: {f}");
    }
    if failed.is_empty() {
        Ok(())
    } else {
        Err(format!("{} instances failed", failed.len()).into())
    }
}
