//! The JIT: find CUDA, compile a translation unit with NVRTC, cache the result in memory and on disk.
//!
//! A lookup goes memory -> disk -> NVRTC. The key is a stable hash of what decides the CUBIN and
//! is known without a compiler: the cache format, the arch, the options, the entry function and
//! the source. Each disk entry records the NVRTC version that made it. With compiling allowed, an
//! entry from another NVRTC than the one in use is recompiled, so the cache follows the toolkit;
//! with `compile: false` (`FERRINFER_NO_JIT=1`) NVRTC is never loaded, and a miss of both caches
//! is an error instead of a compile: the switch for production, where every kernel was compiled
//! ahead of time into the disk cache (see [`precompile()`]), on a machine that may have no NVRTC at
//! all. That directory may be read-only (a container image): it is loaded from, and nothing is
//! written to it. Either way, an entry the driver is too old to load is refused with an
//! explanation (see [`crate::device::toolkit::check_driver`]).
//!
//! Each compile is announced on stderr before it starts and timed after it ends
//! (`ferrinfer: compiling ...`), since a cold start can take seconds per kernel;
//! `FERRINFER_QUIET=1` silences those lines (see [`Jit::with_announce`]).

pub mod cache;
pub(crate) mod hash;
pub(crate) mod nvrtc;
pub mod precompile;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use ferrinfer_kernels::TranslationUnit;

pub use crate::device::Arch;
use crate::device::toolkit;
use crate::error::{Error, Result};
use cache::{DiskCache, Miss};
pub use nvrtc::KernelStats;
pub use precompile::{Precompile, PrecompileReport, precompile};

/// Whether an environment variable is set to something other than empty, `0`, `false`, `no` or
/// `off`.
fn env_flag(value: Option<String>) -> bool {
    value.is_some_and(|v| {
        !matches!(
            v.trim().to_ascii_lowercase().as_str(),
            "" | "0" | "false" | "no" | "off"
        )
    })
}

/// How a [`Jit`] finds and makes kernels.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JitConfig {
    /// Disk cache directory; `None` keeps kernels in memory only.
    pub cache_dir: Option<PathBuf>,
    /// Whether a miss of both caches may run NVRTC (else it is [`Error::CacheMiss`]).
    pub compile: bool,
    /// NVRTC options added after ferrinfer's own (`-DFOO`, `--maxrregcount=128`...). Part of the key.
    pub extra_options: Vec<String>,
}

impl Default for JitConfig {
    /// Memory only, compiling allowed.
    fn default() -> Self {
        JitConfig {
            cache_dir: None,
            compile: true,
            extra_options: Vec::new(),
        }
    }
}

impl JitConfig {
    /// From the environment: `FERRINFER_CACHE_DIR` / `XDG_CACHE_HOME` / `HOME` for the disk cache
    /// (see [`cache::default_dir`]) and `FERRINFER_NO_JIT=1` to forbid compiling.
    pub fn from_env() -> Self {
        Self::from_lookup(|k| std::env::var(k).ok())
    }

    /// As [`from_env`](Self::from_env), reading variables through `lookup`.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Self {
        let no_jit = env_flag(lookup("FERRINFER_NO_JIT"));
        JitConfig {
            cache_dir: cache::default_dir(&lookup),
            compile: !no_jit,
            extra_options: Vec::new(),
        }
    }
}

/// Where a [`CompiledKernel`] came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    /// This [`Jit`]'s memory cache.
    Memory,
    /// The disk cache.
    Disk,
    /// A fresh NVRTC compile.
    Compiled,
}

/// A kernel ready to load with `cuModuleLoadData`.
#[derive(Clone, Debug)]
pub struct CompiledKernel {
    /// The CUBIN image.
    pub cubin: Vec<u8>,
    /// The `extern "C"` entry function.
    pub entry: String,
    /// ptxas' numbers: registers, spills, stack, static shared memory.
    pub stats: KernelStats,
    /// NVRTC's log from the compile (also for disk hits).
    pub log: String,
    /// Where it came from this time.
    pub origin: Origin,
    /// Seconds spent compiling or loading it (0 for a memory hit).
    pub seconds: f64,
    /// The version of the NVRTC that compiled it, (major, minor).
    pub nvrtc: (u32, u32),
}

