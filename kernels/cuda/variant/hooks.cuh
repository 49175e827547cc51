// The only place kernels touch a variant. A hook the variant does not define is the identity (or
// "keep" for the mask); `if constexpr` on the template parameter means a missing static function is
// never named. Fast kernels must call these too, on every tile, so every hook is always honoured.
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
