//! Finding libnccl at run time, as NVRTC is found (`device::toolkit`): NCCL ships as
//! `libnccl.so.2`, in a CUDA installation or in pip's `nvidia-nccl-cu12`/`-cu13` wheels
//! (`site-packages/nvidia/nccl/lib`). cudarc's own loader asks only for names such as
//! `libnccl.so` and `libnccl.so.<CUDA major>`, which neither provides, and panics when none
//! opens; so the library is opened here by full path and its few entry points are called through
//! this table, with cudarc's `nccl::sys` types for the ABI.

use std::ffi::{CStr, c_char, c_int, c_void};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use cudarc::nccl::sys::{cudaStream_t, ncclComm_t, ncclUniqueId};
use libloading::os::unix::{Library, RTLD_LOCAL, RTLD_NOW};

use crate::device::toolkit;
use crate::error::{Error, Result};

/// `FERRINFER_NCCL`: the path of the `libnccl.so.2` to use, and no other.
const NCCL_VAR: &str = "FERRINFER_NCCL";
const SONAME: &str = "libnccl.so.2";

// NCCL's C signatures; results and data types as their C `int` values.
type GetUniqueId = unsafe extern "C" fn(*mut ncclUniqueId) -> c_int;
type CommInitRank = unsafe extern "C" fn(*mut ncclComm_t, c_int, ncclUniqueId, c_int) -> c_int;
type CommDestroy = unsafe extern "C" fn(ncclComm_t) -> c_int;
type AllGather = unsafe extern "C" fn(
    *const c_void,
    *mut c_void,
    usize,
    c_int,
    ncclComm_t,
    cudaStream_t,
) -> c_int;
type AllReduce = unsafe extern "C" fn(
    *const c_void,
    *mut c_void,
    usize,
    c_int,
    c_int,
    ncclComm_t,
    cudaStream_t,
) -> c_int;
type GroupCall = unsafe extern "C" fn() -> c_int;
type GetErrorString = unsafe extern "C" fn(c_int) -> *const c_char;
type GetVersion = unsafe extern "C" fn(*mut c_int) -> c_int;

/// The loaded libnccl: where it was found, its version, and the entry points ferrinfer calls.
/// Get it with [`nccl_library`].
pub struct NcclLibrary {
    path: PathBuf,
    version: (u32, u32, u32),
    pub(crate) get_unique_id: GetUniqueId,
    pub(crate) comm_init_rank: CommInitRank,
    pub(crate) comm_destroy: CommDestroy,
    pub(crate) all_gather: AllGather,
    pub(crate) all_reduce: AllReduce,
    pub(crate) group_start: GroupCall,
    pub(crate) group_end: GroupCall,
    get_error_string: GetErrorString,
    /// Keeps the entry points above valid.
    _lib: Library,
}

impl std::fmt::Debug for NcclLibrary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NcclLibrary")
            .field("path", &self.path)
            .field("version", &self.version)
            .finish_non_exhaustive()
    }
}

impl NcclLibrary {
    /// The file (or, when the system loader found it, the soname) that was opened.
    pub fn path(&self) -> &Path {
        &self.path
    }
    /// `ncclGetVersion`: (major, minor, patch).
    pub fn version(&self) -> (u32, u32, u32) {
        self.version
    }
    /// `Ok` for `ncclSuccess` (0), otherwise an error naming the call and NCCL's own message.
    pub(crate) fn check(&self, what: &str, rc: c_int) -> Result<()> {
        if rc == 0 {
            return Ok(());
        }
        // SAFETY: ncclGetErrorString takes any result code and returns a static C string (or
        // null, handled).
        let msg = unsafe { (self.get_error_string)(rc) };
        let msg = if msg.is_null() {
            "unknown error".into()
        } else {
            // SAFETY: non-null, NUL-terminated and static, per NCCL's API.
            unsafe { CStr::from_ptr(msg) }.to_string_lossy()
        };
        Err(Error::Driver(format!(
            "NCCL {what} failed: {msg} (ncclResult {rc})"
        )))
    }
}

/// The process's libnccl, loaded on first use: `$FERRINFER_NCCL` if set (that file and no other),
/// else `libnccl.so.2` by the system loader (`LD_LIBRARY_PATH`, ldconfig), else the `lib64`/`lib`
/// of `$CUDA_HOME`, `$CUDA_PATH` and `/usr/local/cuda`, else pip's `nvidia/nccl/lib` in the usual
/// Python package directories (a virtualenv's, `~/.local`, `/usr/local`, `/opt/*/.venv`) and the
/// running `python3`'s. [`Error::CudaUnavailable`] names every place looked in.
///
/// ```no_run
/// let nccl = ferrinfer_runtime::distributed::nccl_library()?;
/// println!("NCCL {:?} from {}", nccl.version(), nccl.path().display());
/// # Ok::<(), ferrinfer_runtime::Error>(())
/// ```
pub fn nccl_library() -> Result<&'static NcclLibrary> {
    static LIB: OnceLock<std::result::Result<NcclLibrary, String>> = OnceLock::new();
    LIB.get_or_init(discover)
        .as_ref()
        .map_err(|m| Error::CudaUnavailable(m.clone()))
}

