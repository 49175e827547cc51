// The only place kernels touch a variant. A hook the variant does not define is the identity (or
// "keep" for the mask); `if constexpr` on the template parameter means a missing static function is
// never named. Fast kernels must call these too, on every tile (the mask on every tile that
// mask_keeps_tile does not prove whole), so every hook is always honoured.
#pragma once
#include "variant/dsl.cuh"

namespace fi {

template <class V, class P>
__device__ __forceinline__ float hook_query(const P& p, float x, float partner, unsigned i,
                                            const Pos& at) {
  if constexpr (V::kHasQuery) {
    return V::query(p, x, partner, i, at);
  } else {
    return x;
  }
}

template <class V, class P>
__device__ __forceinline__ float hook_key(const P& p, float x, float partner, unsigned i,
                                          const Pos& at) {
  if constexpr (V::kHasKey) {
    return V::key(p, x, partner, i, at);
  } else {
    return x;
  }
}

// `s` is already multiplied by sm_scale.
template <class V, class P>
__device__ __forceinline__ float hook_logits(const P& p, float s, const Pos& at) {
  if constexpr (V::kHasLogits) {
    return V::logits(p, s, at);
  } else {
    return s;
  }
}

// The logits hook split around its scales, as #[attention_variant] lowers it (macros' split.rs):
// logits(s) = post * core(pre * s), where pre and post depend only on the parameters (1 where the
// hook has no such factor). The prefill templates take pre and post once per kernel, fold sm_scale
// into pre and log2(e) into post, and call only the core per score. A Variant written by hand
// without the split is its own core.
template <class V, class = void>
constexpr bool kLogitsSplit = false;
template <class V>
constexpr bool kLogitsSplit<V, decltype(void(&V::logits_core))> = true;

template <class V, class P>
__device__ __forceinline__ float hook_logits_pre(const P& p) {
  if constexpr (kLogitsSplit<V>) {
    return V::logits_pre(p);
  } else {
    return 1.0f;
  }
}

template <class V, class P>
__device__ __forceinline__ float hook_logits_post(const P& p) {
  if constexpr (kLogitsSplit<V>) {
    return V::logits_post(p);
  } else {
    return 1.0f;
  }
}

// A bound on |logits_core| over every score, where the macro finds one (macros' split.rs: tanh,
// constants, and sums and products of them; 1 for soft-capping), else 0.
template <class V, class = void>
constexpr float kLogitsCoreBound = 0.0f;
template <class V>
constexpr float kLogitsCoreBound<V, decltype(void(V::kLogitsCoreBound))> = V::kLogitsCoreBound;

// Whether a prefill softmax may weight a score by 2^(core * post) with no running row maximum:
// every exponent is then within +-kLogitsCoreBound * |post| (post in log2 units). For bf16 P
// (f32's exponent range) a bound of 80 keeps P, the row sums of up to 2^20 keys and P V with
// values up to 2^16 normal and finite; f16 P (normal from 2^-14 to 2^16) allows 12. Soft-capping
// at 30 is 43, so bf16 only; Gemma 2's 50 is 72. No maximum means no max reductions, no O
// rescales and an exponent free to start as soon as its score is capped.
template <class V, bool kBf16>
__device__ __forceinline__ bool fixed_max(float post) {
  return V::kSoftmax && kLogitsCoreBound<V> > 0.0f &&
         fabsf(post) * kLogitsCoreBound<V> <= (kBf16 ? 80.0f : 12.0f);
}

// `s` is the score times sm_scale and pre.
template <class V, class P>
__device__ __forceinline__ float hook_logits_core(const P& p, float s, const Pos& at) {
  if constexpr (kLogitsSplit<V>) {
    return V::logits_core(p, s, at);
  } else {
    return hook_logits<V>(p, s, at);
  }
}

template <class V, class P>
__device__ __forceinline__ bool hook_mask(const P& p, const Pos& at) {
  if constexpr (V::kHasMask) {
    return V::mask(p, at);
  } else {
    return true;
  }
}

// Whether the variant's mask keeps every score of a tile: packed query rows [row_lo, row_hi] (row
// r is query position r / group of head kv_head * group + r % group) against key positions
// [kv_lo, kv_hi]. Always without a mask; never where #[attention_variant] gave no `mask_tile`
// (a hand-written variant, or a body its tile.rs does not analyse), so such a mask runs on every
// score. The templates evaluate the mask per score only on tiles this does not clear.
template <class V, class = void>
constexpr bool kMaskTile = false;
template <class V>
constexpr bool kMaskTile<V, decltype(void(&V::mask_tile))> = true;

template <class V, class P>
__device__ __forceinline__ bool mask_keeps_tile(const P& p, unsigned b, unsigned row_lo,
                                                unsigned row_hi, unsigned group, unsigned kv_head,
                                                unsigned kv_lo, unsigned kv_hi, unsigned qo_len,
                                                unsigned kv_len, unsigned head_dim) {
  if constexpr (!V::kHasMask) {
    return true;
  } else if constexpr (!kMaskTile<V>) {
    return false;
  } else {
    const unsigned q_lo = row_lo / group, q_hi = row_hi / group, h0 = kv_head * group;
    // Rows of one query position hold heads row_lo % group to row_hi % group; of several, all.
    const Iv heads = q_lo == q_hi ? iv_span(h0 + row_lo % group, h0 + row_hi % group)
                                  : iv_span(h0, h0 + group - 1);
    const PosRange at{iv_point(b),      iv_span(q_lo, q_hi),   iv_span(kv_lo, kv_hi),
                      heads,            iv_point(kv_head),     iv_point(qo_len),
                      iv_point(kv_len), iv_point(head_dim)};
    return V::mask_tile(p, at) == kAll;
  }
}

// Which K/V tiles of a warp's rows the variant's mask may cut, asked 32 tiles at a time: one
// mask_keeps_tile call a lane (lane i for tile 32c + i), kept as a ballot, so the interval
// arithmetic and its branches cost a few instructions a tile. Tile t holds keys
// [kv0 + t * step, + tile_kv); rows and lengths as mask_keeps_tile's. One per warp and item (or
// CTA), called by the whole warp with the same arguments on every lane.
template <class V>
struct MaskCuts {
  unsigned chunk = ~0u, kept = 0;  // bit i: the mask keeps tile 32 chunk + i whole

