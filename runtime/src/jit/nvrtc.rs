//! Compiling one translation unit to CUBIN with NVRTC, and reading ptxas' report of it.
//!
//! NVRTC is called through our own table of its C functions ([`Api`]), resolved in the library
//! that [`toolkit::nvrtc_library`] picked (12.x or 13.x), not through cudarc: see the toolkit for
//! why.

use std::ffi::{CStr, CString, c_char, c_int, c_void};
use std::fmt;
use std::sync::OnceLock;

use ferrinfer_kernels::TranslationUnit;

use crate::device::{Arch, toolkit};
use crate::error::{Error, Result};

/// What ptxas reported for the entry function: the numbers to watch when tuning a kernel.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelStats {
    /// Registers per thread.
    pub registers: u32,
    /// Bytes of register spill stores per thread.
    pub spill_stores: u32,
    /// Bytes of register spill loads per thread.
    pub spill_loads: u32,
    /// Bytes of stack frame per thread.
    pub stack_frame: u32,
    /// Bytes of statically allocated shared memory per block.
    pub shared_static: u32,
}

impl KernelStats {
    /// Parse ptxas' `-v` report. Only the lines after `entry`'s header count; if the log does not
    /// name `entry`, every function's lines count and the largest numbers win.
    pub fn parse(log: &str, entry: &str) -> KernelStats {
        let names_entry = log.lines().any(|l| function_name(l) == Some(entry));
        let mut stats = KernelStats::default();
        let mut current: Option<&str> = None;
        for line in log.lines() {
            if let Some(name) = function_name(line) {
                current = Some(name);
                continue;
            }
            if names_entry && current != Some(entry) {
                continue;
            }
            let take = |field: &mut u32, unit: &str| {
                if let Some(n) = number_before(line, unit) {
                    *field = (*field).max(n);
                }
            };
            take(&mut stats.registers, " registers");
            take(&mut stats.spill_stores, " bytes spill stores");
            take(&mut stats.spill_loads, " bytes spill loads");
            take(&mut stats.stack_frame, " bytes stack frame");
            take(&mut stats.shared_static, " bytes smem");
        }
        stats
    }
}

impl fmt::Display for KernelStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} registers, {} B smem, {} B stack, {} B spill stores, {} B spill loads",
            self.registers,
            self.shared_static,
            self.stack_frame,
            self.spill_stores,
            self.spill_loads
        )
    }
}

/// The function a ptxas line introduces (`Compiling entry function 'k' for 'sm_90a'`,
/// `Function properties for k`).
fn function_name(line: &str) -> Option<&str> {
    if let Some((_, rest)) = line.split_once("Compiling entry function '") {
        return rest.split_once('\'').map(|(name, _)| name);
    }
    line.split_once("Function properties for ")
        .map(|(_, name)| name.trim())
}

/// The integer just before `unit` in `line` ("Used 72 registers" -> 72 for " registers").
fn number_before(line: &str, unit: &str) -> Option<u32> {
    let (before, _) = line.split_once(unit)?;
    before.split_whitespace().last()?.parse().ok()
}

/// NVRTC's version, `(major, minor)`. Recorded in every cache entry: a new NVRTC may generate
/// other code, and the driver must be new enough for it.
pub fn version() -> Result<(i32, i32)> {
    let lib = toolkit::nvrtc_library().map_err(|e| Error::CudaUnavailable(e.into_message()))?;
    let (major, minor) = lib.version();
    Ok((major as i32, minor as i32))
}

type RawProgram = *mut c_void;
type Status = c_int;

/// The NVRTC functions we call, with their C signatures (identical in CUDA 12 and 13).
struct Api {
    create: unsafe extern "C" fn(
        *mut RawProgram,
        *const c_char,
        *const c_char,
        c_int,
        *const *const c_char,
        *const *const c_char,
    ) -> Status,
    compile: unsafe extern "C" fn(RawProgram, c_int, *const *const c_char) -> Status,
    log_size: unsafe extern "C" fn(RawProgram, *mut usize) -> Status,
    log: unsafe extern "C" fn(RawProgram, *mut c_char) -> Status,
    cubin_size: unsafe extern "C" fn(RawProgram, *mut usize) -> Status,
    cubin: unsafe extern "C" fn(RawProgram, *mut c_char) -> Status,
    destroy: unsafe extern "C" fn(*mut RawProgram) -> Status,
    error_string: unsafe extern "C" fn(Status) -> *const c_char,
}

