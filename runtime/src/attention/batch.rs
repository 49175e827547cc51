//! The shape of one attention batch, on the host: heads, query rows per request, and the KV cache
//! as block-sparse rows (BSR). Validation lives here, so every backend rejects the same bad input
//! with the same message, and the addressing here is the one the kernels implement.
//!
//! The types are opaque: fields are private, constructors validate, and [`Batch::validate`] (which
//! every plan, replan and run calls again) re-checks everything the kernels rely on, so no value
//! that reaches a kernel was left unchecked.

use crate::error::{Error, Result};

/// Head counts and head dimension. Query heads are grouped over KV heads (GQA).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Heads {
    num_qo_heads: u32,
    num_kv_heads: u32,
    head_dim: u32,
}

impl Heads {
    /// `num_qo_heads` query heads over `num_kv_heads` KV heads (a divisor), each `head_dim` wide
    /// (even). Which head dims have kernels is the dispatcher's business.
    pub fn new(num_qo_heads: u32, num_kv_heads: u32, head_dim: u32) -> Result<Self> {
        let h = Heads {
            num_qo_heads,
            num_kv_heads,
            head_dim,
        };
        h.validate()?;
        Ok(h)
    }
    fn validate(&self) -> Result<()> {
        if self.num_qo_heads == 0 || self.num_kv_heads == 0 {
            return Err(Error::invalid(format!(
                "head counts must be at least 1, got num_qo_heads = {} and num_kv_heads = {}",
                self.num_qo_heads, self.num_kv_heads
            )));
        }
        if !self.num_qo_heads.is_multiple_of(self.num_kv_heads) {
            return Err(Error::invalid(format!(
                "num_qo_heads ({}) must be a multiple of num_kv_heads ({})",
                self.num_qo_heads, self.num_kv_heads
            )));
        }
        if self.head_dim == 0 || !self.head_dim.is_multiple_of(2) || self.head_dim > 1 << 16 {
            return Err(Error::invalid(format!(
                "head_dim must be even and in 2..=65536, got {}",
                self.head_dim
            )));
        }
        Ok(())
    }
    /// Query heads.
    pub fn num_qo_heads(&self) -> u32 {
        self.num_qo_heads
    }
    /// KV heads.
    pub fn num_kv_heads(&self) -> u32 {
        self.num_kv_heads
    }
    /// Elements per head vector.
    pub fn head_dim(&self) -> u32 {
        self.head_dim
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

/// Element strides of a KV buffer (K and V have the same shape). The dense strides of a layout
/// are [`KvIndex::strides`]; others (an interleaved cache, padded pages) are given with
/// [`KvIndex::with_strides`], which checks them against every batch that uses the index.
///
/// ```
/// use ferrinfer_runtime::{Heads, KvIndex, KvLayout};
/// let heads = Heads::new(8, 2, 64)?;
/// let kv = KvIndex::paged_from_lens(16, &[20], &[3, 1], 4, KvLayout::Nhd)?;
/// let s = kv.strides(&heads);
/// assert_eq!((s.block, s.token, s.head), (16 * 2 * 64, 2 * 64, 64));
/// # Ok::<(), ferrinfer_runtime::Error>(())
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct KvStrides {
    /// Between consecutive blocks (pages); one token for a ragged cache.
    pub block: u64,
    /// Between consecutive tokens of a block.
    pub token: u64,
    /// Between consecutive KV heads.
    pub head: u64,
}

/// Where the keys and values of every request live: block-sparse rows.
///
/// A paged cache is BSR with blocks of `page_size` tokens; a ragged cache is one block per request
/// whose block id is the request's first token (so its "block stride" is one token). Built only by
/// the validating constructors; read through the accessors.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KvIndex {
    /// `None` for a ragged cache.
    page_size: Option<u32>,
    /// `[batch + 1]`: blocks of request `b` are `indices[indptr[b]..indptr[b + 1]]`.
    indptr: Vec<i32>,
    /// Block ids (pages), or first tokens for a ragged cache.
    indices: Vec<i32>,
    /// `[batch]`: valid tokens in the last block of each request (0 for a request with no block).
    last_len: Vec<i32>,
    layout: KvLayout,
    /// Pages in the cache buffer (paged), or tokens (ragged): bounds for `indices`.
    capacity: u32,
    /// Strides the caller gave; `None`: the layout's dense strides.
    custom: Option<KvStrides>,
    /// `[batch]` (first position, whole length) of each request's keys in its whole request
    /// ([`KvIndex::with_key_positions`]); `None`: every request is whole.
    positions: Option<Vec<[u32; 2]>>,
}

impl KvIndex {
    /// A ragged cache: request `b` has tokens `kv_indptr[b]..kv_indptr[b + 1]` of K and V, which are
    /// `[total_tokens, num_kv_heads, head_dim]` (NHD) or `[num_kv_heads, total_tokens, head_dim]` (HND).
    pub fn ragged(kv_indptr: &[i32], layout: KvLayout) -> Result<Self> {
        check_indptr("kv_indptr", kv_indptr)?;
        let total = kv_indptr[kv_indptr.len() - 1];
        Self::ragged_in(kv_indptr, total as u32, layout)
    }