fn discover() -> std::result::Result<NcclLibrary, String> {
    if let Some(path) = toolkit::env_path(NCCL_VAR) {
        return open(&path).map_err(|e| format!("{NCCL_VAR}={}: {e}", path.display()));
    }
    let mut tried = Vec::new();
    let mut failures = Vec::new();
    match open(Path::new(SONAME)) {
        Ok(lib) => return Ok(lib),
        Err(e) => {
            tried.push(format!("{SONAME} (system loader)"));
            failures.push(e);
        }
    }
    let mut dirs = Vec::new();
    let roots = [
        toolkit::env_path("CUDA_HOME"),
        toolkit::env_path("CUDA_PATH"),
    ];
    for root in roots
        .into_iter()
        .flatten()
        .chain([PathBuf::from("/usr/local/cuda")])
    {
        dirs.extend(toolkit::LIB_DIRS.map(|d| root.join(d)));
    }
    let mut sites = toolkit::site_patterns();
    sites.push(PathBuf::from("/opt/*/.venv/lib/python3*/site-packages"));
    for site in sites {
        dirs.extend(toolkit::expand(&site.join("nvidia/nccl/lib")));
    }
    if let Some(purelib) = toolkit::python_purelib() {
        dirs.push(purelib.join("nvidia/nccl/lib"));
    }
    for dir in dirs {
        let path = dir.join(SONAME);
        if path.exists() {
            match open(&path) {
                Ok(lib) => return Ok(lib),
                Err(e) => failures.push(e),
            }
        }
        tried.push(path.display().to_string());
    }
    Err(format!(
        "NCCL ({SONAME}) was not found; looked in: {}. To fix: `pip install nvidia-nccl-cu13` \
         (or -cu12), install NCCL with the CUDA toolkit, add its directory to LD_LIBRARY_PATH, or \
         set {NCCL_VAR} to the library's path.{}",
        tried.join(", "),
        if failures.is_empty() {
            String::new()
        } else {
            format!(" Failures: {}", failures.join("; "))
        }
    ))
}

fn open(path: &Path) -> std::result::Result<NcclLibrary, String> {
    // SAFETY: loading libnccl runs its initialisers, which have no preconditions on us.
    let lib = unsafe { Library::open(Some(path), RTLD_NOW | RTLD_LOCAL) }
        .map_err(|e| format!("{}: {e}", path.display()))?;
    /// A symbol as the function type the caller names; the types above are NCCL's C signatures.
    fn sym<F: Copy>(lib: &Library, path: &Path, name: &str) -> std::result::Result<F, String> {
        // SAFETY: F is the C signature of `name` in every NCCL 2.x (see the types above).
        unsafe { lib.get::<F>(name.as_bytes()) }
            .map(|s| *s)
            .map_err(|e| format!("{}: no {name} ({e})", path.display()))
    }
    let get_version: GetVersion = sym(&lib, path, "ncclGetVersion")?;
    let mut code: c_int = 0;
    // SAFETY: ncclGetVersion writes one int through a valid pointer.
    let rc = unsafe { get_version(&mut code) };
    // NCCL 2.9+ encodes major * 10000 + minor * 100 + patch.
    let version = (
        (code / 10000) as u32,
        (code % 10000 / 100) as u32,
        (code % 100) as u32,
    );
    if rc != 0 || version.0 != 2 {
        return Err(format!(
            "{}: ncclGetVersion returned {rc} and {code}; NCCL 2.x is needed",
            path.display()
        ));
    }
    Ok(NcclLibrary {
        path: path.to_path_buf(),
        version,
        get_unique_id: sym(&lib, path, "ncclGetUniqueId")?,
        comm_init_rank: sym(&lib, path, "ncclCommInitRank")?,
        comm_destroy: sym(&lib, path, "ncclCommDestroy")?,
        all_gather: sym(&lib, path, "ncclAllGather")?,
        all_reduce: sym(&lib, path, "ncclAllReduce")?,
        group_start: sym(&lib, path, "ncclGroupStart")?,
        group_end: sym(&lib, path, "ncclGroupEnd")?,
        get_error_string: sym(&lib, path, "ncclGetErrorString")?,
        _lib: lib,
    })
}
