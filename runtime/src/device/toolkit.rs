//! Finding and loading CUDA's libraries ourselves, whatever cudarc was built with.
//!
//! NVRTC is opened here by full path and called through our own symbol table
//! ([`NvrtcLibrary`]), never through cudarc: cudarc's by-name lookup depends on the CUDA version
//! feature the dependency graph picked (a `cuda-12040` build never looks for `libnvrtc.so.13`),
//! and its `dynamic-linking` mode (candle's) has no loader at all. So NVRTC 12.x and 13.x both
//! work under any cudarc feature set. When several are installed the newest one the driver can run
//! wins (see [`nvrtc_library`]). The driver (`libcuda.so.1`, a name cudarc always tries) is
//! preloaded with `RTLD_GLOBAL` so that cudarc's own `dlopen` finds it. Absence becomes an
//! [`Unavailable`] whose message says where we looked and how to fix it.
//!
//! A leaf: it imports nothing of ours, so its callers map [`Unavailable`] to their own error
//! (the runtime's is `Error::CudaUnavailable`).

use std::fmt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use libloading::os::unix::{Library, RTLD_GLOBAL, RTLD_LOCAL, RTLD_NOW};

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
pub(crate) const LIB_DIRS: [&str; 3] = ["lib64", "lib", "targets/x86_64-linux/lib"];

/// The NVRTC major versions we accept, newest first. Our kernels include no CUDA header and use
/// nothing newer than PTX ISA 8.0 (CUDA 12.0), so every release of these compiles them.
pub const NVRTC_MAJORS: [u32; 2] = [13, 12];

/// Where pip's NVRTC wheels put their root, below `site-packages/nvidia/`: CUDA 13's
/// `nvidia-cuda-nvrtc` (`cu13/lib`), CUDA 12's `nvidia-cuda-nvrtc-cu12` (`cuda_nvrtc/lib`).
const PIP_ROOTS: [&str; 2] = ["cu13", "cuda_nvrtc"];

/// What the NVRTC discovery error says of NVRTCs skipped because the driver cannot run their code.
pub const TOO_NEW: &str = "newer than this driver supports";

/// Where drivers are installed when the system loader does not know the directory.
const DRIVER_DIRS: [&str; 4] = [
    "/usr/local/nvidia/lib64",
    "/usr/lib/x86_64-linux-gnu",
    "/usr/lib64",
    "/usr/lib/wsl/lib",
];

/// The NVRTC in use: where it was found, its version, and the open library (never closed).
pub struct NvrtcLibrary {
    /// The CUDA root it came from; `None` when the system loader found it (`LD_LIBRARY_PATH`).
    root: Option<PathBuf>,
    /// The `libnvrtc.so.N` file (or soname) that was opened.
    path: PathBuf,
    /// `nvrtcVersion()`: (major, minor).
    version: (u32, u32),
    lib: Library,
}

impl NvrtcLibrary {
    /// The CUDA root it came from; `None` when the system loader found it.
    pub fn root(&self) -> Option<&Path> {
        self.root.as_deref()
    }

    /// The library file that was opened.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Its version, (major, minor), as `nvrtcVersion` reports it.
    pub fn version(&self) -> (u32, u32) {
        self.version
    }

    /// The function `name` of the library.
    ///
    /// # Safety
    /// `F` must be the exact C signature of `name` in the NVRTC API.
    pub unsafe fn symbol<F: Copy>(&self, name: &str) -> Result<F, Unavailable> {
        // SAFETY: the caller guarantees the signature; the library is never unloaded.
        unsafe { self.lib.get::<F>(name.as_bytes()) }
            .map(|s| *s)
            .map_err(|e| {
                Unavailable(format!(
                    "{} has no function {name} ({e}): not an NVRTC this build supports",
                    self.path.display()
                ))
            })
    }
}

/// Make NVRTC loadable, or say why not. Cheap after the first call: the outcome is cached for the
/// life of the process.
pub fn load_nvrtc() -> Result<(), Unavailable> {
    nvrtc_library().map(|_| ())
}

/// The CUDA root NVRTC was loaded from, or `None` if it came from the system loader or is absent.
pub fn cuda_root() -> Option<PathBuf> {
    nvrtc_library().ok().and_then(|n| n.root.clone())
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
            .or_else(|| {
                // pip: CUDA 13's headers in nvidia/cu13, CUDA 12's (nvidia-cuda-runtime-cu12) in
                // nvidia/cuda_runtime.
                let purelib = python_purelib()?;
                ["cu13", "cuda_runtime"]
                    .iter()
                    .find_map(|r| include(&purelib.join("nvidia").join(r)))
            })
    })
    .clone()
}

