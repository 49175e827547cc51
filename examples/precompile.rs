//! Fill the disk cache with every built-in kernel instance for this machine's GPU (or a named
//! arch), compiling on all cores: run it once at deployment, then serve with FERRINFER_NO_JIT=1
//! (which then needs no NVRTC on the server). The `ferrinfer` command (crate `cli/`) does the same
//! with more options; this is the library call, [`ferrinfer::precompile`].
//!
//!     FERRINFER_CACHE_DIR=/srv/kernels cargo run --release --example precompile [sm_80|sm_90a]

use ferrinfer::jit::{Jit, JitConfig};
use ferrinfer::{Arch, Backend, Precompile};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // ANCHOR: what
    let what = match std::env::args().nth(1).as_deref() {
        Some("sm_80") => Precompile::all().archs(&[Arch::SM80]),
        Some("sm_90a") => Precompile::all().archs(&[Arch::SM90]),
        Some(other) => return Err(format!("unknown arch {other} (sm_80 or sm_90a)").into()),
        // This GPU's arch and SMs, which decide the wide-K/V-tile instances the runtime will try.
        None => {
            let backend = Backend::cuda(0)?;
            let gpu = backend.gpu().expect("a CUDA backend");
            Precompile::all().for_gpu(gpu.arch(), gpu.sm_resources())
        }
    };
    // ANCHOR_END: what
    // ANCHOR: compile
    // Compiling is the point, whatever FERRINFER_NO_JIT says; the cache is the environment's.
    let jit = Jit::new(JitConfig {
        compile: true,
        ..JitConfig::from_env()
    })
    .with_announce(false);
    let report = ferrinfer::precompile(&jit, &what, |done, total, name| {
        eprintln!("[{done}/{total}] {name}");
    })?;
    println!("{report}");
    // ANCHOR_END: compile
    if report.ok() {
        Ok(())
    } else {
        Err(format!("{} kernels failed", report.failed.len()).into())
    }
}
