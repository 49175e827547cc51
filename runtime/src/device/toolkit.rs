//! Finding and loading CUDA's libraries before cudarc touches them.
//!
//! cudarc (with `dynamic-loading`) opens libnvrtc and libcuda by name and panics when the system
//! loader cannot find them. So we look for them ourselves, load them by full path with
//! `RTLD_GLOBAL` and keep them loaded forever: cudarc's later by-name `dlopen` then matches the
//! already-loaded soname, and NVRTC's own `dlopen` of libnvrtc-builtins does too. Absence becomes
//! an [`Unavailable`] whose message says where we looked and how to fix it.
//!
//! A leaf: it imports nothing of ours, so its callers map [`Unavailable`] to their own error
//! (the runtime's is `Error::CudaUnavailable`).

use std::fmt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use libloading::os::unix::{Library, RTLD_GLOBAL, RTLD_NOW};

/// A CUDA library could not be found or loaded. The message names every place looked in, and the
/// fix.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unavailable(String);

impl Unavailable {
    /// The message: where we looked, what failed, how to fix it.
    pub fn message(&self) -> &str {
        &self.0
    }

    /// The message, by value.
    pub fn into_message(self) -> String {
        self.0
    }
}

impl fmt::Display for Unavailable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Unavailable {}

/// Library directories inside a CUDA root, in search order.
const LIB_DIRS: [&str; 3] = ["lib64", "lib", "targets/x86_64-linux/lib"];

/// Where drivers are installed when the system loader does not know the directory.
const DRIVER_DIRS: [&str; 4] = [
    "/usr/local/nvidia/lib64",
    "/usr/lib/x86_64-linux-gnu",
    "/usr/lib64",
    "/usr/lib/wsl/lib",
];

/// Where NVRTC was found.
struct Nvrtc {
    /// The CUDA root it came from; `None` when the system loader found it (`LD_LIBRARY_PATH`).
    root: Option<PathBuf>,
}

/// Make NVRTC (and its builtins library) loadable for cudarc, or say why not. Cheap after the
/// first call: the outcome is cached for the life of the process.
pub fn load_nvrtc() -> Result<(), Unavailable> {
    nvrtc().map(|_| ())
}

/// The CUDA root NVRTC was loaded from, or `None` if it came from the system loader or is absent.
pub fn cuda_root() -> Option<PathBuf> {
    nvrtc().ok().and_then(|n| n.root.clone())
}

/// `<root>/include` of the first CUDA root that has `cuda_fp16.h` (the root NVRTC came from first),
/// for users whose own kernels include CUDA headers. ferrinfer's kernels are self-contained.
pub fn cuda_include_dir() -> Option<PathBuf> {
    static DIR: OnceLock<Option<PathBuf>> = OnceLock::new();
    DIR.get_or_init(|| {
        let include = |root: &Path| {
            let dir = root.join("include");
            dir.join("cuda_fp16.h").is_file().then_some(dir)
        };
        cuda_root()
            .and_then(|r| include(&r))
            .or_else(|| candidate_roots().iter().find_map(|r| include(r)))
            .or_else(|| python_purelib().and_then(|p| include(&p.join("nvidia/cu13"))))
    })
    .clone()
}

fn nvrtc() -> Result<&'static Nvrtc, Unavailable> {
    static NVRTC: OnceLock<Result<Nvrtc, String>> = OnceLock::new();
    NVRTC
        .get_or_init(discover_nvrtc)
        .as_ref()
        .map_err(|m| Unavailable(m.clone()))
}