/// The NVRTC to compile with, found and opened on first use.
///
/// Search order: `$CUDA_HOME` and `$CUDA_PATH` (an explicit choice wins when it holds a usable
/// NVRTC), then `/usr/local/cuda`, pip's wheels in the usual package directories, the system
/// loader, and last the running `python3`'s site-packages. Among the NVRTCs of one of those two
/// groups the newest major version the driver can run wins: when `libcuda` is loadable its CUDA
/// version caps the choice (a CUBIN from NVRTC 13 does not load on a CUDA 12 driver); with no
/// driver (a build machine) the newest wins.
pub fn nvrtc_library() -> Result<&'static NvrtcLibrary, Unavailable> {
    static NVRTC: OnceLock<Result<NvrtcLibrary, String>> = OnceLock::new();
    NVRTC
        .get_or_init(discover_nvrtc)
        .as_ref()
        .map_err(|m| Unavailable(m.clone()))
}

/// One `libnvrtc.so.N` found on disk.
struct Found {
    root: PathBuf,
    dir: PathBuf,
    major: u32,
}

/// `FERRINFER_NVRTC`: `none` forbids loading NVRTC (a serving process that must run from its
/// kernel cache alone), a path to `libnvrtc.so.N` picks that library and no other.
const NVRTC_VAR: &str = "FERRINFER_NVRTC";

fn discover_nvrtc() -> Result<NvrtcLibrary, String> {
    match std::env::var(NVRTC_VAR) {
        Ok(v) if v == "none" => {
            return Err(format!(
                "NVRTC is switched off ({NVRTC_VAR}=none): kernels can only come from the kernel \
                 cache. To fix: unset {NVRTC_VAR}, or fill the cache ahead of time"
            ));
        }
        Ok(v) if !v.is_empty() => return explicit_nvrtc(Path::new(&v)),
        _ => {}
    }
    let driver_major = driver_version().map(|(major, _)| major);
    let mut tried = Vec::new();
    let mut failures = Vec::new();
    let mut too_new = Vec::new();
    let explicit: Vec<PathBuf> = [env_path("CUDA_HOME"), env_path("CUDA_PATH")]
        .into_iter()
        .flatten()
        .collect();
    let mut others = vec![PathBuf::from("/usr/local/cuda")];
    for pattern in pip_patterns() {
        others.extend(expand(&pattern));
    }
    for group in [explicit, others] {
        let found = scan(&group, &mut tried);
        if let Some(lib) = pick(found, driver_major, &mut too_new, &mut failures) {
            if !too_new.is_empty() {
                // Most likely CUDA_HOME names a toolkit newer than the driver: say why it was passed over.
                log::warn!(
                    "NVRTC {} ({}) is used instead of {}, which is newer than this driver supports",
                    lib.version.0,
                    lib.path.display(),
                    too_new.join(", ")
                );
            }
            return Ok(lib);
        }
    }
    // Globs that matched nothing are still worth naming in the error.
    tried.extend(pip_patterns().into_iter().filter(|p| expand(p).is_empty()));
    for major in NVRTC_MAJORS {
        if driver_major.is_some_and(|d| major > d) {
            continue;
        }
        let name = PathBuf::from(format!("libnvrtc.so.{major}"));
        if let Ok(lib) = open_local(&name) {
            log::info!("NVRTC {major} found by the system loader");
            match finish_open(lib, name, major) {
                Ok(lib) => return Ok(lib),
                Err(e) => failures.push(e),
            }
        }
    }
    // Last resort, since it spawns a process: the running Python's site-packages.
    if let Some(purelib) = python_purelib() {
        let roots: Vec<PathBuf> = PIP_ROOTS.map(|r| purelib.join("nvidia").join(r)).into();
        let found = scan(&roots, &mut tried);
        if let Some(lib) = pick(found, driver_major, &mut too_new, &mut failures) {
            return Ok(lib);
        }
    } else {
        tried.push(PathBuf::from("(python3 sysconfig purelib: not available)"));
    }
    let mut msg = not_found_message(&tried);
    if let (false, Some(d)) = (too_new.is_empty(), driver_version()) {
        msg.push_str(&format!(
            "\nFound but {TOO_NEW} (CUDA {}.{}): {}. {}",
            d.0,
            d.1,
            too_new.join(", "),
            driver_advice(d)
        ));
    }
    if !failures.is_empty() {
        msg.push_str("\nFound but not usable:");
        for f in failures {
            msg.push_str("\n  ");
            msg.push_str(&f);
        }
    }
    Err(msg)
}