    /// A ragged cache inside K and V buffers of `capacity_tokens` tokens (at least the last entry of
    /// `kv_indptr`): the form a CUDA-graph plan needs, whose buffers and strides never change.
    pub fn ragged_in(kv_indptr: &[i32], capacity_tokens: u32, layout: KvLayout) -> Result<Self> {
        check_indptr("kv_indptr", kv_indptr)?;
        let batch = kv_indptr.len() - 1;
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
        let kv = KvIndex {
            page_size: None,
            indptr,
            indices,
            last_len,
            layout,
            capacity: capacity_tokens,
            custom: None,
            positions: None,
        };
        kv.validate()?;
        Ok(kv)
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
            return Err(Error::invalid("page_size must be at least 1, got 0"));
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
        let counts = checked_indptr("kv_lens (in pages)", &counts)?;
        KvIndex::paged(page_size, &counts, pages, &last, num_pages, layout)
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
        let kv = KvIndex {
            page_size: Some(page_size),
            indptr: indptr.to_vec(),
            indices: indices.to_vec(),
            last_len: last_page_len.to_vec(),
            layout,
            capacity: num_pages,
            custom: None,
            positions: None,
        };
        kv.validate()?;
        Ok(kv)
    }

    /// The same index over K and V with these element strides instead of the layout's dense
    /// ones: K and V may then be views into larger tensors, such as one interleaved cache (see
    /// [`KvIndex::interleaved`]). A ragged index takes `block == token` (a block id is a token).
    /// Every batch that uses the index checks that no two (block, token, head, element) of the
    /// cache share an element and that K and V hold the largest offset any block id below the
    /// capacity reaches; the GPU also needs strides that are multiples of 8 elements.
    ///
    /// ```
    /// use ferrinfer_runtime::{Heads, KvIndex, KvLayout, attention::KvStrides};
    /// let heads = Heads::new(4, 2, 64)?;
    /// // Pages padded to 2304 elements instead of 16 x 2 x 64 = 2048.
    /// let kv = KvIndex::paged_from_lens(16, &[20], &[3, 1], 4, KvLayout::Nhd)?
    ///     .with_strides(KvStrides { block: 2304, token: 128, head: 64 })?;
    /// assert_eq!(kv.buffer_len(&heads), 3 * 2304 + 15 * 128 + 64 + 64);
    /// # Ok::<(), ferrinfer_runtime::Error>(())
    /// ```
    pub fn with_strides(mut self, strides: KvStrides) -> Result<Self> {
        if self.page_size.is_none() && strides.block != strides.token {
            return Err(Error::invalid(format!(
                "a ragged KV index takes block == token strides (a block id is a token), got \
                 {strides:?}"
            )));
        }
        self.custom = Some(strides);
        self.validate()?;
        Ok(self)
    }

    /// The index over one interleaved cache `[num_pages, 2, page_size, num_kv_heads, head_dim]`
    /// (NHD; `[num_pages, 2, num_kv_heads, page_size, head_dim]` for HND): K is page slot 0, V
    /// slot 1, as vLLM and FlashInfer keep it. Pass the cache as K and the cache from element
    /// [`KvIndex::interleaved_v_offset`] as V. Paged indices only.
    ///
    /// ```
    /// use ferrinfer_runtime::{Heads, KvIndex, KvLayout, Src, View};
    /// let heads = Heads::new(2, 1, 8)?;
    /// let kv = KvIndex::paged_from_lens(4, &[6], &[2, 0], 3, KvLayout::Nhd)?.interleaved(&heads)?;
    /// let cache = vec![0.0f32; 3 * 2 * 4 * 8];
    /// let k = View::host(&cache);
    /// let v = View::host(&cache).slice(kv.interleaved_v_offset(&heads)..)?;
    /// assert!(k.len() >= kv.buffer_len(&heads) && v.len() >= kv.buffer_len(&heads));
    /// # Ok::<(), ferrinfer_runtime::Error>(())
    /// ```
    pub fn interleaved(self, heads: &Heads) -> Result<Self> {
        if self.page_size.is_none() {
            return Err(Error::invalid(
                "an interleaved K/V cache is paged; this KV index is ragged",
            ));
        }
        let dense = KvIndex {
            custom: None,
            ..self.clone()
        }
        .strides(heads);
        self.with_strides(KvStrides {
            block: 2 * dense.block,
            ..dense
        })
    }

