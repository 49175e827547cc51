// One query row of one head, held by one warp. Lane `l` holds elements d = e * 32 + l for
// e in 0..E (E = D / 32): loads of one e are contiguous across the warp, and the rotary partner
// (d + D/2) % D of element e is element (e + E/2) % E of the same lane, so the query and key hooks
// need no shuffle and no shared memory.
#pragma once
#include "abi.cuh"
#include "dtype.cuh"
#include "hooks.cuh"
#include "softmax.cuh"
#include "warp.cuh"

namespace fi {

template <int D>
struct RowLayout {
  static_assert(D % 64 == 0, "head_dim must be a multiple of 64 (E = D / 32 even)");
  static constexpr int E = D / 32;
  __device__ __forceinline__ static unsigned dim(int e) { return e * kWarpSize + lane_id(); }
  __device__ __forceinline__ static int partner(int e) { return (e + E / 2) % E; }
};

// This lane's elements of a row that starts at `src`.
template <int D, class T>
__device__ __forceinline__ void load_row(const T* src, float (&x)[D / 32]) {
  #pragma unroll
  for (int e = 0; e < D / 32; ++e) x[e] = to_f32(src[RowLayout<D>::dim(e)]);
}

template <class V, class P, int D>
__device__ __forceinline__ void transform_query(const P& p, float (&x)[D / 32], const Pos& at) {
  if constexpr (V::kHasQuery) {
    using L = RowLayout<D>;
    float raw[L::E];
    #pragma unroll
    for (int e = 0; e < L::E; ++e) raw[e] = x[e];
    #pragma unroll
    for (int e = 0; e < L::E; ++e) {
      x[e] = hook_query<V>(p, raw[e], raw[L::partner(e)], L::dim(e), at);
    }
  }
}

template <class V, class P, int D>
__device__ __forceinline__ void transform_key(const P& p, float (&x)[D / 32], const Pos& at) {
  if constexpr (V::kHasKey) {
    using L = RowLayout<D>;
    float raw[L::E];
    #pragma unroll
    for (int e = 0; e < L::E; ++e) raw[e] = x[e];
    #pragma unroll
    for (int e = 0; e < L::E; ++e) {
      x[e] = hook_key<V>(p, raw[e], raw[L::partner(e)], L::dim(e), at);
    }
  }
}

// q . k over the whole row, the same on every lane.
template <int E>
__device__ __forceinline__ float dot_row(const float (&q)[E], const float (&k)[E]) {
  float s = 0.0f;
  #pragma unroll
  for (int e = 0; e < E; ++e) s += q[e] * k[e];
  return warp_sum(s);
}

// Keys 0..end are the ones the bottom-right causal mask lets query row `i` see (all without it).
__device__ __forceinline__ unsigned keys_end(bool causal, unsigned i, unsigned qo_len,
                                             unsigned kv_len) {
  if (!causal) return kv_len;
  const long long last = static_cast<long long>(i) + kv_len - qo_len;
  if (last < 0) return 0;
  return last + 1 < kv_len ? static_cast<unsigned>(last + 1) : kv_len;
}

// Sink, normalisation, output hook; writes every element of o and (if asked) the LSE.
// `at` is the output position (kv_pos 0).
template <class V, class P, class T, int D>
__device__ __forceinline__ void finish_row(const AttnArgs& a, const P& p,
                                           RowState<V::kSoftmax, D / 32>& st, unsigned row,
                                           const Pos& at) {
  if constexpr (V::kSoftmax && V::kHasSink) st.add_sink(hook_sink<V>(p, at));
  T* o = static_cast<T*>(a.o) + row * a.o_stride_n + at.qo_head * a.o_stride_h;
  #pragma unroll
  for (int e = 0; e < D / 32; ++e) {
    const unsigned d = RowLayout<D>::dim(e);
    o[d] = from_f32<T>(hook_output<V>(p, st.out(e), d, at));
  }
  if (a.lse != nullptr && lane_id() == 0) {
    a.lse[static_cast<unsigned long long>(row) * a.num_qo_heads + at.qo_head] = st.lse();
  }
}

}  // namespace fi
