// Merging attention states (output, natural-log LSE) computed over disjoint parts of one KV set:
// the cascade operator. For each (row, head): m = max_k s_k, w_k = exp(s_k - m) / sum_j exp(s_j - m),
// v = sum_k w_k v_k, s = m + log(sum_k exp(s_k - m)). A -inf state (an empty part) is skipped, not
// weighted by 0, so garbage in its v cannot turn into NaN; all -inf gives v = 0, s = -inf.
// Mirrored by kernels/src/merge_states.rs.
#pragma once

#include "core/dtype.cuh"
#include "core/math.cuh"
#include "core/warp.cuh"

namespace fi {

// State 0 of row r is at v_first + r * v_row_stride; state k >= 1 at
// v_rest + (k - 1) * num_heads * head_dim + r * v_row_stride (LSEs alike, without head_dim). Two
// separate buffers (merge_state) and one [rows, num_states, ...] buffer (merge_states) both fit.
struct MergeStatesArgs {
  const void* v_first;
  const void* v_rest;
  const float* s_first;
  const float* s_rest;
  void* v_out;   // [rows, num_heads, head_dim]; may be v_first (in place)
  float* s_out;  // [rows, num_heads]; may be s_first (in place)
  unsigned long long v_row_stride, s_row_stride;  // elements
  unsigned rows, num_states, num_heads, head_dim;
};
static_assert(sizeof(MergeStatesArgs) == 8 * 8 + 4 * 4,
              "MergeStatesArgs must match kernels/src/merge_states.rs");

constexpr unsigned kMergeStatesWarps = 4;

template <class T>
__device__ __forceinline__ const T* state_ptr(const T* first, const T* rest, unsigned k,
                                              unsigned long long state_stride,
                                              unsigned long long row_offset) {
  return (k == 0 ? first : rest + (k - 1) * state_stride) + row_offset;
}

// One warp per (row, head); each lane handles VEC consecutive elements per step of the head dim.
template <class T, unsigned VEC>
__device__ __forceinline__ void merge_states(const MergeStatesArgs& a) {
  const unsigned long long pair =
      static_cast<unsigned long long>(blockIdx.x) * kMergeStatesWarps + warp_id();
  if (pair >= static_cast<unsigned long long>(a.rows) * a.num_heads) return;  // warp-uniform
  const unsigned long long row = pair / a.num_heads;
  const unsigned head = static_cast<unsigned>(pair % a.num_heads);
  const unsigned long long s_stride = a.num_heads;
  const unsigned long long v_stride = s_stride * a.head_dim;
  const unsigned long long s_at = row * a.s_row_stride + head;
  const unsigned long long v_at = row * a.v_row_stride + static_cast<unsigned long long>(head) * a.head_dim;
  const float neg_inf = -FI_INF;

  // Every lane reads every LSE (one broadcast load each) before lane 0 overwrites s_first in place.
  float m = neg_inf;
  for (unsigned k = 0; k < a.num_states; ++k) {
    m = fmaxf(m, *state_ptr(a.s_first, a.s_rest, k, s_stride, s_at));
  }
  float z = 0.0f;
  if (m != neg_inf) {
    for (unsigned k = 0; k < a.num_states; ++k) {
      const float s = *state_ptr(a.s_first, a.s_rest, k, s_stride, s_at);
      if (s != neg_inf) z += expf(s - m);
    }
  }
  const float inv_z = m == neg_inf ? 0.0f : 1.0f / z;

  const T* v_first = static_cast<const T*>(a.v_first);
  const T* v_rest = static_cast<const T*>(a.v_rest);
  T* v_out = static_cast<T*>(a.v_out) + pair * a.head_dim;
  // Each lane reads exactly the elements it then writes, so v_out may alias v_first.
  for (unsigned d = lane_id() * VEC; d < a.head_dim; d += kWarpSize * VEC) {
    float acc[VEC];
#pragma unroll
    for (unsigned e = 0; e < VEC; ++e) acc[e] = 0.0f;
    if (m != neg_inf) {
      for (unsigned k = 0; k < a.num_states; ++k) {
        const float s = *state_ptr(a.s_first, a.s_rest, k, s_stride, s_at);
        if (s == neg_inf) continue;
        // Exactly 1 when one state holds all the mass, so a lone part comes back bit for bit.
        const float w = expf(s - m) * inv_z;
        const Pack<T, VEC> x =
            *reinterpret_cast<const Pack<T, VEC>*>(state_ptr(v_first, v_rest, k, v_stride, v_at) + d);
#pragma unroll
        for (unsigned e = 0; e < VEC; ++e) acc[e] += w * to_f32(x.x[e]);
      }
    }
    Pack<T, VEC> out;
#pragma unroll
    for (unsigned e = 0; e < VEC; ++e) out.x[e] = from_f32<T>(acc[e]);
    *reinterpret_cast<Pack<T, VEC>*>(v_out + d) = out;
  }
  __syncwarp();
  if (lane_id() == 0) a.s_out[pair] = m == neg_inf ? neg_inf : m + logf(z);
}

}  // namespace fi
