// Decode: one block per (request, KV head, group chunk); its warps are query heads of the KV head's
// group, so each key and value is loaded (and key-transformed) once per block into shared memory
// and read by every head. Built for one query row per request; a request with several rows is
// still right (the rows are done one after another).
// Launch: grid (batch, num_kv_heads, ceil(group / warps)), block 32 * warps, warps =
// min(group, kDecodeMaxWarps) (tu.rs launch_dims); static shared memory only.
#pragma once
#include "abi.cuh"
#include "kv.cuh"
#include "row.cuh"

namespace fi {

constexpr unsigned kDecodeMaxWarps = 8;

// Keys per shared-memory tile: K' and V as f32 take 2 * tile * D * 4 bytes (32 KiB at D >= 128).
template <int D>
constexpr unsigned kDecodeTile = D >= 256 ? 16 : 32;

// Stage keys t0..t0+n: every thread takes element pairs (d, d + D/2), which is what the key hook
// needs (an element and its rotary partner), for a whole tile at once.
template <class V, class P, class T, int D>
__device__ __forceinline__ void stage_kv(const AttnArgs& a, const P& p, const KvSeq& kv,
                                         unsigned b, unsigned kv_head, unsigned qo_len,
                                         unsigned t0, unsigned n, float (*ks)[D],
                                         float (*vs)[D]) {
  constexpr unsigned half = D / 2;
  const T* k_base = static_cast<const T*>(a.k);
  const T* v_base = static_cast<const T*>(a.v);
  for (unsigned idx = threadIdx.x; idx < n * half; idx += blockDim.x) {
    const unsigned t = idx / half, d = idx % half;
    const unsigned j = t0 + t;
    const unsigned long long off = kv.offset(j, kv_head);
    const float k0 = to_f32(k_base[off + d]), k1 = to_f32(k_base[off + d + half]);
    const Pos at{b, 0, j, 0, kv_head, qo_len, kv.len, D};
    ks[t][d] = hook_key<V>(p, k0, k1, d, at);
    ks[t][d + half] = hook_key<V>(p, k1, k0, d + half, at);
    vs[t][d] = to_f32(v_base[off + d]);
    vs[t][d + half] = to_f32(v_base[off + d + half]);
  }
}

template <class V, class P, class T, int D>
__device__ void decode(const AttnArgs& a, const P& p) {
  constexpr int E = D / 32;
  constexpr unsigned kTile = kDecodeTile<D>;
  __shared__ float ks[kTile][D];
  __shared__ float vs[kTile][D];

  const unsigned b = blockIdx.x, kv_head = blockIdx.y;
  if (b >= a.batch || kv_head >= a.num_kv_heads) return;  // block-uniform: before any barrier
  const unsigned group = a.num_qo_heads / a.num_kv_heads;
  const unsigned g = blockIdx.z * warps_per_block() + warp_id();
  // Warps past the group's end still stage tiles and meet every barrier; they only skip the math.
  const bool active = g < group;
  const unsigned h = kv_head * group + g;
  const KvSeq kv = kv_seq(a, b);
  const unsigned qo_begin = static_cast<unsigned>(a.qo_indptr[b]);
  const unsigned qo_len = static_cast<unsigned>(a.qo_indptr[b + 1]) - qo_begin;

  for (unsigned i = 0; i < qo_len; ++i) {
    const unsigned row = qo_begin + i;
    Pos at{b, i, 0, h, kv_head, qo_len, kv.len, D};
    float q[E];
    if (active) {
      load_row<D>(static_cast<const T*>(a.q) + row * a.q_stride_n + h * a.q_stride_h, q);
      transform_query<V, P, D>(p, q, at);
    }
    RowState<V::kSoftmax, E> st;
    const unsigned end = keys_end(a.causal != 0, i, qo_len, kv.len);
    for (unsigned t0 = 0; t0 < end; t0 += kTile) {
      const unsigned n = end - t0 < kTile ? end - t0 : kTile;
      __syncthreads();  // the previous tile has been read by every warp
      stage_kv<V, P, T, D>(a, p, kv, b, kv_head, qo_len, t0, n, ks, vs);
      __syncthreads();
      if (!active) continue;
      for (unsigned t = 0; t < n; ++t) {
        at.kv_pos = t0 + t;
        if (!hook_mask<V>(p, at)) continue;
        float k[E], v[E];
        #pragma unroll
        for (int e = 0; e < E; ++e) {
          k[e] = ks[t][RowLayout<D>::dim(e)];
          v[e] = vs[t][RowLayout<D>::dim(e)];
        }
        st.add(hook_logits<V>(p, dot_row(q, k) * a.sm_scale, at), v);
      }
    }
    at.kv_pos = 0;
    if (active) finish_row<V, P, T, D>(a, p, st, row, at);
  }
}

}  // namespace fi