/// The NVRTC library that `FERRINFER_NVRTC` names, or why it cannot be used.
fn explicit_nvrtc(path: &Path) -> Result<NvrtcLibrary, String> {
    let bad = |why: &str| {
        format!(
            "{NVRTC_VAR}={}: {why}; expected the path of a libnvrtc.so.12 or libnvrtc.so.13 (with \
             its libnvrtc-builtins beside it), or `none`",
            path.display()
        )
    };
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
    let major = name
        .strip_prefix("libnvrtc.so.")
        .and_then(|v| v.split('.').next()?.parse::<u32>().ok())
        .filter(|m| NVRTC_MAJORS.contains(m))
        .ok_or_else(|| bad("not a libnvrtc.so.12 or .13 file name"))?;
    let dir = path.parent().ok_or_else(|| bad("no directory"))?;
    if !path.exists() {
        return Err(bad("no such file"));
    }
    let lib = open_nvrtc(dir, major).map_err(|e| bad(&e))?;
    if let Some(d) = driver_version() {
        check_driver(d, lib.version).map_err(|e| bad(&e))?;
    }
    Ok(NvrtcLibrary {
        root: dir.parent().map(Path::to_path_buf),
        ..lib
    })
}

/// Open the newest of `found` that the driver (of CUDA major `driver_major`, if known) can run,
/// noting those skipped as too new and those that failed to open.
fn pick(
    mut found: Vec<Found>,
    driver_major: Option<u32>,
    too_new: &mut Vec<String>,
    failures: &mut Vec<String>,
) -> Option<NvrtcLibrary> {
    // Newest first; stable, so roots keep their order within one version.
    found.sort_by_key(|f| std::cmp::Reverse(f.major));
    for f in found {
        if driver_major.is_some_and(|d| f.major > d) {
            too_new.push(format!("{} (NVRTC {})", f.dir.display(), f.major));
            continue;
        }
        match open_nvrtc(&f.dir, f.major) {
            Ok(lib) => {
                return Some(NvrtcLibrary {
                    root: Some(f.root),
                    ..lib
                });
            }
            Err(e) => failures.push(e),
        }
    }
    None
}

/// Every `libnvrtc.so.N` (N in [`NVRTC_MAJORS`]) in the library directories of `roots`, noting
/// each directory looked in.
fn scan(roots: &[PathBuf], tried: &mut Vec<PathBuf>) -> Vec<Found> {
    let mut found = Vec::new();
    for root in roots {
        for dir in LIB_DIRS.map(|d| root.join(d)) {
            tried.push(dir.clone());
            for major in NVRTC_MAJORS {
                if dir.join(format!("libnvrtc.so.{major}")).exists() {
                    found.push(Found {
                        root: root.clone(),
                        dir: dir.clone(),
                        major,
                    });
                }
            }
        }
    }
    found
}

/// Open `libnvrtc.so.{major}` of `dir`, its builtins library first (NVRTC `dlopen`s the builtins
/// by soname, which then matches the one already loaded, whatever `LD_LIBRARY_PATH` says).
fn open_nvrtc(dir: &Path, major: u32) -> Result<NvrtcLibrary, String> {
    let builtins = find_versioned(dir, &format!("libnvrtc-builtins.so.{major}"))
        .ok_or_else(|| format!("{}: no libnvrtc-builtins.so.{major}.*", dir.display()))?;
    // Local, never closed: two NVRTC versions in one process must not interpose on each other.
    std::mem::forget(open_local(&builtins)?);
    let path = dir.join(format!("libnvrtc.so.{major}"));
    let lib = open_local(&path)?;
    let lib = finish_open(lib, path, major)?;
    log::info!(
        "NVRTC {}.{} loaded from {}",
        lib.version.0,
        lib.version.1,
        lib.path.display()
    );
    Ok(lib)
}

/// Ask an opened NVRTC its version and check it is the major its file name says.
fn finish_open(lib: Library, path: PathBuf, major: u32) -> Result<NvrtcLibrary, String> {
    type VersionFn = unsafe extern "C" fn(*mut i32, *mut i32) -> i32;
    // SAFETY: nvrtcVersion(int*, int*) -> nvrtcResult is its C signature in every NVRTC release.
    let version: VersionFn = unsafe { lib.get::<VersionFn>(b"nvrtcVersion") }
        .map(|s| *s)
        .map_err(|e| format!("{}: no nvrtcVersion ({e})", path.display()))?;
    let (mut got_major, mut got_minor) = (0i32, 0i32);
    // SAFETY: both pointers are valid for writes for the duration of the call.
    let rc = unsafe { version(&mut got_major, &mut got_minor) };
    if rc != 0 || got_major as u32 != major {
        return Err(format!(
            "{}: nvrtcVersion returned {rc} and {got_major}.{got_minor}, expected {major}.x",
            path.display()
        ));
    }
    Ok(NvrtcLibrary {
        root: None,
        path,
        version: (got_major as u32, got_minor as u32),
        lib,
    })
}

