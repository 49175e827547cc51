//! The shape of one attention batch, on the host: heads, query rows per request, and the KV cache
//! as block-sparse rows (BSR). Validation lives here, so every backend rejects the same bad input
//! with the same message, and the addressing here is the one the kernels implement.

use crate::error::{Error, Result};

/// Head counts and head dimension. Query heads are grouped over KV heads (GQA).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Heads {
    pub num_qo_heads: u32,
    pub num_kv_heads: u32,
    pub head_dim: u32,
}

impl Heads {
    pub fn new(num_qo_heads: u32, num_kv_heads: u32, head_dim: u32) -> Result<Self> {
        let h = Heads {
            num_qo_heads,
            num_kv_heads,
            head_dim,
        };
        h.validate()?;
        Ok(h)
    }
    pub fn validate(&self) -> Result<()> {
        if self.num_qo_heads == 0 || self.num_kv_heads == 0 {
            return Err(Error::invalid("head counts must be at least 1"));
        }
        if !self.num_qo_heads.is_multiple_of(self.num_kv_heads) {
            return Err(Error::invalid(format!(
                "num_qo_heads ({}) must be a multiple of num_kv_heads ({})",
                self.num_qo_heads, self.num_kv_heads
            )));
        }
        if self.head_dim == 0 || !self.head_dim.is_multiple_of(2) {
            return Err(Error::invalid(format!(
                "head_dim must be even and at least 2, got {}",
                self.head_dim
            )));
        }
        Ok(())
    }
    /// Query heads per KV head.
    pub fn group_size(&self) -> u32 {
        self.num_qo_heads / self.num_kv_heads
    }
}

/// Order of the token and head axes inside a KV block.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum KvLayout {
    /// `[.., tokens, heads, head_dim]`
    #[default]
    Nhd,
    /// `[.., heads, tokens, head_dim]`
    Hnd,
}

/// Element strides of a KV buffer (K and V have the same shape).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvStrides {
    pub block: u64,
    pub token: u64,
    pub head: u64,
}

/// Where the keys and values of every request live: block-sparse rows.
///
/// A paged cache is BSR with blocks of `page_size` tokens; a ragged cache is one block per request
/// whose block id is the request's first token (so its "block stride" is one token).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KvIndex {
    /// `None` for a ragged cache.
    pub page_size: Option<u32>,
    /// `[batch + 1]`: blocks of request `b` are `indices[indptr[b]..indptr[b + 1]]`.
    pub indptr: Vec<i32>,
    /// Block ids (pages), or first tokens for a ragged cache.
    pub indices: Vec<i32>,
    /// `[batch]`: valid tokens in the last block of each request (0 for a request with no block).
    pub last_len: Vec<i32>,
    pub layout: KvLayout,
    /// Pages in the cache buffer (paged), or tokens (ragged): bounds for `indices`.
    pub capacity: u32,
}

impl KvIndex {
    /// A ragged cache: request `b` has tokens `kv_indptr[b]..kv_indptr[b + 1]` of K and V, which are
    /// `[total_tokens, num_kv_heads, head_dim]` (NHD) or `[num_kv_heads, total_tokens, head_dim]` (HND).
    pub fn ragged(kv_indptr: &[i32], layout: KvLayout) -> Result<Self> {
        check_indptr("kv_indptr", kv_indptr)?;
        let batch = kv_indptr.len() - 1;
        let total = *kv_indptr.last().unwrap_or(&0);
        let mut indptr = Vec::with_capacity(batch + 1);
        let mut indices = Vec::with_capacity(batch);
        let mut last_len = Vec::with_capacity(batch);
        indptr.push(0);
        for b in 0..batch {
            let len = kv_indptr[b + 1] - kv_indptr[b];
            if len > 0 {
                indices.push(kv_indptr[b]);
            }
            last_len.push(len);
            indptr.push(indices.len() as i32);
        }
        Ok(KvIndex {
            page_size: None,
            indptr,
            indices,
            last_len,
            layout,
            capacity: total as u32,
        })
    }

    /// A paged cache from the requests' lengths: request `b` holds `kv_lens[b]` tokens on the next
    /// `ceil(kv_lens[b] / page_size)` ids of `pages` (request 0's first), the last page partly
    /// filled. Builds `kv_indptr` and `kv_last_page_len`; see [`KvIndex::paged`].
    pub fn paged_from_lens(
        page_size: u32,
        kv_lens: &[u32],
        pages: &[i32],
        num_pages: u32,
        layout: KvLayout,
    ) -> Result<Self> {
        if page_size == 0 {
            return Err(Error::invalid("page_size must be at least 1"));
        }
        let counts: Vec<u32> = kv_lens.iter().map(|l| l.div_ceil(page_size)).collect();
        let needed: u64 = counts.iter().map(|&c| u64::from(c)).sum();
        if needed != pages.len() as u64 {
            return Err(Error::invalid(format!(
                "{} page ids given for requests that need {needed}",
                pages.len()
            )));
        }
        let last: Vec<i32> = kv_lens
            .iter()
            .map(|&l| {
                if l == 0 {
                    0
                } else {
                    ((l - 1) % page_size + 1) as i32
                }
            })
            .collect();
        KvIndex::paged(page_size, &indptr(&counts), pages, &last, num_pages, layout)
    }