fn discover_nvrtc() -> Result<Nvrtc, String> {
    let mut tried = Vec::new();
    let mut failures = Vec::new();
    let mut try_root = |root: &Path, tried: &mut Vec<PathBuf>| -> bool {
        for lib_dir in LIB_DIRS.map(|d| root.join(d)) {
            tried.push(lib_dir.clone());
            match load_nvrtc_from(&lib_dir) {
                Ok(true) => return true,
                Ok(false) => {}
                Err(e) => failures.push(e),
            }
        }
        false
    };
    for root in candidate_roots() {
        if try_root(&root, &mut tried) {
            return Ok(Nvrtc { root: Some(root) });
        }
    }
    // Globs that matched nothing are still worth naming in the error.
    tried.extend(pip_patterns().into_iter().filter(|p| expand(p).is_empty()));
    // SAFETY: only dlopens libnvrtc by the names cudarc itself would use, and closes it again.
    if unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        log::info!("NVRTC found by the system loader");
        return Ok(Nvrtc { root: None });
    }
    // Last resort, since it spawns a process: the running Python's site-packages.
    if let Some(purelib) = python_purelib() {
        let root = purelib.join("nvidia/cu13");
        if try_root(&root, &mut tried) {
            return Ok(Nvrtc { root: Some(root) });
        }
    } else {
        tried.push(PathBuf::from("(python3 sysconfig purelib: not available)"));
    }
    let mut msg = not_found_message(&tried);
    if !failures.is_empty() {
        msg.push_str("\nFound but not usable:");
        for f in failures {
            msg.push_str("\n  ");
            msg.push_str(&f);
        }
    }
    Err(msg)
}

/// The message for "NVRTC not found", listing every library directory tried. A pure function so
/// that its wording can be tested on any machine.
pub fn not_found_message(tried: &[PathBuf]) -> String {
    let mut msg = String::from(
        "NVRTC (libnvrtc.so.* with libnvrtc-builtins.so.*) was not found by the system loader \
         (LD_LIBRARY_PATH) nor in any of these directories:",
    );
    for p in tried {
        msg.push_str("\n  ");
        msg.push_str(&p.display().to_string());
    }
    msg.push_str(
        "\nTo fix: set CUDA_HOME to a CUDA 13 toolkit (the directory that has lib64/libnvrtc.so.13), \
         or `pip install nvidia-cuda-nvrtc==13.0.88` and set CUDA_HOME to its site-packages/nvidia/cu13.",
    );
    msg
}

/// Load builtins then NVRTC from `dir`. `Ok(false)`: not there; `Err`: there but unusable.
fn load_nvrtc_from(dir: &Path) -> Result<bool, String> {
    let (Some(builtins), Some(nvrtc)) = (
        find_versioned(dir, "libnvrtc-builtins.so."),
        find_versioned(dir, "libnvrtc.so."),
    ) else {
        return Ok(false);
    };
    open_global(&builtins)?;
    open_global(&nvrtc)?;
    // cudarc opens by soname; a version it does not know (libnvrtc.so.14...) would make it panic.
    // SAFETY: only dlopens libnvrtc by the names cudarc itself would use, and closes it again.
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        return Err(format!(
            "{} was loaded but cudarc cannot open it by name (unexpected soname version)",
            nvrtc.display()
        ));
    }
    log::info!("NVRTC loaded from {}", nvrtc.display());
    Ok(true)
}

/// The shortest `prefix*` file in `dir` (`libnvrtc.so.13` rather than `libnvrtc.so.13.0.88`).
fn find_versioned(dir: &Path, prefix: &str) -> Option<PathBuf> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with(prefix))
        .collect();
    names.sort_by_key(|n| (n.len(), n.clone()));
    names.first().map(|n| dir.join(n))
}

/// dlopen with `RTLD_NOW | RTLD_GLOBAL` and never close: cudarc and NVRTC rely on it staying loaded.
fn open_global(path: &Path) -> Result<(), String> {
    // SAFETY: loading a CUDA library runs its initialisers, which have no preconditions on us.
    let lib = unsafe { Library::open(Some(path), RTLD_NOW | RTLD_GLOBAL) }
        .map_err(|e| format!("{}: {e}", path.display()))?;
    std::mem::forget(lib);
    Ok(())
}

/// CUDA roots to search, in order: `$CUDA_HOME`, `$CUDA_PATH`, `/usr/local/cuda`, then pip's
/// `nvidia/cu13` in the usual Python package directories (existing ones only).
pub fn candidate_roots() -> Vec<PathBuf> {
    let mut roots: Vec<PathBuf> = [env_path("CUDA_HOME"), env_path("CUDA_PATH")]
        .into_iter()
        .flatten()
        .collect();
    roots.push(PathBuf::from("/usr/local/cuda"));
    for pattern in pip_patterns() {
        roots.extend(expand(&pattern));
    }
    roots
}

