// How an attention row ends, for every family (prefill, decode, and the merge of split-KV
// partials): the sink joins the softmax denominator, an empty row gets its defined result, the LSE
// is taken, the output hook runs, and o and lse (or a split item's partial row) are written.
//
// A row's softmax state is (m, z): m a reference logit in log2 units, -inf while no key is
// visible (the running maximum; in the FA3 template moved only where a logit passes it by more
// than FI_MAX_SLACK, see next_max; 0 in prefill where the logits are bounded, fixed_max in
// variant/hooks.cuh), z = sum 2^(l - m) over its keys; the output accumulated with it is
// sum 2^(l - m) v.
// Without softmax the output is the plain weighted sum: nothing is normalised, the LSE is NaN.
//
// Partial format (written by split prefill and decode items, read by merge.cuh): for request-local
// query row i of an item with partial row base `partial`, partial row prow = partial + i holds at
// partial_o[(prow * num_qo_heads + h) * D ..] the chunk's output normalised by the chunk's own z
// (no sink, no output hook: the merge adds those once) and at partial_lse[prow * num_qo_heads + h]
// its natural-log LSE (-inf for a chunk that sees no key, whose output is 0).
#pragma once
#include "core/abi.cuh"
#include "core/dtype.cuh"
#include "core/math.cuh"
#include "core/warp.cuh"
#include "variant/hooks.cuh"

namespace fi {

// FI_MAX_SLACK: how far (log2 units) the FA3 template's running maximum of a row may trail the
// row's largest logit before it moves. A weight is then at most 2^slack (256 at 8, which bf16
// and f16 P hold, as do the f32 sums of 2^20 keys), and O is rescaled only where a row's maximum
// moves, which past a row's first tile is rare (FlashAttention-4's conditional rescale). 0: every
// new maximum moves it (the A/B switch). The FA2 template keeps the strict maximum (prefill.cuh).
#ifndef FI_MAX_SLACK
#define FI_MAX_SLACK 8
#endif

// A row's next reference given its current one `m` and `mx` = max(m, the tile's logits).
__device__ __forceinline__ float next_max(float m, float mx) {
#if FI_MAX_SLACK == 0
  return mx;
#else
  return mx > m + static_cast<float>(FI_MAX_SLACK) ? mx : m;
#endif
}

// The end of one row: o = acc * norm before the output hook (norm = 0 for an empty row, whose
// accumulator holds 0: no key added weight), and the natural-log LSE, taken only where it is
// written (by one lane of the row's several).
template <bool kSoftmax>
struct RowEnd {
  float norm;
  float m, z;  // the final softmax state