/// The message for "NVRTC not found", listing every library directory tried. A pure function so
/// that its wording can be tested on any machine.
pub fn not_found_message(tried: &[PathBuf]) -> String {
    let mut msg = String::from(
        "NVRTC 12.x or 13.x (libnvrtc.so.12 or .13 with libnvrtc-builtins) was not found by the \
         system loader (LD_LIBRARY_PATH) nor in any of these directories:",
    );
    for p in tried {
        msg.push_str("\n  ");
        msg.push_str(&p.display().to_string());
    }
    msg.push_str(
        "\nTo fix: set CUDA_HOME to a CUDA 12 or 13 toolkit (the directory that has \
         lib64/libnvrtc.so.*), or `pip install nvidia-cuda-nvrtc==13.0.88` (CUDA 13, driver 580 or \
         newer) or `pip install nvidia-cuda-nvrtc-cu12==12.4.127` (CUDA 12, driver 550 or newer). \
         With FERRINFER_NO_JIT=1 and a kernel cache filled ahead of time, no NVRTC is needed.",
    );
    msg
}

/// The oldest Linux driver ferrinfer runs on for each NVRTC major version: CUDA 12.4's for 12.x
/// (ferrinfer's floor; CUBINs of any 12.x load there, by CUDA's minor-version compatibility) and
/// CUDA 13.0's for 13.x (NVIDIA's CUDA release notes).
const DRIVER_FLOOR: [(u32, &str); 2] = [(12, "550.54.14"), (13, "580.65.06")];

/// Whether a driver of CUDA version `driver` (as `cuDriverGetVersion` reports it: 12040 is 12.4)
/// can load CUBINs made by NVRTC `nvrtc`; `Err` is the explanation to show. The runtime also needs
/// CUDA 12.4 or newer from the driver (the floor of the cudarc bindings it is built with).
pub fn check_driver(driver: (u32, u32), nvrtc: (u32, u32)) -> Result<(), String> {
    if driver < (12, 4) {
        return Err(format!(
            "the CUDA driver supports CUDA {}.{}, older than the CUDA 12.4 ferrinfer needs. {}",
            driver.0,
            driver.1,
            driver_advice(driver)
        ));
    }
    if nvrtc.0 > driver.0 {
        let floor = DRIVER_FLOOR
            .iter()
            .find(|(m, _)| *m == nvrtc.0)
            .map_or("a newer driver", |(_, v)| v);
        return Err(format!(
            "kernels compiled by NVRTC {}.{} need a driver for CUDA {}.x (Linux {floor} or newer), \
             but this driver supports CUDA {}.{}. To fix: update the driver, or compile with NVRTC \
             {}.x (`pip install nvidia-cuda-nvrtc-cu12==12.4.127` and point CUDA_HOME at its \
             site-packages/nvidia/cuda_nvrtc), and refill the kernel cache with it",
            nvrtc.0, nvrtc.1, nvrtc.0, driver.0, driver.1, driver.0
        ));
    }
    Ok(())
}

fn driver_advice(driver: (u32, u32)) -> String {
    format!(
        "To fix: update the NVIDIA driver (CUDA 12.4 needs Linux driver {} or newer, CUDA 13.x {}), \
         or use an NVRTC no newer than CUDA {}.x",
        DRIVER_FLOOR[0].1, DRIVER_FLOOR[1].1, driver.0
    )
}

/// The CUDA version the driver supports, `(12, 4)` for 12.4, if a driver is loadable (`None` on a
/// machine without one). Cached after the first call.
pub fn driver_version() -> Option<(u32, u32)> {
    static VERSION: OnceLock<Option<(u32, u32)>> = OnceLock::new();
    *VERSION.get_or_init(|| {
        load_driver().ok()?;
        let mut v = 0i32;
        // SAFETY: the driver library is loaded (above), and `v` is valid for writes.
        // cuDriverGetVersion needs no cuInit.
        let rc = unsafe { cudarc::driver::sys::cuDriverGetVersion(&mut v) };
        (rc == cudarc::driver::sys::CUresult::CUDA_SUCCESS && v > 0)
            .then_some((v as u32 / 1000, (v as u32 % 1000) / 10))
    })
}

