use crate::prelude::*;

/// Sigmoid attention (FlashSigmoid, Ramapuram et al., 2024): no softmax; each visible key weighs
/// `sigmoid(s + bias)`, and the output is the weighted sum of the values.
///
/// ```
/// use ferrinfer::prelude::*;
/// use ferrinfer::Variant;
/// use ferrinfer::variants::FlashSigmoid;
///
/// let v = FlashSigmoid { bias: 0.0 };
/// assert_eq!(v.logits(0.0, Pos::default()), 0.5);
/// assert!(!FlashSigmoid::SPEC.softmax);
/// ```
#[derive(AttentionParams, Clone, Copy, Debug)]
pub struct FlashSigmoid {
    /// Added to the score before the sigmoid (the paper uses `-ln(kv_len)`).
    pub bias: f32,
}

#[attention_variant]
impl FlashSigmoid {
    const SOFTMAX: bool = false;

    /// `1 / (1 + exp(-(s + bias)))`.
    pub fn logits(&self, s: f32, at: Pos) -> f32 {
        let _ = at;
        1.0 / (1.0 + (-(s + self.bias)).exp())
    }
}
