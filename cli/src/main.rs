//! `ferrinfer`: fill a kernel cache ahead of time, list it, verify it.
//!
//! ```text
//! ferrinfer precompile [--cache-dir DIR] [--arch sm_80|sm_90a|native]... [--variant NAME]...
//!                      [--head-dim N]... [--dtype bf16|f16]... [--no-ops] [--one-per-family]
//! ferrinfer list       [--cache-dir DIR]
//! ferrinfer verify     [--cache-dir DIR] [the selection options of precompile]
//! ```
//!
//! The cache directory defaults to the library's (`$FERRINFER_CACHE_DIR`, else
//! `$XDG_CACHE_HOME/ferrinfer`, else `~/.cache/ferrinfer`). A server started with
//! `FERRINFER_NO_JIT=1` and that directory needs no NVRTC at all.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Mutex;

use ferrinfer::jit::cache::DiskCache;
use ferrinfer::jit::{Jit, JitConfig, Origin, Precompile};
use ferrinfer::{Arch, Backend, DType};

/// `println!` for the commands' output. A reader that stops early (`ferrinfer list | head`,
/// `grep -q`) is not an error: the rest of the output is dropped and the exit status still
/// tells the command's result. Any other write failure (a full disk) ends the run with status 1.
macro_rules! outln {
    ($($arg:tt)*) => { out(format_args!($($arg)*)) };
}

fn out(line: std::fmt::Arguments) {
    if let Err(e) = writeln!(std::io::stdout().lock(), "{line}")
        && e.kind() != std::io::ErrorKind::BrokenPipe
    {
        eprintln!("ferrinfer: writing to stdout: {e}");
        std::process::exit(1);
    }
}

const USAGE: &str = "\
usage:
  ferrinfer precompile [--cache-dir DIR] [--arch sm_80|sm_90a|native]... [--variant NAME]...
                       [--head-dim N]... [--dtype bf16|f16]... [--no-ops] [--one-per-family]
      compile kernels into the cache (default: every variant, head dim and dtype, and the ops,
      for sm_80 and sm_90a; `native` is this machine's GPU 0)
  ferrinfer list [--cache-dir DIR]
      one line per cached kernel: file, arch, entry function, NVRTC, registers, size
  ferrinfer verify [--cache-dir DIR] [the selection options of precompile]
      check every file of the cache, and that the selection is all there (what a server with
      FERRINFER_NO_JIT=1 will ask for)
  ferrinfer variants
      the attention variants linked into this program

The cache directory defaults to $FERRINFER_CACHE_DIR, else $XDG_CACHE_HOME/ferrinfer, else
~/.cache/ferrinfer.";

/// The parsed command line.
#[derive(Debug)]
struct Args {
    command: String,
    cache_dir: Option<PathBuf>,
    archs: Vec<String>,
    variants: Vec<String>,
    head_dims: Vec<u32>,
    dtypes: Vec<DType>,
    ops: bool,
    one_per_family: bool,
}

fn parse(mut argv: impl Iterator<Item = String>) -> Result<Args, String> {
    let command = argv.next().ok_or("no command given")?;
    let mut a = Args {
        command,
        cache_dir: None,
        archs: Vec::new(),
        variants: Vec::new(),
        head_dims: Vec::new(),
        dtypes: Vec::new(),
        ops: true,
        one_per_family: false,
    };
    while let Some(flag) = argv.next() {
        let mut value = || argv.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--cache-dir" => a.cache_dir = Some(PathBuf::from(value()?)),
            "--arch" => a.archs.push(value()?),
            "--variant" => a.variants.push(value()?),
            "--head-dim" => {
                let v = value()?;
                a.head_dims.push(
                    v.parse()
                        .map_err(|_| format!("--head-dim {v}: expected a number such as 128"))?,
                );
            }
            "--dtype" => {
                let v = value()?;
                a.dtypes.push(
                    DType::ALL
                        .into_iter()
                        .find(|d| d.name() == v)
                        .ok_or_else(|| format!("--dtype {v}: expected bf16 or f16"))?,
                );
            }
            "--no-ops" => a.ops = false,
            "--one-per-family" => a.one_per_family = true,
            "-h" | "--help" => a.command = "help".into(),
            other => return Err(format!("unknown option {other}")),
        }
    }
    Ok(a)
}

