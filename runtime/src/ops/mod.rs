//! Operations beside attention, one file per op: its checks, its CPU reference and its GPU launch
//! side by side. What their GPU halves share (argument passing, module cache, launch) is in
//! `kernel`.

pub mod activation;
pub mod cascade;
pub(crate) mod kernel;
pub mod kv_append;
pub mod norm;
pub mod rope;
pub mod sampling;

use crate::error::{Error, Result};
use ferrinfer_kernels::TranslationUnit;

/// The translation unit of every op kernel instance (each op's row of
/// [`ferrinfer_kernels::ops::OPS`]); CI hands each to NVRTC for every arch class.
pub fn units() -> Result<Vec<TranslationUnit>> {
    let mut all = Vec::new();
    for (op, units) in ferrinfer_kernels::ops::OPS {
        all.extend(units().map_err(|e| Error::unsupported(format!("op {op}: {e}")))?);
    }
    Ok(all)
}
