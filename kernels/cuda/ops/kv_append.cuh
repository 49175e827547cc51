// Where a new K/V token goes in a paged cache, for the append and fused RoPE + append kernels.
// Either the plan's precomputed element offset (validated on the host), or FlashInfer-style device
// arrays (batch index and position per token, the page table) checked here against every bound
// the host knows: a token whose request, position or page is out of range gets no slot and the
// kernel skips it, so nothing is ever written outside the cache. Mirrored by
// kernels/src/ops/kv_append.rs.
#pragma once

namespace fi {

// How K/V destinations are addressed (RopeArgs::slot_mode).
constexpr unsigned kSlotContiguous = 0;  // [tokens, heads, head_dim], like the source
constexpr unsigned kSlotPlanned = 1;     // slots[t]: element offset of head 0 of token t
constexpr unsigned kSlotExplicit = 2;    // batch_indices, positions and the page table

struct PageTable {
  const int* batch_indices;  // [tokens]
  const int* positions;      // [tokens]: the token's position in its request
  const int* indptr;         // [batch + 1]
  const int* indices;        // [num_indices]
  const int* last_page_len;  // [batch]
  unsigned batch, num_indices, page_size, num_pages;
  unsigned long long page_stride, token_stride;  // elements
};

// The element offset of head 0 of token t, or -1 when any index is out of range.
__device__ __forceinline__ long long explicit_slot(const PageTable& p, unsigned long long t) {
  const int b = p.batch_indices[t];
  const int pos = p.positions[t];
  if (b < 0 || static_cast<unsigned>(b) >= p.batch || pos < 0) return -1;
  const int first = p.indptr[b];
  const int end = p.indptr[b + 1];
  if (first < 0 || end <= first || static_cast<unsigned>(end) > p.num_indices) return -1;
  const int last = p.last_page_len[b];
  if (last < 1 || static_cast<unsigned>(last) > p.page_size) return -1;
  const long long len = static_cast<long long>(end - first - 1) * p.page_size + last;
  if (pos >= len) return -1;
  const int page = p.indices[first + pos / p.page_size];
  if (page < 0 || static_cast<unsigned>(page) >= p.num_pages) return -1;
  return static_cast<long long>(page * p.page_stride + (pos % p.page_size) * p.token_stride);
}

}  // namespace fi
