// Merge of split-KV partial results (the PARTIAL FORMAT of decode and prefill work items): for each
// query row whose merge list (plan workspace: merge_indptr, merge_index) is not empty, combine the
// chunks' normalised outputs by their LSEs (merge states), add the sink to the denominator,
// normalise, apply the output hook, and write o and the LSE. Without softmax the partials are
// plain sums and are added up. Rows with an empty list were written by their (unsplit) item.
// Launch: grid (max_rows, ceil(num_qo_heads / warps)), block kMergeThreads (merge.rs); one warp
// per (row, head), lane l holding elements l * D/32 .. (l + 1) * D/32.
#pragma once
#include "abi.cuh"
#include "hooks.cuh"
#include "kv.cuh"
#include "work.cuh"
#include "warp.cuh"

namespace fi {

constexpr unsigned kMergeThreads = 128;

// plan::header words and array positions the merge reads.
constexpr int kMergeTotalQoWord = 7;
constexpr int kMergeBatchWord = 19;
constexpr int kMergeIndptrArray = 8;
constexpr int kMergeIndexArray = 9;

__device__ __forceinline__ const int* merge_array(const int* work, int array) {
  return reinterpret_cast<const int*>(reinterpret_cast<const char*>(work) +
                                      work[kWorkOffsets + array]);
}

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
  if (row >= static_cast<unsigned>(work[kMergeTotalQoWord])) return;
  const int* indptr = merge_array(work, kMergeIndptrArray);
  const int begin = indptr[row], end = indptr[row + 1];
  if (begin >= end) return;  // not split: its item wrote o and lse
  const int* index = merge_array(work, kMergeIndexArray);
  const unsigned long long heads = a.num_qo_heads;

  // The batch from the workspace, not the args: a graph replay keeps the captured args.
  const unsigned b = merge_request(a.qo_indptr, work[kMergeBatchWord], row);
  const unsigned qo_begin = static_cast<unsigned>(a.qo_indptr[b]);
  const unsigned qo_len = static_cast<unsigned>(a.qo_indptr[b + 1]) - qo_begin;
  const unsigned kv_head = h / (a.num_qo_heads / a.num_kv_heads);
  const Pos at{b, row - qo_begin, 0, h, kv_head, qo_len, kv_seq(a, b).len, D};

  const unsigned d0 = lane_id() * E;
  float acc[E] = {};
  float m = -FI_INF, z = 0.0f;
  if constexpr (V::kSoftmax) {
    for (int k = begin; k < end; ++k) m = fmaxf(m, a.partial_lse[index[k] * heads + h]);
    float sink = -FI_INF;
    if constexpr (V::kHasSink) {
      sink = hook_sink<V>(p, at);
      m = fmaxf(m, sink);
    }
    if (m != -FI_INF) {
      for (int k = begin; k < end; ++k) {
        const unsigned long long prow = static_cast<unsigned long long>(index[k]);
        const float lse = a.partial_lse[prow * heads + h];
        if (lse == -FI_INF) continue;  // an empty chunk: no weight (and its o is 0)
        const float w = expf(lse - m);
        z += w;
        float x[E];
        merge_load<E>(a.partial_o + (prow * heads + h) * D + d0, x);
        #pragma unroll
        for (int e = 0; e < E; ++e) acc[e] += w * x[e];
      }
      if (sink != -FI_INF) z += expf(sink - m);
      #pragma unroll
      for (int e = 0; e < E; ++e) acc[e] /= z;
    }
  } else {
    for (int k = begin; k < end; ++k) {
      const unsigned long long prow = static_cast<unsigned long long>(index[k]);
      float x[E];
      merge_load<E>(a.partial_o + (prow * heads + h) * D + d0, x);
      #pragma unroll
      for (int e = 0; e < E; ++e) acc[e] += x[e];
    }
  }

  T* o = static_cast<T*>(a.o) + row * a.o_stride_n + h * a.o_stride_h;
  #pragma unroll
  for (int e = 0; e < E; ++e) o[d0 + e] = from_f32<T>(hook_output<V>(p, acc[e], d0 + e, at));
  if (a.lse != nullptr && lane_id() == 0) {
    float lse = __int_as_float(0x7fc00000);  // no meaning without softmax
    if constexpr (V::kSoftmax) lse = m == -FI_INF ? -FI_INF : m + logf(z);
    a.lse[row * heads + h] = lse;
  }
}

}  // namespace fi
