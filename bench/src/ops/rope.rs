//! RoPE rows: Llama 3.1 RoPE in place on q and k, as the anchor's
//! `apply_llama31_rope_pos_ids_inplace` (positions 0..4095, FlashInfer's Llama 3.1 defaults).

use ferrinfer::ops::rope::{self, Angles, Frequencies, Positions, QkMut, Rope, RopeLayout};
use ferrinfer::prelude::*;

use super::{Call, OpCase};
use crate::configs::{D, ELT, H, HKV};
use crate::inputs::normal_bf16;
use crate::timing::BenchResult;

const TOKENS: u32 = 4096;

/// The RoPE cases.
pub fn cases() -> Vec<OpCase> {
    let qk = u64::from(TOKENS) * u64::from(H + HKV) * u64::from(D) * ELT;
    vec![OpCase {
        key: "rope_llama31_t4096_h32x8_d128",
        // q and k read and written.
        bytes: 2 * qk,
        set_bytes: qk + u64::from(TOKENS) * 4,
        setup: llama31,
    }]
}

fn llama31(backend: &Backend, seed: u64) -> BenchResult<Call> {
    let rope = Rope::new(Heads::new(H, HKV, D)?, D, RopeLayout::NeoX)?;
    let n = TOKENS as usize;
    let mut q = backend.upload(&normal_bf16(rope.q_len(n), 2 * seed))?;
    let mut k = backend.upload(&normal_bf16(rope.k_len(n), 2 * seed + 1))?;
    let positions: Vec<i32> = (0..TOKENS as i32).collect();
    let positions = backend.upload(&positions)?;
    let backend = backend.clone();
    Ok(Box::new(move || {
        rope::apply_in_place(
            &backend,
            &rope,
            Angles::Computed(Frequencies::llama31()),
            Positions::PerToken(&positions),
            QkMut {
                q: &mut q,
                k: &mut k,
            },
        )
    }))
}
