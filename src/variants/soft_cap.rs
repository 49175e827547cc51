use crate::prelude::*;

/// Logits soft-capping (Gemma 2, Grok): `cap * tanh(s / cap)` keeps every score within `(-cap, cap)`.
///
/// ```
/// use ferrinfer::prelude::*;
/// use ferrinfer::variants::SoftCap;
///
/// let v = SoftCap { cap: 30.0 };
/// assert!(v.logits(60.0, Pos::default()) < 30.0);
/// assert_eq!(v.logits(0.0, Pos::default()), 0.0);
/// ```
#[derive(AttentionParams, Clone, Copy, Debug)]
pub struct SoftCap {
    /// The bound of the capped scores (50 for Gemma 2's attention, 30 for Grok-1's).
    pub cap: f32,
}

#[attention_variant]
impl SoftCap {
    /// `cap * tanh(s / cap)`, with the hardware tanh ([`FastMath::tanh_approx`], relative
    /// error 5e-4, as FlashAttention and FlashInfer cap logits), and dividing by multiplying with
    /// `1 / cap`. Written as `post * f(pre * s)` with both scales from the parameters, it is split
    /// by the macro: the prefill kernels take `1 / cap` once per kernel, fold it with `sm_scale`
    /// and `cap` with `log2(e)`, and do one multiply and the tanh a score (the book's DSL
    /// reference, "Scales the kernels fold"). The tanh bounds every score to `|cap|`, so where
    /// `|cap| * log2(e)` is at most 80 for bf16 (`|cap|` up to 55) or 12 for f16 (8.3), the
    /// prefill kernels weight scores with no running row maximum.
    pub fn logits(&self, s: f32, at: Pos) -> f32 {
        let _ = at;
        self.cap * (s * (1.0 / self.cap)).tanh_approx()
    }
}