fn main() -> ExitCode {
    let args = match parse(std::env::args().skip(1)) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("ferrinfer: {e}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let result = match args.command.as_str() {
        "precompile" => precompile(&args),
        "list" => list(&args),
        "verify" => verify(&args),
        "variants" => {
            let mut names: Vec<String> =
                ferrinfer::variants().map(|s| s.qualified_name()).collect();
            names.sort();
            outln!("{}", names.join("\n"));
            Ok(())
        }
        "help" | "-h" | "--help" => {
            outln!("{USAGE}");
            Ok(())
        }
        other => Err(format!("unknown command {other}\n\n{USAGE}")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ferrinfer: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The cache directory: `--cache-dir`, else the library's default.
fn cache_dir(args: &Args) -> Result<PathBuf, String> {
    args.cache_dir
        .clone()
        .or_else(|| JitConfig::from_env().cache_dir)
        .ok_or_else(|| "no cache directory: pass --cache-dir or set FERRINFER_CACHE_DIR".into())
}

/// What the selection options ask for.
fn selection(args: &Args) -> Result<Precompile, String> {
    let mut what = Precompile::all()
        .ops(args.ops)
        .one_per_family(args.one_per_family);
    if !args.variants.is_empty() {
        let names: Vec<&str> = args.variants.iter().map(String::as_str).collect();
        what = what.variants(&names);
    }
    if !args.head_dims.is_empty() {
        what = what.head_dims(&args.head_dims);
    }
    if !args.dtypes.is_empty() {
        what = what.dtypes(&args.dtypes);
    }
    match args.archs.as_slice() {
        [] => {}
        [one] if one == "native" => {
            let backend = Backend::cuda(0).map_err(|e| format!("--arch native: {e}"))?;
            let gpu = backend.gpu().ok_or("--arch native: no GPU")?;
            what = what.for_gpu(gpu.arch(), gpu.sm_resources());
        }
        names => {
            let archs = names
                .iter()
                .map(|n| match n.as_str() {
                    "sm_80" => Ok(Arch::SM80),
                    "sm_90a" => Ok(Arch::SM90),
                    "native" => Err("--arch native cannot be combined with other archs".into()),
                    other => Err(format!("--arch {other}: expected sm_80, sm_90a or native")),
                })
                .collect::<Result<Vec<_>, String>>()?;
            what = what.archs(&archs);
        }
    }
    Ok(what)
}

fn precompile(args: &Args) -> Result<(), String> {
    let dir = cache_dir(args)?;
    let what = selection(args)?;
    // Compiling is the point here, whatever FERRINFER_NO_JIT says; the bar replaces the
    // per-kernel announcements.
    let jit = Jit::new(JitConfig {
        cache_dir: Some(dir),
        compile: true,
        extra_options: Vec::new(),
    })
    .with_announce(false);
    let bar = Bar::new();
    let report =
        ferrinfer::precompile(&jit, &what, |done, total, name| bar.show(done, total, name))
            .map_err(|e| e.to_string())?;
    bar.finish();
    outln!("{report}");
    if report.ok() {
        Ok(())
    } else {
        Err(format!("{} kernels failed", report.failed.len()))
    }
}

fn list(args: &Args) -> Result<(), String> {
    let dir = cache_dir(args)?;
    let disk = DiskCache::open(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let entries = disk
        .entries()
        .map_err(|e| format!("{}: {e}", dir.display()))?;
    let mut total = 0u64;
    for l in &entries {
        total += l.bytes;
        let file = l.path.file_name().unwrap_or_default().to_string_lossy();
        match &l.entry {
            Ok(e) => {
                let arch = e
                    .key_text
                    .lines()
                    .find_map(|l| l.strip_prefix("arch "))
                    .unwrap_or("?");
                outln!(
                    "{file}  {arch:<7} {:<44} nvrtc {}.{}  {:>3} regs  {:>8} B",
                    e.entry,
                    e.nvrtc.0,
                    e.nvrtc.1,
                    e.stats.registers,
                    l.bytes
                );
            }
            Err(why) => outln!("{file}  unusable: {why}"),
        }
    }
    outln!(
        "{} entries, {:.1} MiB, in {}",
        entries.len(),
        total as f64 / (1 << 20) as f64,
        dir.display()
    );
    Ok(())
}

fn verify(args: &Args) -> Result<(), String> {
    let dir = cache_dir(args)?;
    let disk = DiskCache::open(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let entries = disk
        .entries()
        .map_err(|e| format!("{}: {e}", dir.display()))?;
    let bad: Vec<String> = entries
        .iter()
        .filter_map(|l| {
            let why = l.entry.as_ref().err()?;
            Some(format!("{}: {why}", l.path.display()))
        })
        .collect();
    // What a FERRINFER_NO_JIT server would ask for: each must be a disk hit.
    let jit = Jit::new(JitConfig {
        cache_dir: Some(dir.clone()),
        compile: false,
        extra_options: Vec::new(),
    });
    let jobs = selection(args)?.jobs().map_err(|e| e.to_string())?;
    let mut missing = Vec::new();
    for job in &jobs {
        match job.compile(&jit) {
            Ok(k) if k.origin != Origin::Compiled => {}
            Ok(_) => unreachable!("compiling is off"),
            Err(e) => missing.push(format!("{} {}: {e}", job.name, job.arch)),
        }
    }
    for line in bad.iter().chain(&missing) {
        outln!("{line}");
    }
    outln!(
        "{} files checked, {} unusable; {} of {} selected kernels present, in {}",
        entries.len(),
        bad.len(),
        jobs.len() - missing.len(),
        jobs.len(),
        dir.display()
    );
    if bad.is_empty() && missing.is_empty() {
        Ok(())
    } else {
        Err("the cache does not verify".into())
    }
}

/// A progress bar on stderr: redrawn in place on a terminal, a line per tenth otherwise (CI logs).
struct Bar {
    tty: bool,
    last_tenth: Mutex<usize>,
}

impl Bar {
    fn new() -> Bar {
        Bar {
            tty: std::io::stderr().is_terminal(),
            last_tenth: Mutex::new(0),
        }
    }

    fn show(&self, done: usize, total: usize, name: &str) {
        const WIDTH: usize = 30;
        let filled = WIDTH * done / total.max(1);
        let line = format!(
            "[{}{}] {done}/{total} {name}",
            "#".repeat(filled),
            " ".repeat(WIDTH - filled)
        );
        let mut err = std::io::stderr().lock();
        if self.tty {
            let _ = write!(err, "\r\x1b[2K{line}");
            let _ = err.flush();
        } else {
            let tenth = 10 * done / total.max(1);
            let mut last = self.last_tenth.lock().unwrap_or_else(|p| p.into_inner());
            if tenth > *last || done == total {
                *last = tenth;
                let _ = writeln!(err, "{line}");
            }
        }
    }

    fn finish(&self) {
        if self.tty {
            eprintln!();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Result<Args, String> {
        parse(s.split_whitespace().map(String::from))
    }

    #[test]
    fn parses_the_selection_and_refuses_bad_values() {
        let a =
            args("precompile --arch sm_90a --head-dim 128 --dtype bf16 --variant SoftCap --no-ops")
                .unwrap();
        assert_eq!(a.command, "precompile");
        assert_eq!(
            (a.archs, a.head_dims, a.dtypes),
            (vec!["sm_90a".to_string()], vec![128], vec![DType::Bf16])
        );
        assert!(!a.ops);
        assert!(
            args("precompile --head-dim x")
                .unwrap_err()
                .contains("--head-dim x")
        );
        assert!(
            args("precompile --dtype f32")
                .unwrap_err()
                .contains("bf16 or f16")
        );
        assert!(
            args("precompile --arch")
                .unwrap_err()
                .contains("needs a value")
        );
        assert!(
            args("list --frobnicate")
                .unwrap_err()
                .contains("--frobnicate")
        );
        let bad_arch = args("precompile --arch sm_70").unwrap();
        assert!(
            selection(&bad_arch)
                .err()
                .unwrap()
                .contains("sm_80, sm_90a or native")
        );
    }
}
