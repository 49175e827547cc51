//! The one error type of the runtime. Every message says what was wrong and, where it helps, what
//! would be right.

use std::fmt;

/// Why an operation failed.
#[derive(Debug)]
pub enum Error {
    /// The caller's input is inconsistent (shapes, page tables, head counts...).
    InvalidInput(String),
    /// No kernel exists for this combination (head dim, dtype, arch, variant hooks...).
    Unsupported(String),
    /// CUDA could not be found or loaded; the message says where we looked.
    CudaUnavailable(String),
    /// NVRTC refused a translation unit; holds its log.
    Compile { kernel: String, log: String },
    /// The compile cache is in "no JIT" mode and this kernel is not in it.
    CacheMiss(String),
    /// A CUDA driver call failed.
    Driver(String),
    /// Reading or writing the disk cache failed.
    Io(String),
}

/// Result with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn invalid(msg: impl Into<String>) -> Self {
        Error::InvalidInput(msg.into())
    }
    pub(crate) fn unsupported(msg: impl Into<String>) -> Self {
        Error::Unsupported(msg.into())
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::InvalidInput(m) => write!(f, "invalid input: {m}"),
            Error::Unsupported(m) => write!(f, "unsupported: {m}"),
            Error::CudaUnavailable(m) => write!(f, "CUDA is not available: {m}"),
            Error::Compile { kernel, log } => write!(f, "NVRTC failed to compile {kernel}:\n{log}"),
            Error::CacheMiss(m) => write!(f, "kernel not in the compile cache and JIT is off: {m}"),
            Error::Driver(m) => write!(f, "CUDA driver error: {m}"),
            Error::Io(m) => write!(f, "kernel cache I/O error: {m}"),
        }
    }
}

impl std::error::Error for Error {}

impl From<cudarc::driver::DriverError> for Error {
    fn from(e: cudarc::driver::DriverError) -> Self {
        Error::Driver(e.to_string())
    }
}
