// Rotary position embedding (RoPE) over up to three families of heads of a ragged batch: q and k
// (rotated, or copied when their bit of rotate_mask is clear) and v (copied). Pair j of the rotary
// dims (x1, x2) turns by the angle pos * f_j: (x1 c - x2 s, x2 c + x1 s). NeoX pairs element j with
// j + rotary_dim / 2; GPT-J pairs 2j with 2j + 1. Dims past rotary_dim are copied (skipped in
// place). K and V may go to a paged cache instead of a contiguous output (kv_append.cuh), which is
// how KV append and the fused RoPE + append reuse this kernel. Mirrored by kernels/src/ops/rope.rs.
//
// Angles: f_j = theta^(-2j / rotary_dim), optionally Llama 3.1-smoothed, divided by the linear scale,
// all in f64 (once per block and pair, in shared memory), then pos * f_j reduced modulo 2 pi in f64
// before an f32 sin and cos: positions up to 2^31 keep an absolute angle error of a few 1e-6, where
// an f32 product is off by 0.03 rad at 2^20 and by radians beyond. Or cos/sin read from an f32 cache
// [max_position, rotary_dim] (cos of pair j at column j, sin at rotary_dim / 2 + j).
// A token without a valid position (outside the cache, or no request of qo_indptr holds it) gets
// NaN in its rotated dims, so the mistake shows; nothing is read or written out of bounds.
#pragma once

#include "core/dtype.cuh"
#include "core/math.cuh"
#include "ops/kv_append.cuh"

