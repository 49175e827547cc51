// Prefill and append: one warp per (query row, query head), keys streamed from global memory with
// an online softmax. Simple and exact; the fast tiled kernels come later behind the same entry.
// Launch: grid (total_qo, ceil(num_qo_heads / warps)), block 32 * warps, warps = kPrefillWarps
// or fewer (tu.rs launch_dims).
#pragma once
#include "abi.cuh"
#include "kv.cuh"
#include "row.cuh"

namespace fi {

constexpr unsigned kPrefillWarps = 4;

// The request that owns query row `row`: the b with qo_indptr[b] <= row < qo_indptr[b + 1].
__device__ __forceinline__ unsigned request_of(const int* qo_indptr, unsigned batch, unsigned row) {
  unsigned lo = 0, hi = batch;
  while (lo < hi) {
    const unsigned mid = (lo + hi) / 2;
    if (static_cast<unsigned>(qo_indptr[mid + 1]) <= row) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  return lo;
}

template <class V, class P, class T, int D>
__device__ void prefill(const AttnArgs& a, const P& p) {
  constexpr int E = D / 32;
  const unsigned row = blockIdx.x;
  const unsigned h = blockIdx.y * warps_per_block() + warp_id();
  // Whole warps leave together, and this kernel has no block barrier.
  if (row >= a.total_qo || h >= a.num_qo_heads) return;

  const unsigned b = request_of(a.qo_indptr, a.batch, row);
  const unsigned qo_begin = static_cast<unsigned>(a.qo_indptr[b]);
  const unsigned qo_len = static_cast<unsigned>(a.qo_indptr[b + 1]) - qo_begin;
  const unsigned i = row - qo_begin;
  const unsigned kv_head = h / (a.num_qo_heads / a.num_kv_heads);
  const KvSeq kv = kv_seq(a, b);
  const T* k_base = static_cast<const T*>(a.k);
  const T* v_base = static_cast<const T*>(a.v);

  Pos at{b, i, 0, h, kv_head, qo_len, kv.len, D};
  float q[E];
  load_row<D>(static_cast<const T*>(a.q) + row * a.q_stride_n + h * a.q_stride_h, q);
  transform_query<V, P, D>(p, q, at);

  RowState<V::kSoftmax, E> st;
  const unsigned end = keys_end(a.causal != 0, i, qo_len, kv.len);
  for (unsigned j = 0; j < end; ++j) {
    at.kv_pos = j;
    if (!hook_mask<V>(p, at)) continue;  // uniform: the same pure call on every lane
    const unsigned long long off = kv.offset(j, kv_head);
    float k[E];
    load_row<D>(k_base + off, k);
    transform_key<V, P, D>(p, k, Pos{b, 0, j, 0, kv_head, qo_len, kv.len, D});
    const float l = hook_logits<V>(p, dot_row(q, k) * a.sm_scale, at);
    float v[E];
    load_row<D>(v_base + off, v);
    st.add(l, v);
  }
  at.kv_pos = 0;
  finish_row<V, P, T, D>(a, p, st, row, at);
}

}  // namespace fi
