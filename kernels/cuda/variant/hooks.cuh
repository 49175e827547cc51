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