namespace fi {

// Field order: 18 pointers and strides, 5 doubles from byte 144, 16 unsigned from byte 184 (the
// Rust mirror's test checks those offsets).
struct RopeArgs {
  const void* src[3];  // q [tokens, heads_q, head_dim], k, v alike
  void* dst[3];        // q out; k and v out (contiguous, or the cache per slot_mode); may equal src
  const int* positions;  // [tokens] (pos_mode 0, and slot_mode 2's positions)
  const int* indptr;     // [batch + 1] (pos_mode 1): tokens of request b
  const int* offsets;    // [batch] (pos_mode 1): position of request b's first token
  const float* cos_sin;  // [max_position, rotary_dim], or null to compute the angles
  const unsigned long long* slots;  // slot_mode 1
  const int* batch_indices;         // slot_mode 2
  const int* kv_indptr;
  const int* kv_indices;
  const int* kv_last_page_len;
  unsigned long long kv_page_stride, kv_token_stride, kv_head_stride;  // elements, slot_mode 1, 2
  double ln_theta, rcp_scale, rcp_factor, smooth_a, smooth_b;
  unsigned tokens, heads[3], head_dim, rotary_dim, rotate_mask, pos_mode, slot_mode;
  // batch: requests of indptr (pos_mode 1) or of the page table (slot_mode 2); never both.
  unsigned batch, max_position, page_size, num_pages, num_kv_indices, heads_per_thread, pad;
};
static_assert(sizeof(RopeArgs) == 18 * 8 + 5 * 8 + 16 * 4, "RopeArgs must match kernels/src/ops/rope.rs");

constexpr unsigned kRopeThreads = 128;

template <class T, unsigned N>
struct alignas(sizeof(T) * N) RopeVec {
  T x[N];
};

// Position of token t, or false when it has none.
__device__ __forceinline__ bool rope_position(const RopeArgs& a, unsigned long long t, double* pos) {
  if (a.pos_mode == 0) {
    *pos = a.positions[t];
    return true;
  }
  // The last request whose first token is at or before t (indptr may be garbage: still bounded).
  unsigned lo = 0, hi = a.batch;
  while (lo + 1 < hi) {
    const unsigned mid = lo + (hi - lo) / 2;
    if (static_cast<long long>(a.indptr[mid]) <= static_cast<long long>(t)) lo = mid; else hi = mid;
  }
  const long long first = a.indptr[lo];
  if (a.batch == 0 || first > static_cast<long long>(t) ||
      static_cast<long long>(t) >= static_cast<long long>(a.indptr[lo + 1]))
    return false;
  *pos = static_cast<double>(a.offsets[lo]) + static_cast<double>(static_cast<long long>(t) - first);
  return true;
}

// The frequency (radians per position) of pair j: theta^(-2j / rotary_dim), Llama 3.1-smoothed
// (keep high frequencies, divide low ones by the factor, blend in between; without it the host
// sets smooth_a = 0, smooth_b = 1: always keep), divided by the linear scale. It depends on j and
// the config only, so a block computes each once (rope_frequencies), not each thread per token.
__device__ __forceinline__ double rope_frequency(const RopeArgs& a, unsigned j) {
  const double f = exp(-(2.0 * j / a.rotary_dim) * a.ln_theta);
  const double smooth = fmin(fmax(f * a.smooth_a + a.smooth_b, 0.0), 1.0);
  return ((1.0 - smooth) * f * a.rcp_factor + smooth * f) * a.rcp_scale;
}

// Pairs whose frequencies a block keeps in shared memory (rotary_dim up to 512); a wider rotation
// computes them per thread and pair instead.
constexpr unsigned kRopeTable = 256;

// cos and sin of pos * f, the angle reduced modulo 2 pi in f64 (any i32 position keeps an absolute
// error of a few 1e-6); on the reduced angle (|r| <= pi) the hardware sin and cos are within
// 2^-21.4 absolute, far below a 16-bit output's rounding.
__device__ __forceinline__ void rope_angle(double f, double pos, float* c, float* s) {
  const double angle = pos * f;
  // 2 pi as a double plus its remainder: angle - k 2pi stays exact to ~1e-16 relative.
  const double k = rint(angle * 0.15915494309189535);
  double r = fma(-k, 6.283185307179586, angle);
  r = fma(-k, 2.4492935982947064e-16, r);
  __sincosf(static_cast<float>(r), s, c);
}

// Heads whose loads a thread issues before any of their stores: bytes in flight per thread, and
// a store never holds back the next head's loads (each element has one owning thread, so the
// order is free even in place).
constexpr unsigned kRopeBatch = 4;

// Thread (token, head group, chunk). Chunks below rotary_dim / (2 VEC) turn VEC pairs (two VEC
// vectors); the rest copy one VEC vector of the dims past rotary_dim. The host picks VEC so that
// VEC divides rotary_dim / 2 and head_dim and every pointer is aligned to VEC elements.
template <class T, unsigned VEC, bool GPTJ>
__device__ __forceinline__ void rope(const RopeArgs& a) {
  const unsigned half = a.rotary_dim / 2;
  const unsigned rot_chunks = half / VEC;
  const unsigned chunks = rot_chunks + (a.head_dim - a.rotary_dim) / VEC;
  const unsigned all_heads = a.heads[0] + a.heads[1] + a.heads[2];
  const unsigned groups = (all_heads + a.heads_per_thread - 1) / a.heads_per_thread;

  // The block's frequencies, before any thread leaves (the condition is the same for the block).
  __shared__ double freqs[kRopeTable];
  const bool table = a.rotate_mask != 0 && a.cos_sin == nullptr && half <= kRopeTable;
  if (table) {
    for (unsigned j = threadIdx.x; j < half; j += blockDim.x) freqs[j] = rope_frequency(a, j);
    __syncthreads();
  }

  const unsigned long long item = static_cast<unsigned long long>(blockIdx.x) * blockDim.x + threadIdx.x;
  const unsigned long long per_token = static_cast<unsigned long long>(groups) * chunks;
  if (item >= a.tokens * per_token) return;
  // 32-bit division when it fits (always, in practice): a 64-bit one is a long software routine.
  unsigned long long t;
  unsigned rem;
  if (((item | per_token) >> 32) == 0) {
    const unsigned t32 = static_cast<unsigned>(item) / static_cast<unsigned>(per_token);
    t = t32;
    rem = static_cast<unsigned>(item) - t32 * static_cast<unsigned>(per_token);
  } else {
    t = item / per_token;
    rem = static_cast<unsigned>(item - t * per_token);
  }
  const unsigned group = rem / chunks;
  const unsigned chunk = rem - group * chunks;

  // Where this token's K and V go (head 0), or -1: skip them.
  long long slot = 0;
  if (a.slot_mode == kSlotPlanned) {
    slot = static_cast<long long>(a.slots[t]);
  } else if (a.slot_mode == kSlotExplicit) {
    const PageTable p{a.batch_indices, a.positions, a.kv_indptr, a.kv_indices, a.kv_last_page_len,
                      a.batch, a.num_kv_indices, a.page_size, a.num_pages, a.kv_page_stride,
                      a.kv_token_stride};
    slot = explicit_slot(p, t);
  }

  const bool rotating = chunk < rot_chunks;
  const unsigned j0 = chunk * VEC;
  float c[VEC], s[VEC];
  if (rotating && a.rotate_mask != 0) {
    double pos = 0.0;
    bool valid = rope_position(a, t, &pos);
    if (valid && a.cos_sin != nullptr) valid = pos >= 0.0 && pos < static_cast<double>(a.max_position);
    const long long row = valid && a.cos_sin != nullptr ? static_cast<long long>(pos) : 0;
#pragma unroll
    for (unsigned e = 0; e < VEC; ++e) {
      if (!valid) {
        c[e] = s[e] = nan_f32();
      } else if (a.cos_sin != nullptr) {
        const float* r = a.cos_sin + row * a.rotary_dim;
        c[e] = r[j0 + e];
        s[e] = r[half + j0 + e];
      } else {
        rope_angle(table ? freqs[j0 + e] : rope_frequency(a, j0 + e), pos, &c[e], &s[e]);
      }
    }
  }

  // The two vectors a rotating chunk owns, or the one a copying chunk owns.
  const unsigned d1 = rotating ? (GPTJ ? 2 * j0 : j0) : a.rotary_dim + (chunk - rot_chunks) * VEC;
  const unsigned d2 = GPTJ ? 2 * j0 + VEC : j0 + half;
  const unsigned h_begin = group * a.heads_per_thread;
  const unsigned h_end = min(all_heads, h_begin + a.heads_per_thread);
  for (unsigned h0 = h_begin; h0 < h_end; h0 += kRopeBatch) {
    RopeVec<T, VEC> v1[kRopeBatch], v2[kRopeBatch];
    T* out[kRopeBatch];
    bool live[kRopeBatch], turn[kRopeBatch];
#pragma unroll
    for (unsigned b = 0; b < kRopeBatch; ++b) {
      const unsigned h = h0 + b;
      live[b] = false;
      turn[b] = false;
      out[b] = nullptr;
      if (h >= h_end) continue;
      const unsigned f = h < a.heads[0] ? 0 : h < a.heads[0] + a.heads[1] ? 1 : 2;
      const unsigned i = h - (f == 0 ? 0 : f == 1 ? a.heads[0] : a.heads[0] + a.heads[1]);
      const unsigned long long row = (t * a.heads[f] + i) * a.head_dim;
      const T* src = static_cast<const T*>(a.src[f]) + row;
      T* dst = static_cast<T*>(a.dst[f]);
      if (f == 0 || a.slot_mode == kSlotContiguous) {
        dst += row;
      } else if (slot < 0) {
        continue;
      } else {
        dst += static_cast<unsigned long long>(slot) + i * a.kv_head_stride;
      }
      turn[b] = rotating && ((a.rotate_mask >> f) & 1);
      if (!turn[b] && src == dst) continue;
      live[b] = true;
      out[b] = dst;
      v1[b] = *reinterpret_cast<const RopeVec<T, VEC>*>(src + d1);
      if (rotating) v2[b] = *reinterpret_cast<const RopeVec<T, VEC>*>(src + d2);
    }
#pragma unroll
    for (unsigned b = 0; b < kRopeBatch; ++b) {
      if (!live[b]) continue;
      if (turn[b]) {
        // Pair e of the chunk: NeoX (v1[e], v2[e]); GPT-J elements 2e and 2e + 1 of v1 ++ v2.
        float x[2 * VEC];
#pragma unroll
        for (unsigned e = 0; e < VEC; ++e) {
          x[e] = to_f32(v1[b].x[e]);
          x[VEC + e] = to_f32(v2[b].x[e]);
        }
#pragma unroll
        for (unsigned e = 0; e < VEC; ++e) {
          const unsigned p1 = GPTJ ? 2 * e : e, p2 = GPTJ ? 2 * e + 1 : VEC + e;
          const float x1 = x[p1], x2 = x[p2];
          x[p1] = fmaf(x1, c[e], -x2 * s[e]);
          x[p2] = fmaf(x2, c[e], x1 * s[e]);
        }
#pragma unroll
        for (unsigned e = 0; e < VEC; ++e) {
          v1[b].x[e] = from_f32<T>(x[e]);
          v2[b].x[e] = from_f32<T>(x[VEC + e]);
        }
      }
      *reinterpret_cast<RopeVec<T, VEC>*>(out[b] + d1) = v1[b];
      if (rotating) *reinterpret_cast<RopeVec<T, VEC>*>(out[b] + d2) = v2[b];
    }
  }
}

}  // namespace fi
