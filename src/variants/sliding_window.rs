use crate::prelude::*;

/// Sliding-window (local) attention, as in Mistral: a query sees only the `window` most recent keys
/// up to its own position, `q_abs - kv_pos < window`.
///
/// Keys after the query's position are kept by this hook; turn on the causal mask to drop them.
///
/// ```
/// use ferrinfer::prelude::*;
/// use ferrinfer::variants::SlidingWindow;
///
/// let v = SlidingWindow { window: 2 };
/// let at = |kv_pos| Pos { qo_pos: 0, kv_pos, qo_len: 1, kv_len: 5, ..Pos::default() };
/// // The query is at position 4: it sees keys 3 and 4.
/// assert!(!v.mask(at(2)));
/// assert!(v.mask(at(3)) && v.mask(at(4)));
/// ```
#[derive(AttentionParams, Clone, Copy, Debug)]
pub struct SlidingWindow {
    /// How many keys, ending at the query's own position, a query sees.
    pub window: u32,
}

#[attention_variant]
impl SlidingWindow {
    /// Keep the key iff it is within `window` positions before the query (or after it).
    pub fn mask(&self, at: Pos) -> bool {
        // In i32: with more query rows than keys the position is negative, not a wrapped u32.
        let q_abs = at.qo_pos as i32 + at.kv_len as i32 - at.qo_len as i32;
        let kv_pos = at.kv_pos as i32;
        kv_pos > q_abs || q_abs - kv_pos < self.window as i32
    }
}
