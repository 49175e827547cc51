use crate::prelude::*;

/// Rotary position embedding in the Llama (non-interleaved) layout, applied to queries and keys
/// inside the kernel: element `i` is rotated with its partner `i ± head_dim/2` by the angle
/// `pos * theta^(-2f/head_dim)`, `f = i % (head_dim/2)`. Queries rotate by their absolute position
/// `qo_pos + kv_len - qo_len`, keys by `kv_pos`.
///
/// Rotating inside the kernel repeats each key's rotation once a query tile, which costs far more
/// than the attention: one causal 8192 prompt at head dim 256 ran 30 TFLOP/s with it on an H200
/// against 581 with `Standard` (2026-12-02). A serving engine rotates each key once, on its way
/// into the cache (`ops::kv_append`'s `AppendPlan::run_with_rope` also rotates the queries), and
/// runs `Standard`; this variant is for attention over keys stored unrotated.
///
/// ```
/// use ferrinfer::prelude::*;
/// use ferrinfer::variants::LlamaRope;
///
/// let v = LlamaRope { theta: 10000.0 };
/// // Position 0 is not rotated.
/// let at = Pos { head_dim: 128, ..Pos::default() };
/// assert_eq!(v.key(0.25, 0.5, 3, at), 0.25);
/// ```
#[derive(AttentionParams, Clone, Copy, Debug)]
pub struct LlamaRope {
    /// The base of the frequencies (10000 in Llama 2, 500000 in Llama 3).
    pub theta: f32,
}

#[attention_variant]
impl LlamaRope {
    /// Rotate query element `i` by the query's absolute position.
    pub fn query(&self, x: f32, partner: f32, i: u32, at: Pos) -> f32 {
        let half = at.head_dim / 2;
        let inv_freq = self
            .theta
            .powf(-2.0 * (i % half) as f32 / at.head_dim as f32);
        // In i32: with more query rows than keys the position is negative, not a wrapped u32.
        let q_abs = at.qo_pos as i32 + at.kv_len as i32 - at.qo_len as i32;
        let angle = q_abs as f32 * inv_freq;
        if i < half {
            x * angle.cos() - partner * angle.sin()
        } else {
            x * angle.cos() + partner * angle.sin()
        }
    }

    /// Rotate key element `i` by the key's position.
    pub fn key(&self, x: f32, partner: f32, i: u32, at: Pos) -> f32 {
        let half = at.head_dim / 2;
        let inv_freq = self
            .theta
            .powf(-2.0 * (i % half) as f32 / at.head_dim as f32);
        let angle = at.kv_pos as f32 * inv_freq;
        if i < half {
            x * angle.cos() - partner * angle.sin()
        } else {
            x * angle.cos() + partner * angle.sin()
        }
    }
}
