// Reading the plan's workspace (its format: kernels/src/workspace.rs, generated into
// attention/workspace.cuh; written by ferrinfer_runtime::attention::plan). Everything
// batch-dependent comes from the header, which a replayed CUDA graph reads afresh; nothing is taken
// from the by-value launch arguments.
#pragma once
#include "attention/workspace.cuh"

namespace fi {

struct WorkItem {
  unsigned request, kv_head;
  unsigned qo_tile_start, qo_tile_end;  // packed query rows
  unsigned kv_start, kv_end;  // keys, within the request
  int partial;  // -1: write o and lse directly
  bool valid;
};

// The workspace's int32 words from byte offset `bytes` on (an array's start, from its header word).
__device__ __forceinline__ const int* work_at(const int* work, int bytes) {
  return reinterpret_cast<const int*>(reinterpret_cast<const char*>(work) + bytes);
}

// Array `array` (a ws_array position) of the workspace, at the byte offset its header word holds.
__device__ __forceinline__ const int* work_array(const int* work, int array) {
  return work_at(work, work[ws_header::kOffsets + array]);
}

// Word `word` of the workspace, loaded where it stands in the code: a volatile load, so that the
// compiler neither sinks it under the bounds check below nor predicates it on that check. Every
// header word exists, so the header's loads can all issue at once.
__device__ __forceinline__ int header_word(const int* work, int word) {
  int v;
  asm volatile("ld.global.s32 %0, [%1];" : "=r"(v) : "l"(__cvta_generic_to_global(work + word)));
  return v;
}

// Item `idx`, or an invalid one past the padded length (or without a workspace). Two rounds of
// loads, not five: the header words (length and array offsets) side by side, then every field at
// once, predicated on the bounds check rather than behind branches. A CTA's first K/V copy waits
// on this chain (kernels/notes/decode.md, "Session 9").
__device__ __forceinline__ WorkItem work_item(const int* work, unsigned idx) {
  WorkItem w{};
  if (work == nullptr) return w;  // a launch argument: uniform, no load behind it
  const unsigned padded = static_cast<unsigned>(header_word(work, ws_header::kPaddedLen));
  int at[ws_array::kValid + 1];  // the item arrays' byte offsets, request .. valid
  #pragma unroll
  for (int k = 0; k <= ws_array::kValid; ++k) at[k] = header_word(work, ws_header::kOffsets + k);
  const bool in = idx < padded;
  int f[ws_array::kValid + 1];
  #pragma unroll
  for (int k = 0; k <= ws_array::kValid; ++k) {
    const int* array = work_at(work, at[k]);
    f[k] = in ? array[idx] : 0;
  }
  w.valid = f[ws_array::kValid] != 0;
  if (!w.valid) return WorkItem{};
  w.request = f[ws_array::kRequest];
  w.kv_head = f[ws_array::kKvHead];
  w.qo_tile_start = f[ws_array::kQoTileStart];
  w.qo_tile_end = f[ws_array::kQoTileEnd];
  w.kv_start = f[ws_array::kKvStart];
  w.kv_end = f[ws_array::kKvEnd];
  w.partial = f[ws_array::kPartial];
  return w;
}

// Where one request's keys sit in the whole request: key j (0..len) of the KV index is key
// `offset + j` of a request of `total` keys, as on a context-parallel rank that holds a run of
// each request's keys. Hooks see these positions (Pos::kv_pos, Pos::kv_len) and the causal
// diagonal follows them. Without positions (header word 0) every request is whole: offset 0,
// total len, the same numbers as before positions existed. Read once per CTA.
struct KeyPositions {
  unsigned offset, total;
  // Key j is causally visible to query row i of qo_len rows, aligned to the end of the whole
  // request, iff j <= i + causal_shift(qo_len).
  __device__ __forceinline__ long long causal_shift(unsigned qo_len) const {
    return static_cast<long long>(total) - qo_len - offset;
  }
};

// The key positions of request `b`, whose KV index holds `len` keys of it.
__device__ __forceinline__ KeyPositions key_positions(const int* work, unsigned b, unsigned len) {
  const int at = work == nullptr ? 0 : work[ws_header::kKeyPositions];
  if (at == 0) return KeyPositions{0u, len};
  const int* pairs = work_at(work, at);
  // Validated on the host: 0 <= offset, offset + len <= total < 2^31.
  return KeyPositions{static_cast<unsigned>(pairs[2 * b]), static_cast<unsigned>(pairs[2 * b + 1])};
}

}  // namespace fi