    /// Elements from K to V in an interleaved cache: one page of K.
    ///
    /// ```
    /// use ferrinfer_runtime::{Heads, KvIndex, KvLayout};
    /// let heads = Heads::new(2, 1, 8)?;
    /// let kv = KvIndex::paged_from_lens(4, &[6], &[2, 0], 3, KvLayout::Nhd)?;
    /// assert_eq!(kv.interleaved_v_offset(&heads), 4 * 8);
    /// # Ok::<(), ferrinfer_runtime::Error>(())
    /// ```
    pub fn interleaved_v_offset(&self, heads: &Heads) -> usize {
        self.page_size.unwrap_or(1) as usize
            * heads.num_kv_heads() as usize
            * heads.head_dim() as usize
    }

    /// An index over the same cache (page size, layout, capacity, strides) with these blocks
    /// at these key positions: the shards of [`crate::distributed::shard_kv`]. Validated like
    /// every constructor.
    pub(crate) fn with_blocks(
        &self,
        indptr: Vec<i32>,
        indices: Vec<i32>,
        last_len: Vec<i32>,
        positions: Option<Vec<[u32; 2]>>,
    ) -> Result<Self> {
        let kv = KvIndex {
            indptr,
            indices,
            last_len,
            positions,
            ..self.clone()
        };
        kv.validate()?;
        Ok(kv)
    }

    /// The same index with each request's keys placed in a longer request: the keys `0..kv_len(b)`
    /// of request `b` are keys `offsets[b]..offsets[b] + kv_len(b)` of a request of `totals[b]`
    /// keys, as on a rank of a context-parallel group that holds a run of every request's keys
    /// ([`crate::distributed::shard_kv`] sets them). The causal mask is aligned to the end of the
    /// whole request (query row `i` of `qo_len` rows sees the keys at positions up to
    /// `i + totals[b] - qo_len`), and the hooks see whole-request positions (`Pos::kv_pos` is
    /// `offsets[b] + j`, `Pos::kv_len` is `totals[b]`), so ALiBi, sliding windows and masks give
    /// on a shard what they give on the whole request. Without positions every request starts at
    /// 0 and is whole.
    ///
    /// Errors: slices whose length is not the batch, a run that ends past its total
    /// (`offsets[b] + kv_len(b) > totals[b]`), or a total past 2^31 - 1.
    ///
    /// ```
    /// use ferrinfer_runtime::{KvIndex, KvLayout};
    /// // The last 8 keys of a 40-key request, stored as one ragged request of 8 tokens.
    /// let kv = KvIndex::ragged(&[0, 8], KvLayout::Nhd)?.with_key_positions(&[32], &[40])?;
    /// assert_eq!((kv.key_offset(0), kv.key_total(0), kv.kv_len(0)), (32, 40, 8));
    /// let e = KvIndex::ragged(&[0, 8], KvLayout::Nhd)?.with_key_positions(&[33], &[40]);
    /// assert!(e.unwrap_err().to_string().contains("past its request's 40 keys"));
    /// # Ok::<(), ferrinfer_runtime::Error>(())
    /// ```
    pub fn with_key_positions(mut self, offsets: &[u32], totals: &[u32]) -> Result<Self> {
        if offsets.len() != totals.len() {
            return Err(Error::invalid(format!(
                "with_key_positions: {} offsets but {} totals; give one of each per request",
                offsets.len(),
                totals.len()
            )));
        }
        self.positions = Some(offsets.iter().zip(totals).map(|(&o, &t)| [o, t]).collect());
        self.validate()?;
        Ok(self)
    }

    /// Whether the index places its requests' keys in longer requests
    /// ([`KvIndex::with_key_positions`]).
    pub fn has_key_positions(&self) -> bool {
        self.positions.is_some()
    }

    /// Position in its whole request of request `b`'s key 0: 0 unless
    /// [`KvIndex::with_key_positions`] said otherwise.
    ///
    /// # Panics
    /// When `b` is not below the batch size.
    pub fn key_offset(&self, b: usize) -> u32 {
        match &self.positions {
            Some(p) => p[b][0],
            None => {
                assert!(b < self.batch(), "request {b} of {}", self.batch());
                0
            }
        }
    }

