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

// Array `array` (a ws_array position) of the workspace, at the byte offset its header word holds.
__device__ __forceinline__ const int* work_array(const int* work, int array) {
  return reinterpret_cast<const int*>(reinterpret_cast<const char*>(work) +
                                      work[ws_header::kOffsets + array]);
}

// Item `idx`, or an invalid one past the padded length (or without a workspace).
__device__ __forceinline__ WorkItem work_item(const int* work, unsigned idx) {
  WorkItem w{};
  if (work == nullptr || idx >= static_cast<unsigned>(work[ws_header::kPaddedLen])) return w;
  auto field = [&](int array) { return work_array(work, array)[idx]; };
  w.valid = field(ws_array::kValid) != 0;
  if (!w.valid) return w;
  w.request = field(ws_array::kRequest);
  w.kv_head = field(ws_array::kKvHead);
  w.qo_tile_start = field(ws_array::kQoTileStart);
  w.qo_tile_end = field(ws_array::kQoTileEnd);
  w.kv_start = field(ws_array::kKvStart);
  w.kv_end = field(ws_array::kKvEnd);
  w.partial = field(ws_array::kPartial);
  return w;
}

}  // namespace fi
