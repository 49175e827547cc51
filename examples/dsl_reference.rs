//! The examples of the book's DSL reference (book/src/dsl_reference.md): a variant that uses most
//! of what a hook may write, its lowered CUDA, and the numeric rules run on the CPU.
//!
//!     cargo run --example dsl_reference

use ferrinfer::prelude::*;

// ANCHOR: variant
/// ALiBi over a causal sliding window, with a pseudo-random quarter of the keys dropped.
#[derive(AttentionParams)]
pub struct Tour {
    /// Keys at most this far behind the query are kept.
    pub window: u32,
    /// Mixed into the hash of each key position.
    pub seed: u32,
    /// One ALiBi slope per query head.
    #[cover(qo_heads)]
    pub slopes: Array<f32>,
}

#[attention_variant]
impl Tour {
    fn logits(&self, s: f32, at: Pos) -> f32 {
        // ANCHOR: q_abs
        // The query's absolute position: negative for the first rows of a request with more
        // query rows than keys, so it is an i32.
        let q_abs = at.qo_pos as i32 + at.kv_len as i32 - at.qo_len as i32;
        // ANCHOR_END: q_abs
        s + self.slopes[at.qo_head] * (at.kv_pos as i32 - q_abs) as f32
    }

    fn mask(&self, at: Pos) -> bool {
        let q_abs = at.qo_pos as i32 + at.kv_len as i32 - at.qo_len as i32;
        let back = q_abs - at.kv_pos as i32;
        if back < 0 || back >= self.window as i32 {
            return false;
        }
        // ANCHOR: hash
        // `h` is a u32 (from the assignment): the multiply wraps, on the CPU as on the GPU.
        let mut h = 0;
        if self.seed != 0 {
            h = (at.kv_pos ^ self.seed) * 2654435761;
        }
        (h >> 30) != 0
        // ANCHOR_END: hash
    }
}
// ANCHOR_END: variant

fn main() {
    // ANCHOR: cuda
    // What the GPU runs: the lowered `struct Variant`, spliced into every kernel template.
    println!("{}", <Tour as ferrinfer::Variant>::SPEC.cuda);
    // ANCHOR_END: cuda

    // ANCHOR: semantics
    // The CPU reference calls the very same hooks.
    let tour = Tour {
        window: 4,
        seed: 7,
        slopes: Array::new(vec![-0.5; 8]),
    };
    let at = Pos {
        qo_pos: 2,
        kv_pos: 5,
        qo_len: 3,
        kv_len: 8,
        head_dim: 128,
        ..Pos::default()
    };
    println!("logits(1.0) = {}", tour.logits(1.0, at));
    let kept = (0..8)
        .filter(|&kv_pos| tour.mask(Pos { kv_pos, ..at }))
        .count();
    println!("keys kept for the last query row: {kept} of 8");
    // ANCHOR_END: semantics
}