    /// Keys of request `b`'s whole request: [`KvIndex::kv_len`] unless
    /// [`KvIndex::with_key_positions`] said otherwise.
    ///
    /// # Panics
    /// When `b` is not below the batch size.
    pub fn key_total(&self, b: usize) -> u32 {
        match &self.positions {
            Some(p) => p[b][1],
            None => self.kv_len(b),
        }
    }

    /// Whether the strides are the caller's ([`KvIndex::with_strides`]), not the layout's.
    pub fn has_custom_strides(&self) -> bool {
        self.custom.is_some()
    }

    /// Check caller-given strides against the heads: no two elements of the cache alias, and the
    /// extent fits the address space.
    pub(crate) fn check_strides(&self, heads: &Heads) -> Result<()> {
        let Some(s) = self.custom else {
            return Ok(());
        };
        let (hk, d) = (u64::from(heads.num_kv_heads), u64::from(heads.head_dim));
        let cap = u64::from(self.capacity);
        let dims: Vec<(u64, u64)> = match self.page_size {
            Some(p) => vec![
                (1, d),
                (s.token, u64::from(p)),
                (s.head, hk),
                (s.block, cap),
            ],
            None => vec![(1, d), (s.token, cap), (s.head, hk)],
        };
        if !disjoint(&dims) {
            return Err(Error::invalid(format!(
                "KV strides {s:?} make two elements of the cache alias (head_dim {d}, {hk} KV \
                 heads, page size {:?}, capacity {cap})",
                self.page_size
            )));
        }
        if extent(&dims).is_none_or(|e| e > isize::MAX as u64 / 4) {
            return Err(Error::invalid(format!(
                "KV strides {s:?} reach past the address space"
            )));
        }
        Ok(())
    }

    /// Check every invariant the kernels rely on: the row pointer starts at 0, never decreases and
    /// ends at the number of block ids; every block id is inside the cache; every last-block length
    /// is in range; every request's length fits the kernels' 32-bit signed positions.
    pub(crate) fn validate(&self) -> Result<()> {
        check_indptr("kv_indptr", &self.indptr)?;
        let batch = self.indptr.len() - 1;
        if self.indptr[batch] as usize != self.indices.len() {
            return Err(Error::invalid(format!(
                "kv_indptr ends at {} but kv_indices has {} entries",
                self.indptr[batch],
                self.indices.len()
            )));
        }
        if self.last_len.len() != batch {
            return Err(Error::invalid(format!(
                "kv_last_page_len has {} entries for a batch of {batch}",
                self.last_len.len()
            )));
        }
        if self.capacity == u32::MAX || self.capacity > i32::MAX as u32 {
            return Err(Error::invalid(format!(
                "the cache's capacity ({}) must be below 2^31 blocks",
                self.capacity
            )));
        }
        match self.page_size {
            Some(0) => return Err(Error::invalid("page_size must be at least 1, got 0")),
            Some(page) => {
                for (i, &p) in self.indices.iter().enumerate() {
                    if p < 0 || p as u32 >= self.capacity {
                        return Err(Error::invalid(format!(
                            "kv_indices[{i}] = {p} is outside the cache's {} pages",
                            self.capacity
                        )));
                    }
                }
                for b in 0..batch {
                    let pages = self.indptr[b + 1] - self.indptr[b];
                    let last = self.last_len[b];
                    let ok = if pages == 0 {
                        last == 0
                    } else {
                        last >= 1 && last as u32 <= page
                    };
                    if !ok {
                        return Err(Error::invalid(format!(
                            "kv_last_page_len[{b}] = {last} must be in 1..={page} (0 for a \
                             request with no page)"
                        )));
                    }
                    let len =
                        u64::from(pages as u32).saturating_sub(1) * u64::from(page) + last as u64;
                    if len > i32::MAX as u64 {
                        return Err(Error::invalid(format!(
                            "request {b} has {len} KV tokens; at most 2^31 - 1 are supported"
                        )));
                    }
                }
            }
            None => {
                // One block per non-empty request: its first token, then its length.
                let mut end = 0i64;
                for b in 0..batch {
                    let blocks = self.indptr[b + 1] - self.indptr[b];
                    let len = self.last_len[b];
                    let ok = match blocks {
                        0 => len == 0,
                        1 => len >= 1,
                        _ => false,
                    };
                    if !ok {
                        return Err(Error::invalid(format!(
                            "ragged request {b} has {blocks} blocks of length {len}; a ragged \
                             request is one block (or none when empty)"
                        )));
                    }
                    if blocks == 1 {
                        let first = i64::from(self.indices[self.indptr[b] as usize]);
                        end = end.max(first + i64::from(len));
                        if first < 0 {
                            return Err(Error::invalid(format!(
                                "ragged request {b} starts at token {first}"
                            )));
                        }
                    }
                }
                if end > i64::from(self.capacity) {
                    return Err(Error::invalid(format!(
                        "the ragged requests reach token {end} but K and V hold {} tokens",
                        self.capacity
                    )));
                }
            }
        }
        if let Some(positions) = &self.positions {
            if positions.len() != batch {
                return Err(Error::invalid(format!(
                    "key positions are given for {} requests but the KV index has {batch}",
                    positions.len()
                )));
            }
            for (b, &[offset, total]) in positions.iter().enumerate() {
                let end = u64::from(offset) + u64::from(self.kv_len(b));
                if end > u64::from(total) {
                    return Err(Error::invalid(format!(
                        "request {b}'s {} keys at position {offset} end at {end}, past its \
                         request's {total} keys",
                        self.kv_len(b)
                    )));
                }
                if total > i32::MAX as u32 {
                    return Err(Error::invalid(format!(
                        "request {b} has a whole length of {total} keys; at most 2^31 - 1 are \
                         supported"
                    )));
                }
            }
        }
        Ok(())
    }

