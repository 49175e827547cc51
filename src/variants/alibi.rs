use crate::prelude::*;

/// ALiBi (Press et al., 2022): a per-head linear bias on the distance between query and key,
/// `s + slope[head] * (kv_pos - q_abs)`, where `q_abs = qo_pos + kv_len - qo_len` is the query's
/// absolute position.
///
/// ```
/// use ferrinfer::prelude::*;
/// use ferrinfer::variants::Alibi;
///
/// let v = Alibi::new(8);
/// assert_eq!(v.slopes.as_slice()[0], 0.5);
/// // Query at position 3 (of 4), key 1: two tokens back, bias -2 * 0.5.
/// let at = Pos { qo_pos: 3, kv_pos: 1, qo_len: 4, kv_len: 4, ..Pos::default() };
/// assert_eq!(v.logits(0.0, at), -1.0);
/// ```
///
/// The slopes must cover the query heads (`#[cover(qo_heads)]`): a batch with more query heads
/// than slopes is refused before anything runs.
///
/// ```
/// use ferrinfer::{Batch, Heads, KvIndex, KvLayout};
/// use ferrinfer::attention::reference;
/// use ferrinfer::variants::Alibi;
///
/// let heads = Heads::new(32, 8, 16).unwrap();
/// let batch = Batch::new(heads, &[0, 1], KvIndex::ragged(&[0, 4], KvLayout::Nhd).unwrap()).unwrap();
/// let (q, kv) = (vec![0.5; 32 * 16], vec![0.5; 4 * 8 * 16]);
/// let err = reference::attention(&Alibi::new(8), &batch, &q, &kv, &kv).unwrap_err();
/// assert!(err.to_string().contains("Alibi.slopes has 8 elements but must cover num_qo_heads = 32"));
/// assert!(reference::attention(&Alibi::new(32), &batch, &q, &kv, &kv).is_ok());
/// ```
#[derive(AttentionParams, Clone, Debug)]
pub struct Alibi {
    /// One slope per query head.
    #[cover(qo_heads)]
    pub slopes: Array<f32>,
}

impl Alibi {
    /// The slopes of the ALiBi paper for `num_heads` heads: the geometric sequence `2^(-8/n)`,
    /// `2^(-16/n)`, ... for a power of two `n`; otherwise those of the largest power of two below,
    /// followed by every other slope of twice that power.
    pub fn new(num_heads: u32) -> Self {
        Alibi {
            slopes: Array::new(slopes(num_heads).into_iter().map(|s| s as f32).collect()),
        }
    }
}

fn slopes(n: u32) -> Vec<f64> {
    if n == 0 {
        return Vec::new();
    }
    let geometric = |n: u32| -> Vec<f64> {
        let start = 2f64.powf(-8.0 / f64::from(n));
        (1..=n).map(|i| start.powi(i as i32)).collect()
    };
    if n.is_power_of_two() {
        return geometric(n);
    }
    let lower = 1 << (31 - n.leading_zeros());
    let mut s = geometric(lower);
    s.extend(
        slopes(2 * lower)
            .into_iter()
            .step_by(2)
            .take((n - lower) as usize),
    );
    s
}

#[attention_variant]
impl Alibi {
    /// `s + slope[qo_head] * (kv_pos - q_abs)`.
    pub fn logits(&self, s: f32, at: Pos) -> f32 {
        // In i32: with more query rows than keys the position is negative, not a wrapped u32.
        let q_abs = (at.qo_pos as i32 + at.kv_len as i32 - at.qo_len as i32) as f32;
        s + self.slopes[at.qo_head] * (at.kv_pos as f32 - q_abs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slopes_follow_the_paper() {
        assert_eq!(slopes(4), vec![0.25, 0.0625, 0.015625, 0.00390625]);
        // 6 heads: the 4 of n = 4, then slopes 1 and 3 of n = 8 (2^-1, 2^-3).
        let six = slopes(6);
        assert_eq!(&six[..4], &slopes(4)[..]);
        assert_eq!(&six[4..], &[0.5, 0.125]);
    }
}