  __device__ __forceinline__ float lse() const {
    if constexpr (!kSoftmax) {
      return nan_f32();
    } else {
      return m == -FI_INF ? -FI_INF : (m + log2f(z)) * kLn2;
    }
  }
};

// A split item's row: normalised by its chunk's z alone. Empty: o = 0, lse = -inf.
template <bool kSoftmax>
__device__ __forceinline__ RowEnd<kSoftmax> finish_partial(float m, float z) {
  if constexpr (!kSoftmax) {
    return RowEnd<kSoftmax>{1.0f, m, z};
  } else {
    return RowEnd<kSoftmax>{m == -FI_INF ? 0.0f : 1.0f / z, m, z};
  }
}

// A final row: the variant's sink (a natural-log logit with no value, hook_sink) is added to the
// denominator first. Empty (no visible key and no sink): o = 0, lse = -inf; with a sink and no key,
// o = 0 and lse = the sink. The sink's rescale of the output is folded into `norm`.
// With `add_sink` false it is finish_partial, for a kernel that takes both branches from one
// call (prefill: computed once, ahead of its split test, the end costs fewer registers).
template <class V, class P>
__device__ __forceinline__ RowEnd<V::kSoftmax> finish_row(const P& p, float m, float z,
                                                          const Pos& at, bool add_sink = true) {
  if constexpr (!V::kSoftmax) {
    return RowEnd<false>{1.0f, m, z};
  } else {
    float scale = 1.0f;
    if constexpr (V::kHasSink) {
      const float sink = hook_sink<V>(p, at) * kLog2e;
      if (add_sink && sink != -FI_INF) {
        const float mn = fmaxf(m, sink);
        scale = exp2_approx(m - mn);
        z = z * scale + exp2_approx(sink - mn);
        m = mn;
      }
    }
    return RowEnd<true>{m == -FI_INF ? 0.0f : scale / z, m, z};
  }
}

// Element d of a final row: the normalised accumulator through the variant's output hook.
template <class V, class P>
__device__ __forceinline__ float out_elem(const P& p, float acc, const RowEnd<V::kSoftmax>& end,
                                          unsigned d, const Pos& at) {
  return hook_output<V>(p, acc * end.norm, d, at);
}

// Element 0 of head h of global query row `row` of o.
template <class T>
__device__ __forceinline__ T* out_row(const AttnArgs& a, unsigned long long row, unsigned h) {
  return static_cast<T*>(a.o) + row * a.o_stride_n + h * a.o_stride_h;
}

// Threads `lanes` apart trade two of their four registers: the upper thread (`upper`) gives its
// lo pair for the lower one's hi pair. Selects, not a runtime index into an array, which would be
// local memory.
__device__ __forceinline__ void quad_trade(unsigned& lo0, unsigned& lo1, unsigned& hi0,
                                           unsigned& hi1, bool upper, unsigned lanes) {
  const unsigned r0 = __shfl_xor_sync(kFullMask, upper ? lo0 : hi0, lanes);
  const unsigned r1 = __shfl_xor_sync(kFullMask, upper ? lo1 : hi1, lanes);
  lo0 = upper ? r0 : lo0;
  lo1 = upper ? r1 : lo1;
  hi0 = upper ? hi0 : r0;
  hi1 = upper ? hi1 : r1;
}

// One row of o from the four threads of a quad, in 16-byte stores. In the MMA accumulator layout
// each thread of the row's quad holds two columns of every 8-column block (`pairs[b]`, packed);
// a 4 x 4 transpose within the quad (two trades) leaves thread t4 all eight columns of blocks
// 4 g + t4. A warp's store then writes 64 contiguous bytes of each of its 8 rows, where 4-byte
// stores wrote 16: a quarter of the L2 write requests, whole sectors. Every lane of the warp
// calls it (the shuffles); `live` says whether this quad's row is written. The runtime refuses an
// o whose address or strides are not 16-byte multiples (wrappers.rs, check_vector_alignment).
template <class T, int D>
__device__ __forceinline__ void store_row_by_quad(T* row, const unsigned (&pairs)[D / 8],
                                                  unsigned t4, bool live) {
  static_assert(D % 32 == 0, "whole groups of four 8-column blocks");
  #pragma unroll
  for (int g = 0; g < D / 32; ++g) {
    unsigned x0 = pairs[4 * g], x1 = pairs[4 * g + 1], x2 = pairs[4 * g + 2], x3 = pairs[4 * g + 3];
    // With the thread two lanes over: the lower two trade their blocks 2-3 for the upper two's
    // blocks 0-1; then with the neighbouring lane: even threads trade 1 and 3 for its 0 and 2.
    quad_trade(x0, x1, x2, x3, (t4 & 2) != 0, 2);
    quad_trade(x0, x2, x1, x3, (t4 & 1) != 0, 1);
    if (live) *reinterpret_cast<uint4*>(row + 8 * (4 * g + t4)) = make_uint4(x0, x1, x2, x3);
  }
}

// The LSE of a final row, when the caller asked for LSEs.
__device__ __forceinline__ void write_lse(const AttnArgs& a, unsigned long long row, unsigned h,
                                          float lse) {
  if (a.lse != nullptr) a.lse[row * a.num_qo_heads + h] = lse;
}

// Index of (partial row prow, head h) in partial_lse; times D, in partial_o.
__device__ __forceinline__ unsigned long long partial_at(const AttnArgs& a, unsigned long long prow,
                                                         unsigned h) {
  return prow * a.num_qo_heads + h;
}

// Partial row of request-local query row i of an item whose partial rows start at `partial` (>= 0).
__device__ __forceinline__ unsigned long long partial_row(int partial, unsigned i) {
  return static_cast<unsigned long long>(partial) + i;
}

// Element 0 of head h of partial row prow in partial_o.
template <int D>
__device__ __forceinline__ float* partial_out(const AttnArgs& a, unsigned long long prow,
                                              unsigned h) {
  return a.partial_o + partial_at(a, prow, h) * D;
}

// N consecutive partial outputs acc * norm at dst (float4 stores when N is a multiple of 4, float2
// when N is 2: dst must then be aligned to 4 or 2 floats).
template <int N, bool kSoftmax>
__device__ __forceinline__ void store_partial(float* dst, const float (&acc)[N],
                                              const RowEnd<kSoftmax>& end) {
  const float norm = end.norm;
  if constexpr (N % 4 == 0) {
    #pragma unroll
    for (int k = 0; k < N; k += 4) {
      *reinterpret_cast<float4*>(dst + k) =
          make_float4(acc[k] * norm, acc[k + 1] * norm, acc[k + 2] * norm, acc[k + 3] * norm);
    }
  } else if constexpr (N == 2) {
    *reinterpret_cast<float2*>(dst) = make_float2(acc[0] * norm, acc[1] * norm);
  } else {
    #pragma unroll
    for (int k = 0; k < N; ++k) dst[k] = acc[k] * norm;
  }
}

// The LSE of a partial row (only softmax variants have one; the merge of others is a plain sum).
template <bool kSoftmax>
__device__ __forceinline__ void write_partial_lse(const AttnArgs& a, unsigned long long prow,
                                                  unsigned h, float lse) {
  if constexpr (kSoftmax) a.partial_lse[partial_at(a, prow, h)] = lse;
}

}  // namespace fi
