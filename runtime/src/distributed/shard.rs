//! Splitting one batch's KV cache over the ranks of a context-parallel group: each request's
//! blocks (pages, or tokens of a ragged cache) are cut into `world` contiguous runs, rank `r`
//! taking the `r`-th, so every rank holds about `1 / world` of every request and the ranks
//! finish together.

use std::ops::Range;

use crate::attention::batch::KvIndex;
use crate::error::{Error, Result};

/// One rank's part of a KV index: the same requests (in the same order) with a contiguous run of
/// each request's blocks, over the same cache (page ids and capacity unchanged), at their key
/// positions in the whole request ([`KvIndex::with_key_positions`]: offset `tokens(b).start`,
/// total the request's length), so prefill's causal mask and position-reading hooks see on the
/// shard what they see on the whole index. A request of fewer blocks than ranks leaves some
/// ranks with none of it: their attention state for it is empty (LSE `-inf`) and merges to
/// nothing.
///
/// ```
/// use ferrinfer_runtime::{KvIndex, KvLayout, distributed::shard_kv};
/// // One request of 40 tokens on pages 7, 3, 5 (page size 16, the last page holds 8 tokens).
/// let kv = KvIndex::paged_from_lens(16, &[40], &[7, 3, 5], 8, KvLayout::Nhd)?;
/// let shards = shard_kv(&kv, 2)?;
/// assert_eq!(shards[0].kv().indices(), [7]);
/// assert_eq!(shards[1].kv().indices(), [3, 5]);
/// assert_eq!((shards[0].tokens(0), shards[1].tokens(0)), (0..16, 16..40));
/// assert_eq!((shards[1].kv().key_offset(0), shards[1].kv().key_total(0)), (16, 40));
/// # Ok::<(), ferrinfer_runtime::Error>(())
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KvShard {
    rank: usize,
    world: usize,
    kv: KvIndex,
    /// `[batch]`: the positions of each request's keys this rank holds.
    tokens: Vec<Range<u32>>,
}

impl KvShard {
    /// This shard's rank, in `0..world`.
    pub fn rank(&self) -> usize {
        self.rank
    }
    /// Ranks in the group.
    pub fn world(&self) -> usize {
        self.world
    }
    /// The rank's KV index (block ids into the same cache as the whole index).
    pub fn kv(&self) -> &KvIndex {
        &self.kv
    }
    /// The rank's KV index, by value.
    pub fn into_kv(self) -> KvIndex {
        self.kv
    }
    /// Key positions `start..end` of request `b` (in the whole request) that this rank holds;
    /// empty when it holds none. What a caller copies to a rank that keeps only its own pages.
    ///
    /// # Panics
    /// When `b` is not below the batch size.
    pub fn tokens(&self, b: usize) -> Range<u32> {
        self.tokens[b].clone()
    }
}