    /// A paged cache of `num_pages` pages of `page_size` tokens; K and V are each
    /// `[num_pages, page_size, num_kv_heads, head_dim]` (NHD) or `[num_pages, num_kv_heads, page_size, head_dim]` (HND).
    pub fn paged(
        page_size: u32,
        indptr: &[i32],
        indices: &[i32],
        last_page_len: &[i32],
        num_pages: u32,
        layout: KvLayout,
    ) -> Result<Self> {
        if page_size == 0 {
            return Err(Error::invalid("page_size must be at least 1"));
        }
        check_indptr("kv_indptr", indptr)?;
        let batch = indptr.len() - 1;
        if *indptr.last().unwrap_or(&0) as usize != indices.len() {
            return Err(Error::invalid(format!(
                "kv_indptr ends at {} but kv_indices has {} entries",
                indptr[batch],
                indices.len()
            )));
        }
        if last_page_len.len() != batch {
            return Err(Error::invalid(format!(
                "kv_last_page_len has {} entries for a batch of {batch}",
                last_page_len.len()
            )));
        }
        for (i, &p) in indices.iter().enumerate() {
            if p < 0 || p as u32 >= num_pages {
                return Err(Error::invalid(format!(
                    "kv_indices[{i}] = {p} is outside the cache's {num_pages} pages"
                )));
            }
        }
        for b in 0..batch {
            let pages = indptr[b + 1] - indptr[b];
            let last = last_page_len[b];
            let ok = if pages == 0 {
                last == 0
            } else {
                last >= 1 && last as u32 <= page_size
            };
            if !ok {
                return Err(Error::invalid(format!(
                    "kv_last_page_len[{b}] = {last} must be in 1..={page_size} (0 for a request with no page)"
                )));
            }
        }
        Ok(KvIndex {
            page_size: Some(page_size),
            indptr: indptr.to_vec(),
            indices: indices.to_vec(),
            last_len: last_page_len.to_vec(),
            layout,
            capacity: num_pages,
        })
    }

    pub fn batch(&self) -> usize {
        self.indptr.len() - 1
    }

    /// KV tokens of request `b`.
    pub fn kv_len(&self, b: usize) -> u32 {
        let blocks = (self.indptr[b + 1] - self.indptr[b]) as u32;
        match (blocks, self.page_size) {
            (0, _) => 0,
            (n, Some(p)) => (n - 1) * p + self.last_len[b] as u32,
            (_, None) => self.last_len[b] as u32,
        }
    }

    /// Element strides of K (and V) for these heads.
    pub fn strides(&self, heads: &Heads) -> KvStrides {
        let (hk, d) = (u64::from(heads.num_kv_heads), u64::from(heads.head_dim));
        match (self.page_size, self.layout) {
            (Some(p), KvLayout::Nhd) => KvStrides {
                block: u64::from(p) * hk * d,
                token: hk * d,
                head: d,
            },
            (Some(p), KvLayout::Hnd) => KvStrides {
                block: hk * u64::from(p) * d,
                token: d,
                head: u64::from(p) * d,
            },
            (None, KvLayout::Nhd) => KvStrides {
                block: hk * d,
                token: hk * d,
                head: d,
            },
            (None, KvLayout::Hnd) => KvStrides {
                block: d,
                token: d,
                head: u64::from(self.capacity) * d,
            },
        }
    }

    /// Elements K (and V) must have.
    pub fn buffer_len(&self, heads: &Heads) -> usize {
        let per_token = heads.num_kv_heads as usize * heads.head_dim as usize;
        self.capacity as usize * self.page_size.unwrap_or(1) as usize * per_token
    }

    /// Offset of element 0 of key `j` of request `b`, head `kv_head`.
    pub fn offset(&self, heads: &Heads, b: usize, j: u32, kv_head: u32) -> usize {
        let s = self.strides(heads);
        let (block, slot) = match self.page_size {
            Some(p) => (
                self.indices[self.indptr[b] as usize + (j / p) as usize],
                j % p,
            ),
            None => (self.indices[self.indptr[b] as usize], j),
        };
        (block as u64 * s.block + u64::from(slot) * s.token + u64::from(kv_head) * s.head) as usize
    }
}

