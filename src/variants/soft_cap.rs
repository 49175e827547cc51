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
    /// The bound of the capped scores (30 for Gemma 2's attention).
    pub cap: f32,
}

#[attention_variant]
impl SoftCap {
    /// `cap * tanh(s / cap)`, with the hardware tanh ([`FastMath::tanh_approx`], relative
    /// error 5e-4, as FlashAttention and FlashInfer cap logits), and dividing by multiplying with
    /// `1 / cap`: the reciprocal depends only on the parameters, so the GPU computes it once per
    /// kernel instead of one IEEE division per score.
    pub fn logits(&self, s: f32, at: Pos) -> f32 {
        let _ = at;
        self.cap * (s * (1.0 / self.cap)).tanh_approx()
    }
}