/// One memory-cache slot. Its own lock lets concurrent callers of one kernel wait for a single
/// compile while other kernels proceed.
type Slot = Arc<Mutex<Option<Arc<CompiledKernel>>>>;

/// The compiler and its caches. Cheap to share: every method takes `&self`.
pub struct Jit {
    config: JitConfig,
    /// The disk cache, or why there is none (the reason every disk lookup misses).
    disk: std::result::Result<DiskCache, Miss>,
    /// Keyed by the full key text, so that a hash collision cannot alias two kernels.
    memory: Mutex<HashMap<String, Slot>>,
    /// Whether a failed store was already logged as a warning (later ones go to debug).
    store_failure_logged: AtomicBool,
    /// Whether compiles are announced on stderr.
    announce: bool,
}

impl Jit {
    /// The process-wide JIT, configured from the environment on first use.
    pub fn global() -> &'static Jit {
        static GLOBAL: OnceLock<Jit> = OnceLock::new();
        GLOBAL.get_or_init(|| Jit::new(JitConfig::from_env()))
    }

    /// A JIT with its own memory cache. A disk cache directory that exists but cannot be written
    /// is used read-only: kernels are loaded from it and new ones are not stored (said once in the
    /// log). One that does not exist and cannot be created is logged and ignored: kernels are then
    /// cached in memory only. Failing to store a kernel never fails a compile.
    pub fn new(config: JitConfig) -> Jit {
        let disk = match config.cache_dir.as_deref() {
            None => Err(Miss::NoCacheDir),
            Some(dir) => DiskCache::open(dir).map_err(|e| {
                log::warn!(
                    "kernel cache {} cannot be created or opened ({e}); caching in memory only",
                    dir.display()
                );
                Miss::DirUnusable(e.to_string())
            }),
        };
        if let Ok(d) = &disk
            && let Some(why) = d.read_only()
        {
            // Expected when serving from a cache filled ahead of time; worth a warning otherwise.
            let level = if config.compile {
                log::Level::Warn
            } else {
                log::Level::Info
            };
            log::log!(
                level,
                "kernel cache {} is read-only ({why}): loading kernels from it, storing none",
                d.dir().display()
            );
        }
        Jit {
            config,
            disk,
            memory: Mutex::new(HashMap::new()),
            store_failure_logged: AtomicBool::new(false),
            announce: !env_flag(std::env::var("FERRINFER_QUIET").ok()),
        }
    }

    /// Whether each NVRTC compile prints `ferrinfer: compiling <kernel> for <arch>...` on stderr
    /// before it starts and `ferrinfer: compiled <kernel> for <arch> in <s> s (<stats>)` after.
    /// On by default, off when `FERRINFER_QUIET` is set (to anything but `0`, `false`, `no`,
    /// `off`). The `log` crate gets the same lines at info level either way.
    pub fn with_announce(mut self, announce: bool) -> Jit {
        self.announce = announce;
        self
    }

    /// Whether compiles are announced on stderr (see [`with_announce`](Self::with_announce)).
    pub fn announces(&self) -> bool {
        self.announce
    }

    /// The configuration it was made with.
    pub fn config(&self) -> &JitConfig {
        &self.config
    }

    /// The disk cache directory in use (perhaps read-only), `None` when caching in memory only.
    pub fn cache_dir(&self) -> Option<&Path> {
        self.disk.as_ref().ok().map(DiskCache::dir)
    }

    /// `Some(why)` when the disk cache directory is in use but cannot be written: kernels are
    /// loaded from it and new ones are kept in memory only.
    pub fn cache_read_only(&self) -> Option<&str> {
        self.disk.as_ref().ok().and_then(DiskCache::read_only)
    }

    /// The disk cache file for `tu` on `arch` (whether or not it exists yet); `None` when no disk
    /// cache is in use.
    pub fn entry_path(&self, tu: &TranslationUnit, arch: Arch) -> Result<Option<PathBuf>> {
        let (key, _) = self.key(tu, arch)?;
        Ok(self.disk.as_ref().ok().map(|d| d.path(&key)))
    }

    /// The CUBIN of `tu` for `arch`: from memory, else disk, else NVRTC (if allowed).
    pub fn compile(&self, tu: &TranslationUnit, arch: Arch) -> Result<Arc<CompiledKernel>> {
        let (key, key_text) = self.key(tu, arch)?;
        let slot = lock(&self.memory)
            .entry(key_text.clone())
            .or_default()
            .clone();
        let mut slot = lock(&slot);
        if let Some(hit) = &*slot {
            return Ok(hit.clone());
        }
        let kernel = match self.load_from_disk(tu, arch, &key, &key_text) {
            Ok(k) => k,
            Err(Miss::DriverTooOld(why)) if !self.config.compile => {
                return Err(Error::CudaUnavailable(format!(
                    "{} for {arch} from the kernel cache: {why}",
                    tu.name
                )));
            }
            Err(miss) if !self.config.compile => {
                return Err(Error::CacheMiss(self.miss_message(tu, arch, &key, &miss)));
            }
            Err(_) => self.compile_and_store(tu, arch, &key, &key_text)?,
        };
        *slot = Some(Arc::new(CompiledKernel {
            origin: Origin::Memory,
            seconds: 0.0,
            ..kernel.clone()
        }));
        Ok(Arc::new(kernel))
    }

    /// What a cache miss in no-JIT mode says: the kernel, the file looked at, why it missed, and
    /// how to fill the cache.
    fn miss_message(&self, tu: &TranslationUnit, arch: Arch, key: &str, miss: &Miss) -> String {
        let Some(dir) = self.config.cache_dir.as_deref() else {
            return format!(
                "{} for {arch} (key {key}): {miss}. To fix: point FERRINFER_CACHE_DIR at a \
                 directory filled ahead of time with FERRINFER_NO_JIT unset, e.g. by \
                 `cargo run --release --example precompile`, or unset FERRINFER_NO_JIT",
                tu.name
            );
        };
        format!(
            "{} for {arch} (key {key}): looked for {}: {miss}. To fix: fill the cache ahead of \
             time with FERRINFER_NO_JIT unset and the same ferrinfer build as this process (its \
             kernel sources are part of the key), e.g. `FERRINFER_CACHE_DIR={} ferrinfer precompile` \
             (the ferrinfer-cli crate), `ferrinfer::precompile(...)`, or `cargo run --release \
             --example precompile`; or unset FERRINFER_NO_JIT to compile on demand",
            tu.name,
            cache::entry_path(dir, key).display(),
            dir.display(),
        )
    }

    /// (hash, full key text). Needs no NVRTC: its version is recorded in the entry instead.
    fn key(&self, tu: &TranslationUnit, arch: Arch) -> Result<(String, String)> {
        let options = nvrtc::options(arch, &self.config.extra_options);
        let key_text = format!(
            "ferrinfer cubin v{}\narch {}\noptions {}\nentry {}\n{}",
            cache::FORMAT_VERSION,
            arch.sm_name(),
            options.join(" "),
            tu.entry,
            tu.source
        );
        Ok((crate::jit::hash::hex(&[key_text.as_bytes()]), key_text))
    }

    /// Whether an entry made by NVRTC `made_by` may be served: the driver (when one is loadable)
    /// must be new enough for it, and when compiling is allowed it must come from the NVRTC in
    /// use (else it is recompiled with that one).
    fn servable(&self, made_by: (u32, u32)) -> std::result::Result<(), Miss> {
        if let Some(driver) = toolkit::driver_version() {
            toolkit::check_driver(driver, made_by).map_err(Miss::DriverTooOld)?;
        }
        if self.config.compile
            && let Ok(lib) = toolkit::nvrtc_library()
            && lib.version() != made_by
        {
            return Err(Miss::OtherNvrtc {
                found: made_by,
                current: lib.version(),
            });
        }
        Ok(())
    }

    /// The kernel from the disk cache, or why it is not there (logged when it will be recompiled).
    fn load_from_disk(
        &self,
        tu: &TranslationUnit,
        arch: Arch,
        key: &str,
        key_text: &str,
    ) -> std::result::Result<CompiledKernel, Miss> {
        let disk = self.disk.as_ref().map_err(Clone::clone)?;
        let start = Instant::now();
        match disk
            .load(key, key_text)
            .and_then(|e| self.servable(e.nvrtc).map(|()| e))
        {
            Ok(e) => {
                let seconds = start.elapsed().as_secs_f64();
                log::info!(
                    "loaded {} for {arch} from {} in {seconds:.3} s",
                    tu.name,
                    disk.path(key).display()
                );
                Ok(CompiledKernel {
                    cubin: e.cubin,
                    entry: e.entry,
                    stats: e.stats,
                    log: e.log,
                    origin: Origin::Disk,
                    seconds,
                    nvrtc: e.nvrtc,
                })
            }
            Err(miss) => {
                let untrusted = !matches!(
                    miss,
                    Miss::NoFile | Miss::DirUnusable(_) | Miss::OtherNvrtc { .. }
                );
                if self.config.compile && untrusted {
                    log::warn!(
                        "ignoring cache entry {}: {miss}; recompiling",
                        disk.path(key).display()
                    );
                } else if let Miss::OtherNvrtc { .. } = miss {
                    // A toolkit upgrade: expected, and the cache follows it.
                    log::info!("{}: {miss}; recompiling", disk.path(key).display());
                }
                Err(miss)
            }
        }
    }

    fn compile_and_store(
        &self,
        tu: &TranslationUnit,
        arch: Arch,
        key: &str,
        key_text: &str,
    ) -> Result<CompiledKernel> {
        let made_by = nvrtc::version()?;
        let made_by = (made_by.0 as u32, made_by.1 as u32);
        if let Some(driver) = toolkit::driver_version() {
            toolkit::check_driver(driver, made_by).map_err(Error::CudaUnavailable)?;
        }
        // "SoftCap.prefill_hd128_bf16_q64_sm90a" reads as "SoftCap prefill_hd128_bf16_q64_sm90a".
        let shown = tu.name.replacen('.', " ", 1);
        if self.announce {
            eprintln!("ferrinfer: compiling {shown} for {arch}...");
        }
        let start = Instant::now();
        let out = nvrtc::compile(tu, &nvrtc::options(arch, &self.config.extra_options))?;
        let seconds = start.elapsed().as_secs_f64();
        if self.announce {
            eprintln!(
                "ferrinfer: compiled {shown} for {arch} in {seconds:.2} s ({})",
                out.stats
            );
        }
        log::info!(
            "compiled {} for {arch} in {seconds:.3} s with NVRTC {}.{}: {}",
            tu.name,
            made_by.0,
            made_by.1,
            out.stats
        );
        let kernel = CompiledKernel {
            cubin: out.cubin,
            entry: tu.entry.clone(),
            stats: out.stats,
            log: out.log,
            origin: Origin::Compiled,
            seconds,
            nvrtc: made_by,
        };
        if let Ok(disk) = &self.disk
            && disk.read_only().is_none()
        {
            let entry = cache::Entry {
                key_text: key_text.to_string(),
                entry: kernel.entry.clone(),
                stats: kernel.stats,
                nvrtc: kernel.nvrtc,
                log: kernel.log.clone(),
                cubin: kernel.cubin.clone(),
            };
            // A full disk or a permission change must not fail the compile: the kernel is kept in
            // memory either way.
            if let Err(e) = disk.store(key, &entry) {
                let path = disk.path(key);
                if self.store_failure_logged.swap(true, Ordering::Relaxed) {
                    log::debug!("could not write {}: {e}", path.display());
                } else {
                    log::warn!(
                        "could not write {} ({e}): compiled kernels are kept in memory only; \
                         further write failures are logged at debug level",
                        path.display()
                    );
                }
            }
        }
        Ok(kernel)
    }
}

/// Lock, ignoring poison: a panic elsewhere leaves the cache maps consistent (inserts are atomic).
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
