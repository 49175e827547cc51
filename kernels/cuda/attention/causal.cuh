// The bottom-right aligned causal mask: query row i of qo_len rows sits at key position
// i + kv_len - qo_len, and sees the keys up to and including it.
#pragma once

namespace fi {

// Keys 0..end are the ones the causal mask lets query row `i` see (all of them without it).
__device__ __forceinline__ unsigned keys_end(bool causal, unsigned i, unsigned qo_len,
                                             unsigned kv_len) {
  if (!causal) return kv_len;
  const long long last = static_cast<long long>(i) + kv_len - qo_len;
  if (last < 0) return 0;
  return last + 1 < kv_len ? static_cast<unsigned>(last + 1) : kv_len;
}

}  // namespace fi
