//! The activation row: SiLU-and-mul of 2048 x 2 * 14336 bf16, the input standard normal as the
//! anchor's.

use ferrinfer::ops::activation::{self, ActShape};
use ferrinfer::prelude::*;

use super::{Call, OpCase};
use crate::inputs::normal_bf16;
use crate::timing::BenchResult;

const T: u64 = 2048;
const INTER: u64 = 14336;

/// SiLU-and-mul, with the anchor's byte count: `[T, 2 I]` read, `[T, I]` written.
pub fn cases() -> Vec<OpCase> {
    vec![OpCase {
        key: "silu_and_mul_t2048_i14336",
        bytes: 3 * T * INTER * 2,
        set_bytes: 3 * T * INTER * 2,
        setup: silu_and_mul,
    }]
}

fn silu_and_mul(backend: &Backend, seed: u64) -> BenchResult<Call> {
    let shape = ActShape::new(T as u32, INTER as u32)?;
    let x = backend.upload(&normal_bf16(shape.input_len(), seed))?;
    let mut out = backend.filled(shape.output_len(), bf16::ZERO)?;
    let backend = backend.clone();
    Ok(Box::new(move || {
        activation::silu_and_mul(&backend, shape, &x, &mut out)
    }))
}
