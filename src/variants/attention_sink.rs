use crate::prelude::*;

/// Learned attention sinks (as in gpt-oss): each query head has a sink logit that joins the softmax
/// denominator, `Z = sum_j exp(l_j - m) + exp(sink - m)`, so a head can attend to "nothing".
///
/// ```
/// use ferrinfer::prelude::*;
/// use ferrinfer::variants::AttentionSink;
///
/// let v = AttentionSink { sinks: Array::new(vec![0.5, -1.0]) };
/// assert_eq!(v.sink(Pos { qo_head: 1, ..Pos::default() }), -1.0);
/// ```
#[derive(AttentionParams, Clone, Debug)]
pub struct AttentionSink {
    /// One sink logit per query head.
    #[cover(qo_heads)]
    pub sinks: Array<f32>,
}

#[attention_variant]
impl AttentionSink {
    /// The sink logit of the query head.
    pub fn sink(&self, at: Pos) -> f32 {
        self.sinks[at.qo_head]
    }
}
