//! The norm rows: RMSNorm and fused residual add + RMSNorm of 2048 x 8192 bf16, eps 1e-6, inputs
//! as the anchor's (standard normal x, residual and weight).

use ferrinfer::ops::norm::{self, NormShape};
use ferrinfer::prelude::*;

use super::{Call, OpCase};
use crate::inputs::normal_bf16;
use crate::timing::BenchResult;

const T: u64 = 2048;
const HIDDEN: u64 = 8192;
const EPS: f32 = 1e-6;

/// RMSNorm and fused add + RMSNorm, with the anchor's byte counts: x read and out written (plus
/// the weight); x and residual each read and written (plus the weight).
pub fn cases() -> Vec<OpCase> {
    vec![
        OpCase {
            key: "rmsnorm_t2048_h8192",
            bytes: 2 * T * HIDDEN * 2 + HIDDEN * 2,
            set_bytes: (2 * T * HIDDEN + HIDDEN) * 2,
            setup: rmsnorm,
        },
        OpCase {
            key: "fused_add_rmsnorm_t2048_h8192",
            bytes: 4 * T * HIDDEN * 2 + HIDDEN * 2,
            set_bytes: (2 * T * HIDDEN + HIDDEN) * 2,
            setup: fused_add_rmsnorm,
        },
    ]
}

fn shape() -> BenchResult<NormShape> {
    Ok(NormShape::new(T as u32, HIDDEN as u32)?)
}

fn rmsnorm(backend: &Backend, seed: u64) -> BenchResult<Call> {
    let shape = shape()?;
    let x = backend.upload(&normal_bf16(shape.elements(), seed))?;
    let w = backend.upload(&normal_bf16(HIDDEN as usize, seed ^ 0x5eed))?;
    let mut out = backend.filled(shape.elements(), bf16::ZERO)?;
    let backend = backend.clone();
    Ok(Box::new(move || {
        norm::rmsnorm(&backend, shape, &x, &w, EPS, &mut out)
    }))
}

/// In place, as FlashInfer's call: every call adds x into the residual again and overwrites x
/// with the normed row, so the values stay finite over any number of calls.
fn fused_add_rmsnorm(backend: &Backend, seed: u64) -> BenchResult<Call> {
    let shape = shape()?;
    let mut x = backend.upload(&normal_bf16(shape.elements(), seed))?;
    let mut residual = backend.upload(&normal_bf16(shape.elements(), seed ^ 0x7e5))?;
    let w = backend.upload(&normal_bf16(HIDDEN as usize, seed ^ 0x5eed))?;
    let backend = backend.clone();
    Ok(Box::new(move || {
        norm::fused_add_rmsnorm(&backend, shape, &mut x, &mut residual, &w, EPS)
    }))
}