/// The table, resolved once.
fn api() -> Result<&'static Api> {
    static API: OnceLock<std::result::Result<Api, String>> = OnceLock::new();
    API.get_or_init(|| {
        let lib = toolkit::nvrtc_library().map_err(|e| e.into_message())?;
        let resolve = || -> std::result::Result<Api, toolkit::Unavailable> {
            // SAFETY: each type is the C signature of that function in nvrtc.h (CUDA 12 and 13).
            unsafe {
                Ok(Api {
                    create: lib.symbol("nvrtcCreateProgram")?,
                    compile: lib.symbol("nvrtcCompileProgram")?,
                    log_size: lib.symbol("nvrtcGetProgramLogSize")?,
                    log: lib.symbol("nvrtcGetProgramLog")?,
                    cubin_size: lib.symbol("nvrtcGetCUBINSize")?,
                    cubin: lib.symbol("nvrtcGetCUBIN")?,
                    destroy: lib.symbol("nvrtcDestroyProgram")?,
                    error_string: lib.symbol("nvrtcGetErrorString")?,
                })
            }
        };
        resolve().map_err(|e| e.into_message())
    })
    .as_ref()
    .map_err(|m| Error::CudaUnavailable(m.clone()))
}

/// The full NVRTC option list for `arch`. No fast-math: variant hooks need accurate expf/tanhf.
pub fn options(arch: Arch, extra: &[String]) -> Vec<String> {
    let mut opts = vec![
        format!("--gpu-architecture={}", arch.sm_name()),
        "--std=c++17".to_string(),
        "--ptxas-options=-v".to_string(),
        "-lineinfo".to_string(),
    ];
    opts.extend(extra.iter().cloned());
    opts
}

/// A successful compile.
pub struct Output {
    /// The CUBIN image.
    pub cubin: Vec<u8>,
    /// NVRTC's log (ptxas report and warnings).
    pub log: String,
    /// The entry function's numbers, from the log.
    pub stats: KernelStats,
}

