// The bottom-right aligned causal mask: query row i of qo_len rows sits at key position
// i + kv_len - qo_len of the whole request, and sees the keys up to and including it. On a KV
// shard the diagonal moves by the shard's first position (KeyPositions::causal_shift).
#pragma once
#include "attention/work.cuh"

namespace fi {

// Keys 0..end of `kv_len` are the ones the causal mask lets query row `i` see (all of them
// without it), where key j is visible iff j <= i + shift.
__device__ __forceinline__ unsigned keys_end(bool causal, unsigned i, long long shift,
                                             unsigned kv_len) {
  if (!causal) return kv_len;
  const long long last = static_cast<long long>(i) + shift;
  if (last < 0) return 0;
  return last + 1 < kv_len ? static_cast<unsigned>(last + 1) : kv_len;
}

// The keys a prefill work item computes, in K/V tiles of `tile_kv` keys: keys past the last row's
// diagonal are hidden from every row, so those tiles are skipped (`stop`); tiles before
// `first_masked` are interior (whole, and wholly at or below the first row's diagonal), so they
// need no causal mask or key bound. Rows are packed (`group` heads a query row); key j is visible
// to query row i iff j <= i + shift.
struct ItemKeys {
  unsigned stop, tiles, first_masked;
};
__device__ __forceinline__ ItemKeys item_keys(const WorkItem& w, unsigned group, long long shift,
                                              bool causal, unsigned tile_kv) {
  unsigned stop = w.kv_end;
  if (causal) {
    const long long end = static_cast<long long>((w.qo_tile_end - 1) / group) + shift + 1;
    if (end < static_cast<long long>(stop)) {
      stop = end < static_cast<long long>(w.kv_start) ? w.kv_start : static_cast<unsigned>(end);
    }
  }
  const unsigned tiles = (stop - w.kv_start + tile_kv - 1) / tile_kv;
  unsigned first_masked = (stop - w.kv_start) / tile_kv;
  if (causal) {
    const long long visible =
        static_cast<long long>(w.qo_tile_start / group) + shift + 1 - w.kv_start;
    first_masked = visible < 0 ? 0u : min(first_masked, static_cast<unsigned>(visible / tile_kv));
  }
  return ItemKeys{stop, tiles, first_masked};
}

}  // namespace fi