/// One batch: which query rows belong to which request, where their keys are, and the mask mode.
#[derive(Clone, Debug, PartialEq)]
pub struct Batch {
    pub heads: Heads,
    /// `[batch + 1]`: query rows of request `b` are `qo_indptr[b]..qo_indptr[b + 1]`.
    pub qo_indptr: Vec<i32>,
    pub kv: KvIndex,
    /// Bottom-right aligned causal mask (query row `i` sees keys `0..=i + kv_len - qo_len`).
    pub causal: bool,
    /// Multiplies `q . k` before the logits hook; `1/sqrt(head_dim)` by default.
    pub sm_scale: f32,
}

impl Batch {
    /// A validated batch with the default `sm_scale` and no causal mask.
    pub fn new(heads: Heads, qo_indptr: &[i32], kv: KvIndex) -> Result<Self> {
        heads.validate()?;
        check_indptr("qo_indptr", qo_indptr)?;
        if qo_indptr.len() != kv.indptr.len() {
            return Err(Error::invalid(format!(
                "qo_indptr describes {} requests but the KV index {}",
                qo_indptr.len() - 1,
                kv.batch()
            )));
        }
        Ok(Batch {
            heads,
            qo_indptr: qo_indptr.to_vec(),
            kv,
            causal: false,
            sm_scale: 1.0 / (heads.head_dim as f32).sqrt(),
        })
    }
    /// One query row per request (decode).
    pub fn decode(heads: Heads, kv: KvIndex) -> Result<Self> {
        let qo: Vec<i32> = (0..=kv.batch() as i32).collect();
        Batch::new(heads, &qo, kv)
    }
    pub fn with_causal(mut self, causal: bool) -> Self {
        self.causal = causal;
        self
    }
    pub fn with_sm_scale(mut self, sm_scale: f32) -> Self {
        self.sm_scale = sm_scale;
        self
    }
    pub fn batch(&self) -> usize {
        self.qo_indptr.len() - 1
    }
    /// Query rows of all requests.
    pub fn total_qo(&self) -> usize {
        *self.qo_indptr.last().unwrap_or(&0) as usize
    }
    pub fn qo_len(&self, b: usize) -> u32 {
        (self.qo_indptr[b + 1] - self.qo_indptr[b]) as u32
    }
    /// Elements of q and o: `[total_qo, num_qo_heads, head_dim]`.
    pub fn q_len(&self) -> usize {
        self.total_qo() * self.heads.num_qo_heads as usize * self.heads.head_dim as usize
    }
    /// Elements of the log-sum-exp output: `[total_qo, num_qo_heads]`.
    pub fn lse_len(&self) -> usize {
        self.total_qo() * self.heads.num_qo_heads as usize
    }

    /// Check buffer lengths against the batch (element counts).
    pub fn check_lengths(&self, q: usize, k: usize, v: usize, o: usize) -> Result<()> {
        if !self.sm_scale.is_finite() {
            return Err(Error::invalid("sm_scale must be finite"));
        }
        let want_q = self.q_len();
        let want_kv = self.kv.buffer_len(&self.heads);
        for (name, got, want) in [("q", q, want_q), ("o", o, want_q)] {
            if got != want {
                return Err(Error::invalid(format!(
                    "{name} has {got} elements; [total_qo={}, num_qo_heads={}, head_dim={}] needs {want}",
                    self.total_qo(),
                    self.heads.num_qo_heads,
                    self.heads.head_dim
                )));
            }
        }
        for (name, got) in [("k", k), ("v", v)] {
            if got != want_kv {
                return Err(Error::invalid(format!(
                    "{name} has {got} elements; the KV index ({} {}, {} KV heads, head_dim {}) needs {want_kv}",
                    self.kv.capacity,
                    if self.kv.page_size.is_some() {
                        "pages"
                    } else {
                        "tokens"
                    },
                    self.heads.num_kv_heads,
                    self.heads.head_dim
                )));
            }
        }
        Ok(())
    }
}

/// The CSR row pointer of these lengths: `[0, l0, l0 + l1, ...]` (`qo_indptr`, ragged `kv_indptr`).
pub fn indptr(lens: &[u32]) -> Vec<i32> {
    let mut out = Vec::with_capacity(lens.len() + 1);
    out.push(0i32);
    let mut sum = 0i32;
    for &l in lens {
        sum += l as i32;
        out.push(sum);
    }
    out
}

