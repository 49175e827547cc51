//! Registers, spills and compile time of the kernel instances whose variant or kernel name
//! contains a filter, as ptxas reports them through NVRTC: no GPU needed, only NVRTC. Use it to
//! check that a new variant (or a template change) does not spill. ptxas' warnings follow their
//! kernel's line.
//!
//!     cargo run --release --example kernel_report [sm_80|sm_90a] [FILTER] [CUBIN_DIR]
//!
//! With CUBIN_DIR, each CUBIN is also written there (`cuobjdump -sass` reads them).

use ferrinfer::Sm90Loop;
use ferrinfer::attention::dispatch;
use ferrinfer::device::SmResources;
use ferrinfer::jit::{Arch, Jit, JitConfig};
use ferrinfer::{KernelConfig, VariantSpec};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let arch = match args.next().as_deref() {
        Some("sm_80") => Arch::new(8, 0),
        Some("sm_90a") | None => Arch::new(9, 0),
        Some(other) => return Err(format!("unknown arch {other} (sm_80 or sm_90a)").into()),
    };
    let filter = args.next().unwrap_or_default();
    let cubin_dir = args.next().map(std::path::PathBuf::from);
    // No disk cache: every line is a fresh NVRTC compile. Quiet: the table is the report.
    let jit = Jit::new(JitConfig {
        cache_dir: None,
        compile: true,
        extra_options: Vec::new(),
    })
    .with_announce(false);
    println!("variant        kernel                   regs  spill st  spill ld  compile");
    for spec in ferrinfer::variants() {
        // With the wide K/V tiles a typical SM of the arch runs.
        for cfg in dispatch::instances_for(spec, arch, &SmResources::typical(arch)) {
            report(&jit, spec, &cfg, arch, &filter, cubin_dir.as_deref())?;
        }
    }
    Ok(())
}

/// One line of the report (and the CUBIN), if the line matches `filter`.
fn report(
    jit: &Jit,
    spec: &VariantSpec,
    cfg: &KernelConfig,
    arch: Arch,
    filter: &str,
    cubin_dir: Option<&std::path::Path>,
) -> Result<(), Box<dyn std::error::Error>> {
    let line = format!("{:<14} {:<24}", spec.name, cfg.name());
    if !line.contains(filter) {
        return Ok(());
    }
    let build = dispatch::build_loop_with(jit, spec, cfg, Sm90Loop::Default, arch)?;
    let k = &build.kernel;
    if let Some(dir) = cubin_dir {
        std::fs::write(
            dir.join(format!("{}_{}.cubin", spec.name, cfg.name())),
            &k.cubin,
        )?;
    }
    println!(
        "{line} {:>4} {:>7} B {:>7} B {:>6.2} s",
        k.stats.registers, k.stats.spill_stores, k.stats.spill_loads, k.seconds
    );
    if let Some(o) = &build.overlap_spilled {
        println!("    {}", dispatch::overlap_spill_note(cfg, o));
    }
    // ptxas' warnings under the line, and its "Potential Performance Loss" infos (C7515: wgmma
    // serialized, every MMA waited for at once), which it prints as infos.
    for warning in k
        .log
        .lines()
        .filter(|l| !l.contains("ptxas info") || l.contains("Performance"))
    {
        println!("    {}", warning.trim());
    }
    Ok(())
}