  template <class P>
  __device__ __forceinline__ bool may_cut(unsigned t, const P& p, unsigned b, unsigned row_lo,
                                          unsigned row_hi, unsigned group, unsigned kv_head,
                                          unsigned kv0, unsigned step, unsigned tile_kv,
                                          unsigned qo_len, unsigned kv_len, unsigned head_dim) {
    if constexpr (!V::kHasMask) {
      return false;
    } else if constexpr (!kMaskTile<V>) {
      return true;
    } else {
      if (t / 32 != chunk) {
        chunk = t / 32;
        const unsigned lo = kv0 + chunk * 32 * step + (threadIdx.x % 32) * step;
        kept = __ballot_sync(0xffffffffu,
                             mask_keeps_tile<V>(p, b, row_lo, row_hi, group, kv_head, lo,
                                                lo + tile_kv - 1, qo_len, kv_len, head_dim));
      }
      return !((kept >> (t % 32)) & 1u);
    }
  }
};

template <class V, class P>
__device__ __forceinline__ float hook_output(const P& p, float o, unsigned i, const Pos& at) {
  if constexpr (V::kHasOutput) {
    return V::output(p, o, i, at);
  } else {
    return o;
  }
}

// Extra logit in the softmax denominator; -inf (no weight) when the variant has none.
template <class V, class P>
__device__ __forceinline__ float hook_sink(const P& p, const Pos& at) {
  if constexpr (V::kHasSink) {
    return V::sink(p, at);
  } else {
    return -FI_INF;
  }
}

}  // namespace fi
