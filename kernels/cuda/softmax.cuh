// Online softmax of one query row, E output elements per lane. Every lane of the row's warp
// holds the same m and z. With kSoftmax false (e.g. FlashSigmoid) the logits are the weights:
// a plain weighted sum.
#pragma once
#include "dsl.cuh"

namespace fi {

template <bool kSoftmax, int E>
struct RowState {
  float m = -FI_INF;  // running max of the logits seen
  float z = 0.0f;  // sum of exp(l - m)
  float acc[E] = {};  // sum of weight * v

  // Rescale what was summed so far to a new, larger max.
  __device__ __forceinline__ void raise_max(float l) {
    if (l > m) {
      const float scale = expf(m - l);  // m = -inf gives 0: nothing was summed yet
      z *= scale;
      #pragma unroll
      for (int e = 0; e < E; ++e) acc[e] *= scale;
      m = l;
    }
  }

  // One visible key with logit `l` and value elements `v`.
  __device__ __forceinline__ void add(float l, const float (&v)[E]) {
    if constexpr (kSoftmax) {
      // A -inf logit has no weight; skipping it also avoids exp(-inf - -inf) = NaN.
      if (l == -FI_INF) return;
      raise_max(l);
      const float w = expf(l - m);
      z += w;
      #pragma unroll
      for (int e = 0; e < E; ++e) acc[e] += w * v[e];
    } else {
      #pragma unroll
      for (int e = 0; e < E; ++e) acc[e] += l * v[e];
    }
  }

  // The attention sink: exp(s) joins the denominator and no value.
  __device__ __forceinline__ void add_sink(float s) {
    if constexpr (kSoftmax) {
      if (s == -FI_INF) return;
      raise_max(s);
      z += expf(s - m);
    }
  }

  // Nothing with weight (no visible key, no sink): o = 0.
  __device__ __forceinline__ bool empty() const { return kSoftmax && m == -FI_INF; }

  __device__ __forceinline__ float out(int e) const {
    if constexpr (kSoftmax) {
      return empty() ? 0.0f : acc[e] / z;
    } else {
      return acc[e];
    }
  }

  // Natural-log LSE, -inf when empty; NaN without softmax (it has no meaning there).
  __device__ __forceinline__ float lse() const {
    if constexpr (kSoftmax) {
      return empty() ? -FI_INF : m + logf(z);
    } else {
      return __int_as_float(0x7fc00000);
    }
  }
};

}  // namespace fi