/// pip's CUDA 13 root in the usual package directories, as globs.
fn pip_patterns() -> Vec<PathBuf> {
    let mut sites = Vec::new();
    if let Some(venv) = env_path("VIRTUAL_ENV") {
        sites.push(venv.join("lib/python3*/site-packages"));
    }
    let home = env_path("HOME");
    if let Some(home) = &home {
        sites.push(home.join(".local/lib/python3*/site-packages"));
    }
    sites.push(PathBuf::from("/usr/local/lib/python3*/dist-packages"));
    sites.push(PathBuf::from("/usr/local/lib/python3*/site-packages"));
    sites.push(PathBuf::from("/usr/lib/python3/dist-packages"));
    if let Some(home) = &home {
        sites.push(home.join(".pyenv/versions/*/lib/python3*/site-packages"));
    }
    sites.into_iter().map(|s| s.join("nvidia/cu13")).collect()
}

fn env_path(key: &str) -> Option<PathBuf> {
    std::env::var_os(key)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

/// Expand `*` in path components (one `*` per component), keeping existing directories only.
fn expand(pattern: &Path) -> Vec<PathBuf> {
    let mut found = vec![PathBuf::new()];
    for comp in pattern.components() {
        let comp = comp.as_os_str().to_string_lossy();
        let Some((pre, post)) = comp.split_once('*') else {
            found.iter_mut().for_each(|p| p.push(&*comp));
            continue;
        };
        let mut next = Vec::new();
        for dir in &found {
            let Ok(entries) = std::fs::read_dir(dir) else {
                continue;
            };
            for name in entries.filter_map(|e| e.ok()?.file_name().into_string().ok()) {
                if name.len() >= pre.len() + post.len()
                    && name.starts_with(pre)
                    && name.ends_with(post)
                {
                    next.push(dir.join(name));
                }
            }
        }
        next.sort();
        found = next;
    }
    found.retain(|p| p.is_dir());
    found
}

/// Ask `python3` where its packages go (covers conda, uv and other layouts we do not list).
fn python_purelib() -> Option<PathBuf> {
    static PURELIB: OnceLock<Option<PathBuf>> = OnceLock::new();
    PURELIB
        .get_or_init(|| {
            let out = Command::new("python3")
                .args([
                    "-c",
                    "import sysconfig; print(sysconfig.get_paths()['purelib'])",
                ])
                .output()
                .ok()?;
            let path = String::from_utf8(out.stdout).ok()?;
            let path = path.trim();
            (out.status.success() && !path.is_empty()).then(|| PathBuf::from(path))
        })
        .clone()
}

/// Load the CUDA driver library (libcuda.so.1), or say why not. Cheap after the first call.
pub fn load_driver() -> Result<(), Unavailable> {
    static DRIVER: OnceLock<Result<(), String>> = OnceLock::new();
    DRIVER
        .get_or_init(discover_driver)
        .clone()
        .map_err(Unavailable)
}

fn discover_driver() -> Result<(), String> {
    let candidates = std::iter::once(PathBuf::from("libcuda.so.1")).chain(
        DRIVER_DIRS
            .iter()
            .map(|d| Path::new(d).join("libcuda.so.1")),
    );
    let mut failures = Vec::new();
    for path in candidates {
        if path.is_absolute() && !path.exists() {
            continue;
        }
        match open_global(&path) {
            Ok(()) => {
                // SAFETY: only dlopens libcuda by the names cudarc itself would use, and closes it.
                if unsafe { cudarc::driver::sys::is_culib_present() } {
                    log::info!("CUDA driver loaded from {}", path.display());
                    return Ok(());
                }
                failures.push(format!(
                    "{}: loaded, but cudarc cannot open it by name",
                    path.display()
                ));
            }
            Err(e) => failures.push(e),
        }
    }
    let mut msg = driver_not_found_message();
    for f in failures.iter().filter(|f| !f.starts_with("libcuda.so.1:")) {
        msg.push_str("\n  ");
        msg.push_str(f);
    }
    Err(msg)
}

/// The message for "no CUDA driver", naming every place looked in.
pub fn driver_not_found_message() -> String {
    format!(
        "no CUDA driver (libcuda.so.1) found in the system loader path (LD_LIBRARY_PATH, ld.so.cache) \
         or in {}: this machine has no NVIDIA GPU driver (or its directory must be added to \
         LD_LIBRARY_PATH)",
        DRIVER_DIRS.join(", ")
    )
}
