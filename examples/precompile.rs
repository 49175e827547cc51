//! Fill the disk cache with every built-in kernel instance for this machine's GPU (or a named
//! arch), compiling on all cores: run it once at deployment, then serve with FERRINFER_NO_JIT=1.
//!
//!     cargo run --release --example precompile [sm_80|sm_90a]

use std::sync::Mutex;
use std::time::Instant;

use ferrinfer::Backend;
use ferrinfer::attention::dispatch;
use ferrinfer::device::SmResources;
use ferrinfer::jit::{Arch, Jit};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // This GPU's arch and SMs (which decide the wide-K/V-tile instances the runtime will try),
    // or a named arch and its typical SM.
    let (arch, sm) = match std::env::args().nth(1).as_deref() {
        Some("sm_80") => (Arch::new(8, 0), None),
        Some("sm_90a") => (Arch::new(9, 0), None),
        Some(other) => return Err(format!("unknown arch {other} (sm_80 or sm_90a)").into()),
        None => {
            let backend = Backend::cuda(0)?;
            let gpu = backend.gpu().expect("a CUDA backend");
            (gpu.arch(), Some(gpu.sm_resources()))
        }
    };
    let sm = sm.unwrap_or_else(|| SmResources::typical(arch));
    // Refuse to compile everything only to keep it in memory.
    let jit = Jit::global();
    if !jit.config().compile {
        return Err("FERRINFER_NO_JIT is set: unset it to fill the cache".into());
    }
    match (jit.cache_dir(), jit.cache_read_only()) {
        (None, _) => {
            return Err("no usable kernel cache directory: set FERRINFER_CACHE_DIR".into());
        }
        (Some(dir), Some(why)) => {
            return Err(format!("kernel cache {} is read-only ({why})", dir.display()).into());
        }
        (Some(_), None) => {}
    }
    let mut jobs = Vec::new();
    for spec in ferrinfer::variants() {
        for cfg in dispatch::instances(arch, &sm) {
            jobs.push((spec, cfg));
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
