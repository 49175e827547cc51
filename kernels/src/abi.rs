//! The kernels' launch arguments, mirrored from `cuda/abi.cuh`. Both sides are plain C layout; a
//! test pins the size so a field added on one side only is caught.

/// Arguments of every attention kernel (prefill and decode), passed by value.
///
/// Pointers are device addresses. Strides count elements. The KV cache is block-sparse rows: the
/// keys of request `b` are blocks `kv_indices[kv_indptr[b]..kv_indptr[b + 1]]`, each `block_size`
/// tokens long except the last, which holds `kv_last_len[b]`; `block_size == 0` marks a ragged
/// cache, whose single block per request is unbounded and whose block id is its first token.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct AttnArgs {
    /// `[total_qo, num_qo_heads, head_dim]`, element type of the instance.
    pub q: u64,
    /// Keys, addressed through the block table below with the `kv_stride_*` strides.
    pub k: u64,
    /// Values, laid out like `k`.
    pub v: u64,
    /// Same shape as `q`.
    pub o: u64,
    /// `[total_qo, num_qo_heads]` f32 natural-log LSE, or 0 for none.
    pub lse: u64,
    /// `[batch + 1]` i32.
    pub qo_indptr: u64,
    /// `[batch + 1]` i32.
    pub kv_indptr: u64,
    /// i32 block ids.
    pub kv_indices: u64,
    /// `[batch]` i32.
    pub kv_last_len: u64,
    /// The plan's workspace (int32 words, layout in ferrinfer_runtime::plan): every attention
    /// kernel reads its work list, and the merge pass its merge lists.
    pub work: u64,
    /// f32 `[partial_rows, num_qo_heads, head_dim]`: un-normalised outputs of split-KV items.
    pub partial_o: u64,
    /// f32 `[partial_rows, num_qo_heads]`: their LSEs.
    pub partial_lse: u64,
    /// Elements between consecutive query rows of `q`.
    pub q_stride_n: u64,
    /// Elements between consecutive heads of a query row.
    pub q_stride_h: u64,
    /// Elements between consecutive rows of `o`.
    pub o_stride_n: u64,
    /// Elements between consecutive heads of an output row.
    pub o_stride_h: u64,
    /// Elements between consecutive blocks (pages) of `k` and `v`.
    pub kv_stride_block: u64,
    /// Elements between consecutive tokens of a block.
    pub kv_stride_n: u64,
    /// Elements between consecutive KV heads of a token.
    pub kv_stride_h: u64,
    /// Requests.
    pub batch: u32,
    /// Query rows of all requests.
    pub total_qo: u32,
    /// Query heads.
    pub num_qo_heads: u32,
    /// KV heads; each serves `num_qo_heads / num_kv_heads` query heads.
    pub num_kv_heads: u32,
    /// Tokens per block (page), or 0 for a ragged cache.
    pub block_size: u32,
    /// 1 for the bottom-right aligned causal mask.
    pub causal: u32,
    /// Scale of the logits `q . k` before the softmax (usually `1 / sqrt(head_dim)`).
    pub sm_scale: f32,
    /// Work items in the grid (the plan's padded length).
    pub num_items: u32,
    /// Streaming multiprocessors of the device (0: unknown): a persistent kernel's grid.
    pub num_sms: u32,
}

/// The FA3 entry's third argument (`Sm90Maps` in `cuda/attention/prefill_sm90.cuh`), passed by
/// value as a `__grid_constant__` parameter: the TMA tensor maps of K, V and Q (a driver
/// `CUtensorMap` each, 128 opaque bytes), `tma` 1 to copy the K/V tiles that lie inside their
/// request with them (0: cp.async for every tile), and `q_tma` 1 to copy Q tiles with Q's map
/// (0: cp.async).
#[repr(C, align(64))]
#[derive(Clone, Copy, Debug, Default)]
pub struct Sm90Maps {
    /// K's tensor map: `[rows, kv heads, head dim]` (ragged) or `[pages, slots, kv heads, head
    /// dim]` (paged), boxes of 64 columns x 1 head x the rows of a copy.
    pub k: [u64; 16],
    /// V's tensor map, the same shape.
    pub v: [u64; 16],
    /// Q's tensor map: `[query rows, qo heads, head dim]`, boxes of 64 columns x the GQA group's
    /// heads x `128 / group` rows (one column block of a tile's packed rows).
    pub q: [u64; 16],
    /// 1: K/V tiles inside their request go by TMA; 0: `k` and `v` are unused.
    pub tma: u32,
    /// A paged cache's rows a copy (`min(page size, K/V tile)`); unused for a ragged cache.
    pub rows_per_copy: u32,
    /// 1: Q tiles go by TMA; 0: `q` is unused.
    pub q_tma: u32,
}

#[cfg(test)]
mod tests {
    #[test]
    fn sm90_maps_matches_prefill_sm90_cuh() {
        // Three 64-byte-aligned 128-byte maps and three words, padded to the 64-byte alignment.
        assert_eq!(std::mem::size_of::<super::Sm90Maps>(), 448);
        assert_eq!(std::mem::align_of::<super::Sm90Maps>(), 64);
    }

    #[test]
    fn size_matches_abi_cuh() {
        // 19 eight-byte fields and 9 four-byte fields, padded to 8 bytes; abi.cuh static_asserts
        // the same number.
        assert_eq!(std::mem::size_of::<super::AttnArgs>(), 19 * 8 + 10 * 4);
    }
}
