// Merge of split-KV partial results (the partial format of epilogue.cuh, written by decode and
// prefill work items): for each query row whose merge list (plan workspace: merge_indptr,
// merge_index) is not empty, combine the chunks' normalised outputs by their LSEs (merge states),
// then end the row as every family does (epilogue.cuh: sink in the denominator, normalise, output
// hook, o and the LSE). Without softmax the partials are plain sums and are added up. Rows with an
// empty list were written by their (unsplit) item.
// Launch: grid (max_rows, ceil(num_qo_heads / warps)), block kMergeThreads (kernels/src/merge.rs),
// at least kMergeMinCtas blocks per SM; one warp per (row, head), lane l holding elements
// l * D/32 .. (l + 1) * D/32. On Hopper the launch may start while the attention kernel still runs
// (core/grid_order.cuh): everything up to wait_for_prior_grid reads only the plan's workspace and
// the batch's index arrays, never what that kernel writes.
#pragma once
#include "core/abi.cuh"
#include "core/grid_order.cuh"
#include "core/math.cuh"
#include "core/warp.cuh"
#include "variant/hooks.cuh"
#include "attention/epilogue.cuh"
#include "attention/kv.cuh"
#include "attention/work.cuh"
#include "attention/workspace.cuh"

namespace fi {

constexpr unsigned kMergeThreads = 128;
// Blocks per SM for full occupancy (2048 threads): the entry's __launch_bounds__ minimum, which
// caps registers at 32 per thread. Left to itself ptxas unrolled the chunk loop at some head dims
// (up to 40 registers, 75% occupancy) in a kernel that waits on memory.
constexpr unsigned kMergeMinCtas = 16;

// The request that owns global query row `row`.
__device__ __forceinline__ unsigned merge_request(const int* qo_indptr, unsigned batch,
                                                 unsigned row) {
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

template <int E>
__device__ __forceinline__ void merge_load(const float* src, float (&x)[E]) {
  if constexpr (E % 4 == 0) {
    #pragma unroll
    for (int k = 0; k < E; k += 4) {
      const float4 v = *reinterpret_cast<const float4*>(src + k);
      x[k] = v.x;
      x[k + 1] = v.y;
      x[k + 2] = v.z;
      x[k + 3] = v.w;
    }
  } else {
    #pragma unroll
    for (int k = 0; k < E; k += 2) {
      const float2 v = *reinterpret_cast<const float2*>(src + k);
      x[k] = v.x;
      x[k + 1] = v.y;
    }
  }
}

template <class V, class P, class T, int D>
__device__ void merge(const AttnArgs& a, const P& p) {
  constexpr int E = D / 32;
  const int* work = a.work;
  const unsigned row = blockIdx.x;
  const unsigned h = blockIdx.y * (kMergeThreads / kWarpSize) + warp_id();
  if (work == nullptr || h >= a.num_qo_heads) return;  // no barrier in this kernel
  if (row >= static_cast<unsigned>(work[ws_header::kTotalQo])) return;
  const int* indptr = work_array(work, ws_array::kMergeIndptr);
  const int begin = indptr[row], end = indptr[row + 1];
  if (begin >= end) return;  // not split: its item wrote o and lse
  const int* index = work_array(work, ws_array::kMergeIndex);

  // The batch from the workspace, not the args: a graph replay keeps the captured args.
  const unsigned b = merge_request(a.qo_indptr, work[ws_header::kBatch], row);
  const unsigned qo_begin = static_cast<unsigned>(a.qo_indptr[b]);
  const unsigned qo_len = static_cast<unsigned>(a.qo_indptr[b + 1]) - qo_begin;
  const unsigned kv_head = h / (a.num_qo_heads / a.num_kv_heads);
  const unsigned kv_total = key_positions(work, b, kv_seq(a, b).len).total;
  const Pos at{b, row - qo_begin, 0, h, kv_head, qo_len, kv_total, D};
  // The merge list's first line while the attention kernel runs; the partials only after it ends.
  asm volatile("prefetch.global.L1 [%0];" ::"l"(__cvta_generic_to_global(index + begin)));
  wait_for_prior_grid();

  // The row's softmax state over all its chunks, in epilogue.cuh's terms: m in log2 units, z and
  // acc relative to 2^m. A chunk's normalised output weighs 2^(its LSE in log2 units - m).
  const unsigned d0 = lane_id() * E;
  float acc[E] = {};
  float m = -FI_INF, z = 0.0f;
  if constexpr (V::kSoftmax) {
    for (int k = begin; k < end; ++k) {
      m = fmaxf(m, __fmul_rn(a.partial_lse[partial_at(a, index[k], h)], kLog2e));
    }
    if (m != -FI_INF) {
      for (int k = begin; k < end; ++k) {
        const unsigned long long prow = static_cast<unsigned long long>(index[k]);
        const float lse = a.partial_lse[partial_at(a, prow, h)];
        if (lse == -FI_INF) continue;  // an empty chunk: no weight (and its o is 0)
        // Rounded as m was (no FMA contraction): the largest chunk weighs exactly 1.
        const float w = exp2_approx(__fmul_rn(lse, kLog2e) - m);
        z += w;
        float x[E];
        merge_load<E>(partial_out<D>(a, prow, h) + d0, x);
        #pragma unroll
        for (int e = 0; e < E; ++e) acc[e] += w * x[e];
      }
    }
  } else {
    for (int k = begin; k < end; ++k) {
      float x[E];
      merge_load<E>(partial_out<D>(a, static_cast<unsigned long long>(index[k]), h) + d0, x);
      #pragma unroll
      for (int e = 0; e < E; ++e) acc[e] += x[e];
    }
  }

  const auto fin = finish_row<V>(p, m, z, at);
  T* o = out_row<T>(a, row, h);
  #pragma unroll
  for (int e = 0; e < E; ++e) o[d0 + e] = from_f32<T>(out_elem<V>(p, acc[e], fin, d0 + e, at));
  if (lane_id() == 0) write_lse(a, row, h, fin.lse());
}

}  // namespace fi