/// Compile `tu` with exactly `options` (see [`options`]) to CUBIN.
pub fn compile(tu: &TranslationUnit, options: &[String]) -> Result<Output> {
    let api = api()?;
    let fail = |log: String| Error::Compile {
        kernel: tu.name.clone(),
        log,
    };
    let source = CString::new(tu.source.as_str())
        .map_err(|_| Error::invalid(format!("source of {} contains a NUL byte", tu.name)))?;
    let options = options
        .iter()
        .map(|o| {
            CString::new(o.as_str())
                .map_err(|_| Error::invalid(format!("NVRTC option {o:?} contains a NUL byte")))
        })
        .collect::<Result<Vec<_>>>()?;
    let option_ptrs: Vec<*const c_char> = options.iter().map(|o| o.as_ptr()).collect();
    let name = CString::new(tu.name.as_str())
        .map_err(|_| Error::invalid(format!("kernel name {:?} contains a NUL byte", tu.name)))?;
    let mut raw: RawProgram = std::ptr::null_mut();
    // SAFETY: `raw` is valid for writes; source and name are NUL-terminated and outlive the call;
    // no headers are passed (count 0, null arrays).
    let rc = unsafe {
        (api.create)(
            &mut raw,
            source.as_ptr(),
            name.as_ptr(),
            0,
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(fail(format!("nvrtcCreateProgram: {}", api.describe(rc))));
    }
    let program = Program { api, raw };
    // SAFETY: the program is alive until `program` drops, after every use below; the option
    // pointers are NUL-terminated strings owned by `options`, alive across the call.
    let compiled = unsafe {
        (api.compile)(
            program.raw,
            option_ptrs.len() as c_int,
            option_ptrs.as_ptr(),
        )
    };
    let log = program.log();
    if compiled != 0 {
        return Err(fail(format!(
            "{}{}",
            log.trim_end(),
            error_context(&log, &tu.name, &tu.source, &api.describe(compiled))
        )));
    }
    let cubin = program
        .cubin()
        .map_err(|rc| fail(format!("nvrtcGetCUBIN: {}\n{log}", api.describe(rc))))?;
    let stats = KernelStats::parse(&log, &tu.entry);
    Ok(Output { cubin, log, stats })
}

impl Api {
    /// NVRTC's name for a status code.
    fn describe(&self, rc: Status) -> String {
        // SAFETY: nvrtcGetErrorString returns a static NUL-terminated string (or null).
        let text = unsafe { (self.error_string)(rc) };
        if text.is_null() {
            return format!("NVRTC error {rc}");
        }
        // SAFETY: non-null, static and NUL-terminated (above).
        let text = unsafe { CStr::from_ptr(text) };
        format!("{} ({rc})", text.to_string_lossy())
    }
}

/// A live NVRTC program, destroyed on every path out of [`compile`].
struct Program {
    api: &'static Api,
    raw: RawProgram,
}

impl Program {
    /// The compile log (empty if NVRTC cannot give it).
    fn log(&self) -> String {
        let mut size = 0usize;
        // SAFETY: `raw` is a live program; `size` is valid for writes.
        if unsafe { (self.api.log_size)(self.raw, &mut size) } != 0 || size == 0 {
            return String::new();
        }
        let mut chars = vec![0 as c_char; size];
        // SAFETY: `chars` has the `size` bytes NVRTC asked for.
        if unsafe { (self.api.log)(self.raw, chars.as_mut_ptr()) } != 0 {
            return String::new();
        }
        c_chars_to_string(&chars)
    }

    /// The CUBIN of a successfully compiled program, or NVRTC's status code.
    fn cubin(&self) -> std::result::Result<Vec<u8>, Status> {
        let mut size = 0usize;
        // SAFETY: `raw` is a live, compiled program; `size` is valid for writes.
        let rc = unsafe { (self.api.cubin_size)(self.raw, &mut size) };
        if rc != 0 {
            return Err(rc);
        }
        let mut cubin = vec![0u8; size];
        // SAFETY: `cubin` has the `size` bytes NVRTC asked for.
        let rc = unsafe { (self.api.cubin)(self.raw, cubin.as_mut_ptr().cast::<c_char>()) };
        if rc != 0 {
            return Err(rc);
        }
        Ok(cubin)
    }
}

impl Drop for Program {
    fn drop(&mut self) {
        // SAFETY: created by nvrtcCreateProgram and destroyed only here.
        let _ = unsafe { (self.api.destroy)(&mut self.raw) };
    }
}

fn c_chars_to_string(chars: &[c_char]) -> String {
    let bytes: Vec<u8> = chars
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8)
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// NVRTC's error code, then the source around each line the log blames (`name(LINE): error`):
/// the translation unit is generated, so the user has no file to open.
fn error_context(log: &str, name: &str, source: &str, err: &str) -> String {
    let mut out = format!("\n({err})");
    let lines: Vec<&str> = source.lines().collect();
    let mut shown = Vec::new();
    for l in log.lines() {
        let Some(rest) = l.strip_prefix(name).and_then(|r| r.strip_prefix('(')) else {
            continue;
        };
        let Some((num, kind)) = rest.split_once("):") else {
            continue;
        };
        let Ok(line_no) = num.parse::<usize>() else {
            continue;
        };
        if !kind.trim_start().starts_with("error") || shown.contains(&line_no) || shown.len() == 3 {
            continue;
        }
        shown.push(line_no);
        out.push_str(&format!("\n--- {name}, around line {line_no} ---"));
        let first = line_no.saturating_sub(3);
        for (i, text) in lines.iter().enumerate().skip(first).take(5) {
            let marker = if i + 1 == line_no { '>' } else { ' ' };
            out.push_str(&format!("\n{marker}{:5} | {text}", i + 1));
        }
    }
    out
}
