//! Compiling one translation unit to CUBIN with NVRTC, and reading ptxas' report of it.

use std::ffi::{CString, c_char, c_int};
use std::fmt;
use std::sync::OnceLock;

use cudarc::nvrtc::{result, sys};
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

/// NVRTC's version, `(major, minor)`. Part of every cache key: a new NVRTC may generate other code.
pub fn version() -> Result<(i32, i32)> {
    static VERSION: OnceLock<(i32, i32)> = OnceLock::new();
    if let Some(v) = VERSION.get() {
        return Ok(*v);
    }
    load_nvrtc()?;
    let (mut major, mut minor): (c_int, c_int) = (0, 0);
    // SAFETY: NVRTC is loaded (checked above) and both pointers are valid for writes.
    unsafe { sys::nvrtcVersion(&mut major, &mut minor) }
        .result()
        .map_err(|e| Error::CudaUnavailable(format!("nvrtcVersion failed: {e:?}")))?;
    Ok(*VERSION.get_or_init(|| (major, minor)))
}

/// Make NVRTC loadable, or say why not.
fn load_nvrtc() -> Result<()> {
    toolkit::load_nvrtc().map_err(|e| Error::CudaUnavailable(e.into_message()))
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
    load_nvrtc()?;
    let fail = |log: String| Error::Compile {
        kernel: tu.name.clone(),
        log,
    };
    let source = CString::new(tu.source.as_str())
        .map_err(|_| Error::invalid(format!("source of {} contains a NUL byte", tu.name)))?;
    if let Some(bad) = options.iter().find(|o| o.contains('\0')) {
        return Err(Error::invalid(format!(
            "NVRTC option {bad:?} contains a NUL byte"
        )));
    }
    let name = CString::new(tu.name.as_str())
        .map_err(|_| Error::invalid(format!("kernel name {:?} contains a NUL byte", tu.name)))?;
    let program =
        Program(result::create_program(&source, Some(&name)).map_err(|e| fail(format!("{e:?}")))?);
    // SAFETY: the program is alive until `program` drops, after every use below.
    let compiled = unsafe { result::compile_program(program.0, options) };
    // SAFETY: as above.
    let log = unsafe { result::get_program_log(program.0) }
        .map(|chars| c_chars_to_string(&chars))
        .unwrap_or_default();
    if let Err(e) = compiled {
        return Err(fail(format!(
            "{}{}",
            log.trim_end(),
            error_context(&log, &tu.name, &tu.source, e)
        )));
    }
    // SAFETY: as above; the program compiled successfully.
    let cubin = unsafe { get_cubin(program.0) }
        .map_err(|e| fail(format!("nvrtcGetCUBIN: {e:?}\n{log}")))?;
    let stats = KernelStats::parse(&log, &tu.entry);
    Ok(Output { cubin, log, stats })
}

/// Destroys the NVRTC program on every path out of [`compile`].
struct Program(sys::nvrtcProgram);

impl Drop for Program {
    fn drop(&mut self) {
        // SAFETY: created by create_program and destroyed only here.
        let _ = unsafe { result::destroy_program(self.0) };
    }
}

/// # Safety
/// `prog` must be a live, successfully compiled program.
unsafe fn get_cubin(prog: sys::nvrtcProgram) -> std::result::Result<Vec<u8>, result::NvrtcError> {
    let mut size = 0usize;
    // SAFETY: the caller guarantees `prog`; `size` is valid for writes.
    unsafe { sys::nvrtcGetCUBINSize(prog, &mut size) }.result()?;
    let mut cubin = vec![0u8; size];
    // SAFETY: `cubin` has the `size` bytes NVRTC asked for.
    unsafe { sys::nvrtcGetCUBIN(prog, cubin.as_mut_ptr().cast::<c_char>()) }.result()?;
    Ok(cubin)
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
fn error_context(log: &str, name: &str, source: &str, err: result::NvrtcError) -> String {
    let mut out = format!("\n({:?})", err.0);
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
