// Reading one work item of the plan's workspace (layout: ferrinfer_runtime::plan, "Workspace
// layout"). Everything batch-dependent comes from the header, which a replayed CUDA graph reads
// afresh; nothing is taken from the by-value launch arguments.
#pragma once

namespace fi {

struct WorkItem {
  unsigned request, kv_head;
  unsigned qo_tile_start, qo_tile_end;  // packed query rows
  unsigned kv_start, kv_end;  // keys, within the request
  int partial;  // -1: write o and lse directly
  bool valid;
};

// Header words (plan::header).
constexpr int kWorkPaddedLen = 5;
constexpr int kWorkOffsets = 9;

// Item `idx`, or an invalid one past the padded length (or without a workspace).
__device__ __forceinline__ WorkItem work_item(const int* work, unsigned idx) {
  WorkItem w{};
  if (work == nullptr || idx >= static_cast<unsigned>(work[kWorkPaddedLen])) return w;
  const char* bytes = reinterpret_cast<const char*>(work);
  auto field = [&](int k) {
    return reinterpret_cast<const int*>(bytes + work[kWorkOffsets + k])[idx];
  };
  w.valid = field(7) != 0;
  if (!w.valid) return w;
  w.request = field(0);
  w.kv_head = field(1);
  w.qo_tile_start = field(2);
  w.qo_tile_end = field(3);
  w.kv_start = field(4);
  w.kv_end = field(5);
  w.partial = field(6);
  return w;
}

}  // namespace fi
