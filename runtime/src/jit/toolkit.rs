//! Finding and loading CUDA's libraries (stub: filled in by the JIT work).

use crate::error::{Error, Result};

/// Load the CUDA driver library, or say why not.
pub fn load_driver() -> Result<()> {
    Err(Error::CudaUnavailable("not implemented yet".into()))
}