/// The shortest `prefix*` file in `dir` (`libnvrtc-builtins.so.13.0` rather than a longer alias).
fn find_versioned(dir: &Path, prefix: &str) -> Option<PathBuf> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with(prefix) && !n.contains(".alt."))
        .collect();
    names.sort_by_key(|n| (n.len(), n.clone()));
    names.first().map(|n| dir.join(n))
}

/// dlopen with `RTLD_NOW | RTLD_LOCAL`.
fn open_local(path: &Path) -> Result<Library, String> {
    // SAFETY: loading a CUDA library runs its initialisers, which have no preconditions on us.
    unsafe { Library::open(Some(path), RTLD_NOW | RTLD_LOCAL) }
        .map_err(|e| format!("{}: {e}", path.display()))
}

/// dlopen with `RTLD_NOW | RTLD_GLOBAL` and never close: cudarc relies on it staying loaded.
fn open_global(path: &Path) -> Result<(), String> {
    // SAFETY: loading a CUDA library runs its initialisers, which have no preconditions on us.
    let lib = unsafe { Library::open(Some(path), RTLD_NOW | RTLD_GLOBAL) }
        .map_err(|e| format!("{}: {e}", path.display()))?;
    std::mem::forget(lib);
    Ok(())
}

/// CUDA roots to search, in order: `$CUDA_HOME`, `$CUDA_PATH`, `/usr/local/cuda`, then pip's
/// `nvidia/cu13` and `nvidia/cuda_nvrtc` in the usual Python package directories (existing ones
/// only).
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

/// pip's CUDA roots in the usual package directories, as globs.
fn pip_patterns() -> Vec<PathBuf> {
    site_patterns()
        .into_iter()
        .flat_map(|s| PIP_ROOTS.map(|r| s.join("nvidia").join(r)))
        .collect()
}

/// The usual Python package directories, as globs (`*` in a component).
pub(crate) fn site_patterns() -> Vec<PathBuf> {
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
    sites
}

pub(crate) fn env_path(key: &str) -> Option<PathBuf> {
    std::env::var_os(key)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

/// Expand `*` in path components (one `*` per component), keeping existing directories only.
pub(crate) fn expand(pattern: &Path) -> Vec<PathBuf> {
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
pub(crate) fn python_purelib() -> Option<PathBuf> {
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
        // cudarc's loader tries `libcuda.so.1` among its names, which now matches the loaded
        // soname; with `dynamic-linking` the binary links it anyway.
        match open_global(&path) {
            Ok(()) => {
                log::info!("CUDA driver loaded from {}", path.display());
                return Ok(());
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

#[cfg(test)]
mod tests {
    use super::*;

    fn found(major: u32) -> Found {
        Found {
            root: PathBuf::from(format!("/nonexistent/cuda-{major}")),
            dir: PathBuf::from(format!("/nonexistent/cuda-{major}/lib64")),
            major,
        }
    }

    /// The directories `pick` tried to open, in order, and those it skipped as too new.
    fn tried(driver_major: Option<u32>) -> (Vec<String>, Vec<String>) {
        let (mut too_new, mut failures) = (Vec::new(), Vec::new());
        let lib = pick(
            vec![found(12), found(13)],
            driver_major,
            &mut too_new,
            &mut failures,
        );
        assert!(lib.is_none(), "nothing to open under /nonexistent");
        (failures, too_new)
    }

    #[test]
    fn the_newest_nvrtc_the_driver_can_run_comes_first() {
        let (opened, skipped) = tried(None);
        assert_eq!(opened.len(), 2);
        assert!(
            opened[0].contains("cuda-13") && opened[1].contains("cuda-12"),
            "{opened:?}"
        );
        assert!(skipped.is_empty());

        let (opened, skipped) = tried(Some(12));
        assert_eq!(opened.len(), 1);
        assert!(opened[0].contains("cuda-12"), "{opened:?}");
        assert_eq!(skipped, ["/nonexistent/cuda-13/lib64 (NVRTC 13)"]);

        assert_eq!(tried(Some(13)).0.len(), 2);
    }

    #[test]
    fn an_explicit_nvrtc_path_must_name_a_known_major() {
        for bad in ["/x/libnvrtc.so.11", "/x/libcuda.so.1", "/x/libnvrtc.so"] {
            let e = explicit_nvrtc(Path::new(bad)).err().unwrap();
            assert!(
                e.contains(bad) && e.contains("libnvrtc.so.12 or .13"),
                "{e}"
            );
        }
        let e = explicit_nvrtc(Path::new("/nonexistent/libnvrtc.so.12"))
            .err()
            .unwrap();
        assert!(e.contains("no such file"), "{e}");
    }
}
