// Launch arguments shared by every attention kernel; mirrored by kernels/src/abi.rs.
#pragma once

namespace fi {

struct AttnArgs {
  const void* q;
  const void* k;
  const void* v;
  void* o;
  float* lse;              // null: no LSE output
  const int* qo_indptr;    // [batch + 1]
  const int* kv_indptr;    // [batch + 1] BSR row pointers
  const int* kv_indices;   // block ids
  const int* kv_last_len;  // [batch]
  const int* work;         // plan workspace (format: kernels/src/workspace.rs), or null
  float* partial_o;        // [partial_rows, num_qo_heads, head_dim] split-KV partial outputs
  float* partial_lse;      // [partial_rows, num_qo_heads]
  unsigned long long q_stride_n, q_stride_h;
  unsigned long long o_stride_n, o_stride_h;
  unsigned long long kv_stride_block, kv_stride_n, kv_stride_h;
  unsigned batch, total_qo, num_qo_heads, num_kv_heads;
  unsigned block_size;  // 0: ragged, one unbounded block per request whose id is its first token
  unsigned causal;
  float sm_scale;
  unsigned num_items;  // work items in the grid (the plan's padded length)
  unsigned num_sms;    // SMs of the device (0: unknown): a persistent kernel's grid
};
static_assert(sizeof(AttnArgs) == 19 * 8 + 10 * 4, "AttnArgs must match kernels/src/abi.rs");

}  // namespace fi
