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

// Field order: 24 pointers and strides, 5 doubles from byte 192, 16 unsigned from byte 232 (the
// Rust mirror's test checks those offsets).
struct RopeArgs {
  const void* src[3];  // q: token t's heads at t * src_row[0], head_dim apart; k, v alike
  void* dst[3];        // q out; k and v out (rows, or the cache per slot_mode); may equal src
  // Elements between consecutive tokens of each source and row destination (heads_f * head_dim
  // when dense; wider inside a fused QKV buffer). Unused for a cached K/V destination.
  unsigned long long src_row[3], dst_row[3];
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
static_assert(sizeof(RopeArgs) == 24 * 8 + 5 * 8 + 16 * 4, "RopeArgs must match kernels/src/ops/rope.rs");

constexpr unsigned kRopeThreads = 128;

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

// Pairs whose frequencies a block keeps in shared memory at a time (all of them for rotary_dim up
// to 512).
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

// Heads whose loads the copy instance issues before any of their stores: bytes in flight per
// thread, and a store never holds back the next head's loads (each element has one owning thread,
// so the order is free even in place). The rotating instances take one head at a time: on an H200
// four at once (114 registers, 25% occupancy) ran slower than one (50 registers, 56%).
constexpr unsigned kRopeBatch = 4;

// Up to N heads of one chunk between their loads and their stores.
template <class T, unsigned VEC, unsigned N>
struct RopeBatch {
  Pack<T, VEC> v1[N], v2[N];  // v2: rotating chunks only
  T* out[N];
  bool live[N], turn[N];
};

// Where a thread's chunk is: token t, its heads [h_begin, h_end), its dims d1 (and d2).
struct RopeChunk {
  unsigned long long t;
  long long slot;  // cache element offset of head 0 of t's K and V, or -1: skip them
  unsigned h_begin, h_end, d1, d2;
  bool rotating;
};

// Where head h (of all families) of token t lies: its family f, its index i there, its source
// (row t at the family's row stride) and its destination before any K/V slot (the row, or the
// cache's base).
struct RopeHead {
  const void* src;
  void* dst;
  unsigned i;
  bool cached, turn;
};

template <class T>
__device__ __forceinline__ RopeHead rope_head(const RopeArgs& a, unsigned rotate_mask, const RopeChunk& k,
                                              unsigned h) {
  const unsigned f = h < a.heads[0] ? 0 : h < a.heads[0] + a.heads[1] ? 1 : 2;
  const unsigned i = h - (f == 0 ? 0 : f == 1 ? a.heads[0] : a.heads[0] + a.heads[1]);
  const unsigned long long head = static_cast<unsigned long long>(i) * a.head_dim;
  const bool cached = f != 0 && a.slot_mode != kSlotContiguous;
  T* dst = static_cast<T*>(a.dst[f]);
  return {static_cast<const T*>(a.src[f]) + k.t * a.src_row[f] + head,
          cached ? dst : dst + k.t * a.dst_row[f] + head, i, cached,
          k.rotating && ((rotate_mask >> f) & 1)};
}

// Loads heads [h0, min(h0 + N, h_end)) of the chunk; a head with nothing to do (copied in place,
// or K/V without a slot) stays not live. Two passes: every source load first, then the
// destinations. Nothing before the last load waits on the slot (a load, or a page-table walk),
// not even a branch. The one-pass form branched on the slot between head 0's load and head 1's
// (in its PTX), so heads 1..3 waited a round trip for it: on an H200 decode at 4 heads per thread
// ran 5.9 us cold vs 4.2 at one head.
template <class T, unsigned VEC, unsigned N>
__device__ __forceinline__ void rope_load(const RopeArgs& a, unsigned rotate_mask, const RopeChunk& k,
                                          unsigned h0, RopeBatch<T, VEC, N>& b) {
#pragma unroll
  for (unsigned n = 0; n < N; ++n) {
    b.live[n] = false;
    b.turn[n] = false;
    b.out[n] = nullptr;
    if (h0 + n >= k.h_end) continue;
    const RopeHead x = rope_head<T>(a, rotate_mask, k, h0 + n);
    b.turn[n] = x.turn;
    if (!x.cached && !x.turn && x.src == x.dst) continue;  // copied in place: nothing to do
    const T* src = static_cast<const T*>(x.src);
    b.v1[n] = *reinterpret_cast<const Pack<T, VEC>*>(src + k.d1);
    if (k.rotating) b.v2[n] = *reinterpret_cast<const Pack<T, VEC>*>(src + k.d2);
    b.live[n] = true;
  }
#pragma unroll
  for (unsigned n = 0; n < N; ++n) {
    if (!b.live[n]) continue;
    const RopeHead x = rope_head<T>(a, rotate_mask, k, h0 + n);
    T* dst = static_cast<T*>(x.dst);
    if (x.cached) {
      if (k.slot < 0) {
        b.live[n] = false;
        continue;
      }
      dst += static_cast<unsigned long long>(k.slot) + x.i * a.kv_head_stride;
      if (!x.turn && x.src == dst) {
        b.live[n] = false;
        continue;
      }
    }
    b.out[n] = dst;
  }
}

// Turns the batch's rotated heads by (c, s) and stores every live head.
template <class T, unsigned VEC, bool GPTJ, unsigned N>
__device__ __forceinline__ void rope_store(const RopeChunk& k, const float (&c)[VEC], const float (&s)[VEC],
                                           RopeBatch<T, VEC, N>& b) {
#pragma unroll
  for (unsigned n = 0; n < N; ++n) {
    if (!b.live[n]) continue;
    if (b.turn[n]) {
      // Pair e of the chunk: NeoX (v1[e], v2[e]); GPT-J elements 2e and 2e + 1 of v1 ++ v2.
      float x[2 * VEC];
#pragma unroll
      for (unsigned e = 0; e < VEC; ++e) {
        x[e] = to_f32(b.v1[n].x[e]);
        x[VEC + e] = to_f32(b.v2[n].x[e]);
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
        b.v1[n].x[e] = from_f32<T>(x[e]);
        b.v2[n].x[e] = from_f32<T>(x[VEC + e]);
      }
    }
    *reinterpret_cast<Pack<T, VEC>*>(b.out[n] + k.d1) = b.v1[n];
    if (k.rotating) *reinterpret_cast<Pack<T, VEC>*>(b.out[n] + k.d2) = b.v2[n];
  }
}

// Thread (token, head group, chunk). Chunks below rotary_dim / (2 VEC) turn VEC pairs (two VEC
// vectors); the rest copy one VEC vector of the dims past rotary_dim. The host picks VEC so that
// VEC divides rotary_dim / 2 and head_dim and every pointer and stride is aligned to VEC elements.
// ROTATE = false is the lean copy instance for rotate_mask == 0 (KV append): whole heads in VEC
// chunks, no angle code at all, so few registers and many threads in flight.
// Order: the position's load is issued, the block fills its frequency table (hiding that latency),
// then the angles, then each head (or batch of heads): loads, turn, stores.
template <class T, unsigned VEC, bool GPTJ, bool ROTATE = true>
__device__ __forceinline__ void rope(const RopeArgs& a) {
  // The copy instance copies whole heads: the host passes rotary_dim 0 with it.
  const unsigned rotate_mask = ROTATE ? a.rotate_mask : 0u;
  const unsigned rotary_dim = ROTATE ? a.rotary_dim : 0u;
  const unsigned half = rotary_dim / 2;
  const unsigned rot_chunks = half / VEC;
  const unsigned chunks = rot_chunks + (a.head_dim - rotary_dim) / VEC;
  const unsigned all_heads = a.heads[0] + a.heads[1] + a.heads[2];
  const unsigned groups = (all_heads + a.heads_per_thread - 1) / a.heads_per_thread;

  const unsigned long long item = static_cast<unsigned long long>(blockIdx.x) * blockDim.x + threadIdx.x;
  const unsigned long long per_token = static_cast<unsigned long long>(groups) * chunks;
  // A thread past the last item still reaches the block's barrier, with no heads.
  const bool active = item < a.tokens * per_token;
  RopeChunk k{0, 0, 0, 0, 0, 0, false};
  unsigned j0 = 0;
  if (active) {
    // 32-bit division when it fits (always, in practice): a 64-bit one is a long software routine.
    unsigned rem;
    if (((item | per_token) >> 32) == 0) {
      const unsigned t32 = static_cast<unsigned>(item) / static_cast<unsigned>(per_token);
      k.t = t32;
      rem = static_cast<unsigned>(item) - t32 * static_cast<unsigned>(per_token);
    } else {
      k.t = item / per_token;
      rem = static_cast<unsigned>(item - k.t * per_token);
    }
    const unsigned group = rem / chunks;
    const unsigned chunk = rem - group * chunks;
    if (a.slot_mode == kSlotPlanned) {
      k.slot = static_cast<long long>(a.slots[k.t]);
    } else if (a.slot_mode == kSlotExplicit) {
      const PageTable p{a.batch_indices, a.positions, a.kv_indptr, a.kv_indices, a.kv_last_page_len,
                        a.batch, a.num_kv_indices, a.page_size, a.num_pages, a.kv_page_stride,
                        a.kv_token_stride};
      k.slot = explicit_slot(p, k.t);
    }
    k.rotating = chunk < rot_chunks;
    j0 = chunk * VEC;
    // The two vectors a rotating chunk owns, or the one a copying chunk owns.
    k.d1 = k.rotating ? (GPTJ ? 2 * j0 : j0) : rotary_dim + (chunk - rot_chunks) * VEC;
    k.d2 = GPTJ ? 2 * j0 + VEC : j0 + half;
    k.h_begin = group * a.heads_per_thread;
    k.h_end = min(all_heads, k.h_begin + a.heads_per_thread);
  }

  const bool angles = k.rotating && rotate_mask != 0;
  double pos = 0.0;
  bool valid = angles && rope_position(a, k.t, &pos);
  if (valid && a.cos_sin != nullptr) valid = pos >= 0.0 && pos < static_cast<double>(a.max_position);

  float c[VEC], s[VEC];
  if (rotate_mask != 0 && a.cos_sin == nullptr) {
    // Computed angles: the block walks the pairs in windows of kRopeTable frequencies (one for
    // rotary_dim up to 512); a thread's VEC pairs lie in one window (VEC divides kRopeTable).
    // The loop is the same for the whole block, so every thread meets every barrier.
    __shared__ double freqs[kRopeTable];
    for (unsigned w = 0; w < half; w += kRopeTable) {
      const unsigned n = min(kRopeTable, half - w);
      if (w > 0) __syncthreads();  // everyone is done with the previous window
      for (unsigned j = threadIdx.x; j < n; j += blockDim.x) freqs[j] = rope_frequency(a, w + j);
      __syncthreads();
      if (valid && j0 >= w && j0 < w + n) {
#pragma unroll
        for (unsigned e = 0; e < VEC; ++e) rope_angle(freqs[j0 - w + e], pos, &c[e], &s[e]);
      }
    }
  }
  if (!active) return;
  if (angles && !valid) {
#pragma unroll
    for (unsigned e = 0; e < VEC; ++e) c[e] = s[e] = nan_f32();
  } else if (angles && a.cos_sin != nullptr) {
    const float* r = a.cos_sin + static_cast<long long>(pos) * a.rotary_dim;
#pragma unroll
    for (unsigned e = 0; e < VEC; ++e) {
      c[e] = r[j0 + e];
      s[e] = r[half + j0 + e];
    }
  }

  constexpr unsigned N = ROTATE ? 1 : kRopeBatch;
  RopeBatch<T, VEC, N> b;
  for (unsigned h0 = k.h_begin; h0 < k.h_end; h0 += N) {
    rope_load(a, rotate_mask, k, h0, b);
    rope_store<T, VEC, GPTJ, N>(k, c, s, b);
  }
}

}  // namespace fi
