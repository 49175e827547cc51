// The bottom-right aligned causal mask: query row i of qo_len rows sits at key position
// i + kv_len - qo_len of the whole request, and sees the keys up to and including it. On a KV
// shard the diagonal moves by the shard's first position (KeyPositions::causal_shift).
#pragma once

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

}  // namespace fi