fn check_indptr(name: &str, indptr: &[i32]) -> Result<()> {
    if indptr.len() < 2 {
        return Err(Error::invalid(format!(
            "{name} needs at least 2 entries (batch + 1), got {}",
            indptr.len()
        )));
    }
    if indptr[0] != 0 {
        return Err(Error::invalid(format!(
            "{name}[0] must be 0, got {}",
            indptr[0]
        )));
    }
    for i in 1..indptr.len() {
        if indptr[i] < indptr[i - 1] {
            return Err(Error::invalid(format!(
                "{name} must not decrease: {name}[{}] = {} > {name}[{i}] = {}",
                i - 1,
                indptr[i - 1],
                indptr[i]
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn heads() -> Heads {
        Heads::new(4, 2, 8).unwrap()
    }

    #[test]
    fn paged_lengths_and_offsets() {
        let kv = KvIndex::paged(4, &[0, 2, 3], &[5, 1, 0], &[3, 4], 6, KvLayout::Nhd).unwrap();
        assert_eq!(kv.kv_len(0), 7);
        assert_eq!(kv.kv_len(1), 4);
        let h = heads();
        // request 0, token 5 = page 1 slot 1, head 1
        assert_eq!(kv.offset(&h, 0, 5, 1), 4 * 2 * 8 + 2 * 8 + 8);
        let hnd = KvIndex::paged(4, &[0, 2, 3], &[5, 1, 0], &[3, 4], 6, KvLayout::Hnd).unwrap();
        assert_eq!(hnd.offset(&h, 0, 5, 1), 4 * 2 * 8 + 4 * 8 + 8);
    }

    #[test]
    fn ragged_is_one_block_per_request() {
        let kv = KvIndex::ragged(&[0, 3, 3, 10], KvLayout::Nhd).unwrap();
        assert_eq!(kv.indptr, vec![0, 1, 1, 2]);
        assert_eq!(kv.indices, vec![0, 3]);
        assert_eq!((kv.kv_len(0), kv.kv_len(1), kv.kv_len(2)), (3, 0, 7));
        assert_eq!(kv.offset(&heads(), 2, 2, 1), 5 * 16 + 8);
    }

    #[test]
    fn bad_page_tables_are_refused() {
        let e = |r: Result<KvIndex>| r.unwrap_err().to_string();
        assert!(e(KvIndex::paged(4, &[0, 2], &[0, 9], &[1], 4, KvLayout::Nhd)).contains("outside"));
        assert!(e(KvIndex::paged(4, &[0, 1], &[0], &[5], 4, KvLayout::Nhd)).contains("1..=4"));
        assert!(
            e(KvIndex::paged(
                4,
                &[0, 2, 1],
                &[0, 1],
                &[1, 1],
                4,
                KvLayout::Nhd
            ))
            .contains("must not decrease")
        );
        assert!(e(KvIndex::paged(4, &[1, 2], &[0], &[1], 4, KvLayout::Nhd)).contains("must be 0"));
        assert!(e(KvIndex::paged(0, &[0, 1], &[0], &[1], 4, KvLayout::Nhd)).contains("page_size"));
    }

    #[test]
    fn paged_from_lens_builds_the_page_table() {
        assert_eq!(indptr(&[3, 0, 5]), vec![0, 3, 3, 8]);
        let kv = KvIndex::paged_from_lens(4, &[7, 0, 4], &[5, 1, 0], 6, KvLayout::Nhd).unwrap();
        let want = KvIndex::paged(4, &[0, 2, 2, 3], &[5, 1, 0], &[3, 0, 4], 6, KvLayout::Nhd);
        assert_eq!(kv, want.unwrap());
        let e = KvIndex::paged_from_lens(4, &[7], &[5], 6, KvLayout::Nhd).unwrap_err();
        assert!(
            e.to_string()
                .contains("1 page ids given for requests that need 2"),
            "{e}"
        );
        assert!(KvIndex::paged_from_lens(0, &[7], &[5], 6, KvLayout::Nhd).is_err());
    }

    #[test]
    fn heads_must_group() {
        assert!(Heads::new(6, 4, 64).is_err());
        assert!(Heads::new(8, 0, 64).is_err());
        assert!(Heads::new(8, 2, 63).is_err());
    }

    #[test]
    fn buffer_lengths_are_checked() {
        let kv = KvIndex::ragged(&[0, 4], KvLayout::Nhd).unwrap();
        let b = Batch::new(heads(), &[0, 2], kv).unwrap();
        assert!(
            b.check_lengths(2 * 4 * 8, 4 * 2 * 8, 4 * 2 * 8, 2 * 4 * 8)
                .is_ok()
        );
        let msg = b.check_lengths(1, 64, 64, 64).unwrap_err().to_string();
        assert!(msg.contains("q has 1 elements"), "{msg}");
    }
}