    /// Requests.
    pub fn batch(&self) -> usize {
        self.indptr.len() - 1
    }
    /// Tokens per page, `None` for a ragged cache.
    pub fn page_size(&self) -> Option<u32> {
        self.page_size
    }
    /// `[batch + 1]`: the blocks of request `b` are `indices()[indptr()[b]..indptr()[b + 1]]`.
    pub fn indptr(&self) -> &[i32] {
        &self.indptr
    }
    /// Block ids (pages), or each non-empty request's first token for a ragged cache.
    pub fn indices(&self) -> &[i32] {
        &self.indices
    }
    /// `[batch]`: valid tokens in each request's last block (0 for a request with none).
    pub fn last_len(&self) -> &[i32] {
        &self.last_len
    }
    /// The token/head order of a block.
    pub fn layout(&self) -> KvLayout {
        self.layout
    }
    /// Pages of the cache (paged), or tokens of K and V (ragged).
    pub fn capacity(&self) -> u32 {
        self.capacity
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

    /// Element strides of K (and V) for these heads: the caller's ([`KvIndex::with_strides`]) or
    /// the layout's dense ones.
    pub fn strides(&self, heads: &Heads) -> KvStrides {
        if let Some(s) = self.custom {
            return s;
        }
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

    /// Elements K (and V) must have: exactly this many with dense strides, at least this many
    /// (the largest offset reached, plus one head) with the caller's.
    pub fn buffer_len(&self, heads: &Heads) -> usize {
        if let Some(s) = self.custom {
            let (hk, d) = (u64::from(heads.num_kv_heads), u64::from(heads.head_dim));
            let dims = match self.page_size {
                Some(p) => [
                    (1, d),
                    (s.token, u64::from(p)),
                    (s.head, hk),
                    (s.block, u64::from(self.capacity)),
                ],
                None => [
                    (1, d),
                    (s.token, u64::from(self.capacity)),
                    (s.head, hk),
                    (0, 1),
                ],
            };
            // check_strides (Batch::validate) bounded it by the address space.
            return extent(&dims).unwrap_or(u64::MAX) as usize;
        }
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

/// Element strides of q or o: between query rows and between heads of a row (a head's
/// `head_dim` elements are contiguous). The dense layout `[rows, num_qo_heads, head_dim]` is
/// [`QoStrides::dense`]; q inside a fused QKV projection `[tokens, (hq + 2 hk) * head_dim]` has
/// row stride `(hq + 2 hk) * head_dim`. Set on a batch with [`Batch::with_qo_strides`].
///
/// ```
/// use ferrinfer_runtime::{Heads, attention::QoStrides};
/// let heads = Heads::new(8, 2, 64)?;
/// assert_eq!(QoStrides::dense(&heads), QoStrides::new(8 * 64, 64));
/// let in_qkv = QoStrides::new((8 + 2 * 2) * 64, 64);
/// assert_eq!(in_qkv.row(), 768);
/// # Ok::<(), ferrinfer_runtime::Error>(())
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct QoStrides {
    row: u64,
    head: u64,
}

impl QoStrides {
    /// Strides between rows and between heads, in elements (checked against each batch).
    pub fn new(row: u64, head: u64) -> Self {
        QoStrides { row, head }
    }
    /// `[rows, num_qo_heads, head_dim]`.
    pub fn dense(heads: &Heads) -> Self {
        let d = u64::from(heads.head_dim);
        QoStrides::new(u64::from(heads.num_qo_heads) * d, d)
    }
    /// Elements between consecutive query rows.
    pub fn row(&self) -> u64 {
        self.row
    }
    /// Elements between consecutive heads of a row.
    pub fn head(&self) -> u64 {
        self.head
    }
    /// Element offset of head `h` of row `r`.
    pub(crate) fn at(&self, r: usize, h: usize) -> usize {
        (r as u64 * self.row + h as u64 * self.head) as usize
    }
    /// The (stride, extent) dims of `rows` rows.
    fn dims(&self, heads: &Heads, rows: usize) -> [(u64, u64); 3] {
        [
            (1, u64::from(heads.head_dim)),
            (self.head, u64::from(heads.num_qo_heads)),
            (self.row, rows as u64),
        ]
    }
}

/// Whether no two index tuples of these (stride, extent) dims reach the same offset: sorted by
/// stride, each stride clears the span of the ones below it (sufficient, and what every
/// nested tensor layout meets).
pub(crate) fn disjoint(dims: &[(u64, u64)]) -> bool {
    let mut dims: Vec<(u64, u64)> = dims.iter().copied().filter(|&(_, n)| n > 1).collect();
    dims.sort_unstable();
    let mut span = 1u64;
    for (stride, n) in dims {
        if stride < span {
            return false;
        }
        match (n - 1)
            .checked_mul(stride)
            .and_then(|x| x.checked_add(span))
        {
            Some(x) => span = x,
            None => return false,
        }
    }
    true
}

/// Elements a tensor of these (stride, extent) dims spans: its largest offset plus one; 0 when
/// an extent is 0; `None` past u64.
pub(crate) fn extent(dims: &[(u64, u64)]) -> Option<u64> {
    if dims.iter().any(|&(_, n)| n == 0) {
        return Some(0);
    }
    dims.iter().try_fold(1u64, |acc, &(stride, n)| {
        (n - 1).checked_mul(stride)?.checked_add(acc)
    })
}

/// One batch: which query rows belong to which request, where their keys are, and the mask mode.
/// Built only by the validating constructors; read through the accessors.
#[derive(Clone, Debug, PartialEq)]
pub struct Batch {
    heads: Heads,
    /// `[batch + 1]`: query rows of request `b` are `qo_indptr[b]..qo_indptr[b + 1]`.
    qo_indptr: Vec<i32>,
    kv: KvIndex,
    causal: bool,
    sm_scale: f32,
    /// `None`: dense.
    q_strides: Option<QoStrides>,
    o_strides: Option<QoStrides>,
}

impl Batch {
    /// A validated batch with the default `sm_scale` (`1/sqrt(head_dim)`) and no causal mask.
    pub fn new(heads: Heads, qo_indptr: &[i32], kv: KvIndex) -> Result<Self> {
        let b = Batch {
            heads,
            qo_indptr: qo_indptr.to_vec(),
            kv,
            causal: false,
            sm_scale: 1.0 / (heads.head_dim as f32).sqrt(),
            q_strides: None,
            o_strides: None,
        };
        b.validate()?;
        Ok(b)
    }
    /// One query row per request (decode).
    pub fn decode(heads: Heads, kv: KvIndex) -> Result<Self> {
        let qo: Vec<i32> = (0..=kv.batch() as i32).collect();
        Batch::new(heads, &qo, kv)
    }
    /// With or without the bottom-right aligned causal mask (query row `i` of a request sees keys
    /// `0..=i + kv_len - qo_len`).
    pub fn with_causal(mut self, causal: bool) -> Self {
        self.causal = causal;
        self
    }
    /// With this multiplier of `q . k` (applied before the logits hook); it must be finite.
    pub fn with_sm_scale(mut self, sm_scale: f32) -> Result<Self> {
        self.sm_scale = sm_scale;
        self.validate()?;
        Ok(self)
    }

    /// With q and o read and written at these strides instead of densely, e.g. q inside a fused
    /// QKV buffer or o into a wider tensor. q and o must then hold at least the largest offset a
    /// row reaches plus one head (not exactly the dense size); o's rows and heads must not
    /// overlap. On a GPU, strides must be multiples of 8 elements (16-byte vector loads).
    ///
    /// ```
    /// use ferrinfer_runtime::{Batch, Heads, KvIndex, KvLayout, attention::QoStrides};
    /// let heads = Heads::new(4, 2, 64)?;
    /// let kv = KvIndex::ragged(&[0, 5], KvLayout::Nhd)?;
    /// // q is the first 4 heads of each row of a fused [tokens, (4 + 2 + 2) * 64] QKV.
    /// let batch = Batch::new(heads, &[0, 5], kv)?
    ///     .with_qo_strides(QoStrides::new(8 * 64, 64), QoStrides::dense(&heads))?;
    /// assert_eq!(batch.q_strides().row(), 512);
    /// # Ok::<(), ferrinfer_runtime::Error>(())
    /// ```
    pub fn with_qo_strides(mut self, q: QoStrides, o: QoStrides) -> Result<Self> {
        let dense = QoStrides::dense(&self.heads);
        self.q_strides = (q != dense).then_some(q);
        self.o_strides = (o != dense).then_some(o);
        self.validate()?;
        Ok(self)
    }
    /// Strides of q (dense unless [`Batch::with_qo_strides`] said otherwise).
    pub fn q_strides(&self) -> QoStrides {
        self.q_strides
            .unwrap_or_else(|| QoStrides::dense(&self.heads))
    }
    /// Strides of o.
    pub fn o_strides(&self) -> QoStrides {
        self.o_strides
            .unwrap_or_else(|| QoStrides::dense(&self.heads))
    }

    /// Re-check everything: heads, the query row pointer, the KV index, that both describe the same
    /// requests, `sm_scale`, and that every count the kernels read fits their 32-bit signed fields
    /// and every buffer size fits 64 bits. Every plan, replan and run calls it, on every backend.
    pub fn validate(&self) -> Result<()> {
        self.heads.validate()?;
        check_indptr("qo_indptr", &self.qo_indptr)?;
        self.kv.validate()?;
        self.kv.check_strides(&self.heads)?;
        if self.qo_indptr.len() != self.kv.indptr.len() {
            return Err(Error::invalid(format!(
                "qo_indptr describes {} requests but the KV index {}",
                self.qo_indptr.len() - 1,
                self.kv.batch()
            )));
        }
        if !self.sm_scale.is_finite() {
            return Err(Error::invalid(format!(
                "sm_scale must be finite, got {}",
                self.sm_scale
            )));
        }
        let h = &self.heads;
        let q = u64::from(self.qo_indptr[self.batch()] as u32)
            .checked_mul(u64::from(h.num_qo_heads))
            .and_then(|x| x.checked_mul(u64::from(h.head_dim)));
        let kv = u64::from(self.kv.capacity)
            .checked_mul(u64::from(self.kv.page_size.unwrap_or(1)))
            .and_then(|x| x.checked_mul(u64::from(h.num_kv_heads)))
            .and_then(|x| x.checked_mul(u64::from(h.head_dim)));
        // Bytes, at up to 4 per element, must fit the address space.
        let fits = |n: Option<u64>| n.is_some_and(|x| x <= isize::MAX as u64 / 4);
        if !fits(q) || !fits(kv) {
            return Err(Error::invalid(
                "the batch's q/o or K/V buffers would exceed the address space",
            ));
        }
        Ok(())
    }

    /// Head counts and dimension.
    pub fn heads(&self) -> Heads {
        self.heads
    }
    /// `[batch + 1]`: query rows of request `b` are `qo_indptr()[b]..qo_indptr()[b + 1]`.
    pub fn qo_indptr(&self) -> &[i32] {
        &self.qo_indptr
    }
    /// Where the keys and values are.
    pub fn kv(&self) -> &KvIndex {
        &self.kv
    }
    /// Whether the causal mask is on.
    pub fn causal(&self) -> bool {
        self.causal
    }
    /// The multiplier of `q . k`.
    pub fn sm_scale(&self) -> f32 {
        self.sm_scale
    }
    /// Requests.
    pub fn batch(&self) -> usize {
        self.qo_indptr.len() - 1
    }
    /// Query rows of all requests.
    pub fn total_qo(&self) -> usize {
        *self.qo_indptr.last().unwrap_or(&0) as usize
    }
    /// Query rows of request `b`.
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
        self.check_rows(self.total_qo(), q, k, v, Some(o))
    }

    /// [`Batch::check_lengths`] for q and o buffers of `rows` query rows (a CUDA-graph plan's
    /// buffers hold its capacity, not the batch).
    pub(crate) fn check_rows(
        &self,
        rows: usize,
        q: usize,
        k: usize,
        v: usize,
        o: Option<usize>,
    ) -> Result<()> {
        let h = &self.heads;
        let qo: [(&str, Option<usize>, Option<QoStrides>); 2] =
            [("q", Some(q), self.q_strides), ("o", o, self.o_strides)];
        for (name, got, strides) in qo {
            let Some(got) = got else { continue };
            match strides {
                None => {
                    let want = rows * h.num_qo_heads as usize * h.head_dim as usize;
                    if got != want {
                        return Err(Error::invalid(format!(
                            "{name} has {got} elements; [rows={rows}, num_qo_heads={}, head_dim={}] needs {want}",
                            h.num_qo_heads, h.head_dim
                        )));
                    }
                }
                Some(s) => {
                    let dims = s.dims(h, rows);
                    if name == "o" && !disjoint(&dims) {
                        return Err(Error::invalid(format!(
                            "o strides (row {}, head {}) make rows or heads of o overlap \
                             ({rows} rows, {} heads of {})",
                            s.row, s.head, h.num_qo_heads, h.head_dim
                        )));
                    }
                    let want = extent(&dims).filter(|&e| e <= isize::MAX as u64 / 4);
                    if want.is_none_or(|w| (got as u64) < w) {
                        return Err(Error::invalid(format!(
                            "{name} has {got} elements; {rows} rows at strides (row {}, head {}) \
                             reach {}",
                            s.row,
                            s.head,
                            want.map_or("past the address space".to_string(), |w| w.to_string())
                        )));
                    }
                }
            }
        }
        let want_kv = self.kv.buffer_len(&self.heads);
        let custom = self.kv.custom.is_some();
        for (name, got) in [("k", k), ("v", v)] {
            if (custom && got < want_kv) || (!custom && got != want_kv) {
                return Err(Error::invalid(format!(
                    "{name} has {got} elements; the KV index ({} {}, {} KV heads, head_dim {}{}) needs {}{want_kv}",
                    self.kv.capacity,
                    if self.kv.page_size.is_some() {
                        "pages"
                    } else {
                        "tokens"
                    },
                    self.heads.num_kv_heads,
                    self.heads.head_dim,
                    if custom { ", its strides" } else { "" },
                    if custom { "at least " } else { "" },
                )));
            }
        }
        Ok(())
    }
}

/// The CSR row pointer of these lengths: `[0, l0, l0 + l1, ...]` (`qo_indptr`, ragged `kv_indptr`).
///
/// # Panics
/// When the sum exceeds `i32::MAX` (no batch that large can be described).
pub fn indptr(lens: &[u32]) -> Vec<i32> {
    checked_indptr("lengths", lens).expect("lengths sum past i32::MAX")
}

fn checked_indptr(name: &str, lens: &[u32]) -> Result<Vec<i32>> {
    let mut out = Vec::with_capacity(lens.len() + 1);
    out.push(0i32);
    let mut sum = 0i64;
    for &l in lens {
        sum += i64::from(l);
        let s =
            i32::try_from(sum).map_err(|_| Error::invalid(format!("{name} sum past i32::MAX")))?;
        out.push(s);
    }
    Ok(out)
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
        assert_eq!(kv.indptr(), [0, 1, 1, 2]);
        assert_eq!(kv.indices(), [0, 3]);
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
    #[test]
    fn every_count_the_kernels_read_is_bounded() {
        let nhd = KvLayout::Nhd;
        // A ragged request reaching past its buffer, a request of 2^31 keys, a capacity of 2^31.
        let e = KvIndex::ragged_in(&[0, 10], 9, nhd).unwrap_err();
        assert!(
            e.to_string().contains("reach token 10 but K and V hold 9"),
            "{e}"
        );
        let big = vec![0; (1 << 16) + 1];
        let e = KvIndex::paged(1 << 15, &[0, big.len() as i32], &big, &[1], 1, nhd).unwrap_err();
        assert!(e.to_string().contains("KV tokens"), "{e}");
        let e = KvIndex::paged(16, &[0, 0], &[], &[0], 1 << 31, nhd).unwrap_err();
        assert!(e.to_string().contains("capacity"), "{e}");
        assert!(Heads::new(8, 2, 1 << 20).is_err());
        // q of 2^31 rows x 65536 heads x 65536 elements does not fit the address space.
        let h = Heads::new(1 << 16, 1, 1 << 16).unwrap();
        let kv = KvIndex::ragged(&[0, 1], nhd).unwrap();
        let e = Batch::new(h, &[0, i32::MAX], kv).unwrap_err();
        assert!(e.to_string().contains("address space"), "{e}");
        let b = Batch::new(heads(), &[0, 1], KvIndex::ragged(&[0, 1], nhd).unwrap()).unwrap();
        assert!(b.with_sm_scale(f32::INFINITY).is_err());
    }
}
