use crate::prelude::*;

/// An arbitrary per-request mask, bit-packed: the pair (query row `qo_pos`, key `kv_pos`) of
/// request `batch` is kept iff bit `offsets[batch] + qo_pos * kv_len + kv_pos` of `bits` is set
/// (bits numbered from the least significant bit of each `u32` word).
///
/// ```
/// use ferrinfer::prelude::*;
/// use ferrinfer::variants::CustomMask;
///
/// // One request, 2 queries x 3 keys: query 0 sees keys 0 and 2, query 1 sees key 1.
/// let m = CustomMask::new(&[vec![true, false, true, false, true, false]]);
/// let at = |qo_pos, kv_pos| Pos { qo_pos, kv_pos, qo_len: 2, kv_len: 3, ..Pos::default() };
/// assert!(m.mask(at(0, 2)));
/// assert!(!m.mask(at(1, 2)));
/// ```
///
/// `offsets` must cover the requests of the batch (`#[cover(batch)]`, checked before anything
/// runs). `bits` is indexed through the offsets, so no coverage can state its length: it must hold
/// bit `offsets[b] + qo_len * kv_len - 1` of every request `b` with keys, which
/// [`CustomMask::new`] guarantees for the masks it was given. A mask built for another batch
/// composition can index past `bits`: the CPU reference returns an error, and the GPU kernel
/// traps, so build a mask per batch.
#[derive(AttentionParams, Clone, Debug)]
pub struct CustomMask {
    /// The packed bits of every request, LSB first in each word.
    pub bits: Array<u32>,
    /// The index of the first bit of each request in `bits`.
    #[cover(batch)]
    pub offsets: Array<u32>,
}

impl CustomMask {
    /// Pack one dense mask per request, each row-major `[qo_len, kv_len]` (`true` keeps the pair).
    pub fn new<M: AsRef<[bool]>>(masks: &[M]) -> Self {
        let mut bits: Vec<u32> = Vec::new();
        let mut offsets = Vec::with_capacity(masks.len());
        let mut next = 0usize;
        for mask in masks {
            offsets.push(u32::try_from(next).expect("a mask of more than 2^32 bits"));
            for &keep in mask.as_ref() {
                if next.is_multiple_of(32) {
                    bits.push(0);
                }
                if keep {
                    bits[next / 32] |= 1 << (next % 32);
                }
                next += 1;
            }
        }
        CustomMask {
            bits: Array::new(bits),
            offsets: Array::new(offsets),
        }
    }
}

#[attention_variant]
impl CustomMask {
    /// The bit of this (query, key) pair.
    pub fn mask(&self, at: Pos) -> bool {
        let bit = self.offsets[at.batch] + at.qo_pos * at.kv_len + at.kv_pos;
        (self.bits[bit >> 5] >> (bit & 31)) & 1 == 1
    }
}