/// Split `kv` over `world` ranks by blocks: rank `r` gets blocks
/// `floor(r * n / world)..floor((r + 1) * n / world)` of a request of `n` blocks (a ragged
/// request is split by tokens the same way), so only the last rank can hold a partly filled
/// last page, and ranks hold equal numbers of a request's blocks to within one.
///
/// Errors: `world` of 0, or past `i32::MAX`.
///
/// ```
/// use ferrinfer_runtime::{KvIndex, KvLayout, distributed::shard_kv};
/// // Three requests of 5, 1 and 0 tokens, page size 1, over 4 ranks.
/// let kv = KvIndex::paged_from_lens(1, &[5, 1, 0], &[0, 1, 2, 3, 4, 5], 6, KvLayout::Nhd)?;
/// let shards = shard_kv(&kv, 4)?;
/// let lens: Vec<Vec<u32>> = shards
///     .iter()
///     .map(|s| (0..3).map(|b| s.kv().kv_len(b)).collect())
///     .collect();
/// assert_eq!(lens, [vec![1, 0, 0], vec![1, 0, 0], vec![1, 0, 0], vec![2, 1, 0]]);
/// # Ok::<(), ferrinfer_runtime::Error>(())
/// ```
pub fn shard_kv(kv: &KvIndex, world: usize) -> Result<Vec<KvShard>> {
    if world == 0 || world > i32::MAX as usize {
        return Err(Error::invalid(format!(
            "shard_kv: world must be in 1..=2^31-1 ranks, got {world}"
        )));
    }
    let batch = kv.batch();
    // The cut of a run of n units (blocks or tokens) before rank r; u64: n * r may pass u32.
    let cut = |n: u32, r: usize| (u64::from(n) * r as u64 / world as u64) as u32;
    (0..world)
        .map(|rank| {
            let mut indptr = Vec::with_capacity(batch + 1);
            let mut indices = Vec::new();
            let mut last_len = Vec::with_capacity(batch);
            let mut tokens = Vec::with_capacity(batch);
            indptr.push(0i32);
            for b in 0..batch {
                let first = kv.indptr()[b] as usize;
                let blocks = &kv.indices()[first..kv.indptr()[b + 1] as usize];
                let len = kv.kv_len(b);
                match kv.page_size() {
                    Some(page) => {
                        let n = blocks.len() as u32;
                        let (p0, p1) = (cut(n, rank), cut(n, rank + 1));
                        indices.extend_from_slice(&blocks[p0 as usize..p1 as usize]);
                        let end = if p1 == n { len } else { p1 * page };
                        let start = (p0 * page).min(end);
                        last_len.push(match p1 - p0 {
                            0 => 0,
                            _ => (end - (p1 - 1) * page) as i32,
                        });
                        tokens.push(start..end);
                    }
                    None => {
                        // A ragged request is one block whose id is its first token.
                        let (t0, t1) = (cut(len, rank), cut(len, rank + 1));
                        if t1 > t0 {
                            indices.push(blocks[0] + t0 as i32);
                        }
                        last_len.push((t1 - t0) as i32);
                        tokens.push(t0..t1);
                    }
                }
                indptr.push(indices.len() as i32);
            }
            // Each run's keys at their places in the whole request, so that the causal diagonal
            // and position-reading hooks see what they see on one device.
            let positions = tokens
                .iter()
                .enumerate()
                .map(|(b, t)| [kv.key_offset(b) + t.start, kv.key_total(b)])
                .collect();
            Ok(KvShard {
                rank,
                world,
                kv: kv.with_blocks(indptr, indices, last_len, Some(positions))?,
                tokens,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attention::batch::{KvLayout, indptr};

    /// Every token of every request is held by exactly one rank, in order, at the same address.
    fn check_cover(kv: &KvIndex, world: usize) {
        let heads = crate::Heads::new(2, 1, 8).unwrap();
        let shards = shard_kv(kv, world).unwrap();
        for b in 0..kv.batch() {
            let mut next = 0;
            for s in &shards {
                let t = s.tokens(b);
                assert_eq!(t.start, next, "request {b} rank {}", s.rank());
                assert_eq!(s.kv().kv_len(b), t.len() as u32);
                for (j, pos) in t.clone().enumerate() {
                    let local = s.kv().offset(&heads, b, j as u32, 0);
                    assert_eq!(
                        local,
                        kv.offset(&heads, b, pos, 0),
                        "request {b} token {pos}"
                    );
                }
                assert_eq!(s.kv().key_offset(b), t.start);
                assert_eq!(s.kv().key_total(b), kv.kv_len(b));
                next = t.end;
            }
            assert_eq!(next, kv.kv_len(b));
        }
        // Only the last rank may hold a partial page.
        if let Some(page) = kv.page_size() {
            for s in &shards[..world - 1] {
                for b in 0..kv.batch() {
                    assert!(
                        (s.tokens(b).len() as u32).is_multiple_of(page),
                        "rank {} request {b}",
                        s.rank()
                    );
                }
            }
        }
    }

    #[test]
    fn shards_cover_every_token_once() {
        let lens = [0u32, 1, 15, 16, 17, 100, 3];
        for page in [1u32, 4, 16] {
            let n: u32 = lens.iter().map(|l| l.div_ceil(page)).sum();
            let mut pages: Vec<i32> = (0..n as i32).collect();
            pages.reverse();
            let kv = KvIndex::paged_from_lens(page, &lens, &pages, n + 2, KvLayout::Nhd).unwrap();
            for world in 1..=5 {
                check_cover(&kv, world);
            }
        }
        let ragged = KvIndex::ragged(&indptr(&lens), KvLayout::Hnd).unwrap();
        for world in 1..=5 {
            check_cover(&ragged, world);
        }
    }

    #[test]
    fn world_must_be_positive() {
        let kv = KvIndex::ragged(&[0, 3], KvLayout::Nhd).unwrap();
        let e = shard_kv(&kv, 0).unwrap_err().to_string();
        assert!(
            e.contains("world must be in 1..=2^31-1 ranks, got 0"),
            "{e}"
        );
    }
}
