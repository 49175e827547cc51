// 16-byte vectors of eight b16 elements: what one lane of the decode kernel loads, converts and
// stores at a time (one LDS.128 / LDG.128 / STG.128), with a scalar fallback for unaligned data.
#pragma once
#include "core/dtype.cuh"

namespace fi {

struct alignas(16) Vec8 {
  unsigned w[4];  // element 2k in the low half of w[k], 2k + 1 in the high half
};

// bf16 widens exactly by moving its bits to the top half of an f32.
__device__ __forceinline__ void unpack8(const Vec8& v, float (&x)[8], bf16) {
  #pragma unroll
  for (int k = 0; k < 4; ++k) {
    x[2 * k] = __uint_as_float(v.w[k] << 16);
    x[2 * k + 1] = __uint_as_float(v.w[k] & 0xffff0000u);
  }
}

__device__ __forceinline__ void unpack8(const Vec8& v, float (&x)[8], f16) {
  #pragma unroll
  for (int k = 0; k < 4; ++k) {
    x[2 * k] = to_f32(f16{static_cast<unsigned short>(v.w[k] & 0xffffu)});
    x[2 * k + 1] = to_f32(f16{static_cast<unsigned short>(v.w[k] >> 16)});
  }
}

// Eight elements of type T as f32.
template <class T>
__device__ __forceinline__ void unpack8(const Vec8& v, float (&x)[8]) {
  unpack8(v, x, T{});
}

template <class T>
__device__ __forceinline__ Vec8 pack8(const float (&x)[8]) {
  Vec8 v;
  #pragma unroll
  for (int k = 0; k < 4; ++k) {
    const unsigned lo = from_f32<T>(x[2 * k]).bits, hi = from_f32<T>(x[2 * k + 1]).bits;
    v.w[k] = lo | (hi << 16);
  }
  return v;
}

// Eight b16 elements from `src`: one 16-byte load when `vec` (the address is 16-byte aligned),
// else eight 2-byte loads.
__device__ __forceinline__ Vec8 load8(const void* src, bool vec) {
  if (vec) return *static_cast<const Vec8*>(src);
  const unsigned short* s = static_cast<const unsigned short*>(src);
  Vec8 v;
  #pragma unroll
  for (int k = 0; k < 4; ++k) v.w[k] = s[2 * k] | (static_cast<unsigned>(s[2 * k + 1]) << 16);
  return v;
}

__device__ __forceinline__ void store8(void* dst, const Vec8& v, bool vec) {
  if (vec) {
    *static_cast<Vec8*>(dst) = v;
    return;
  }
  unsigned short* d = static_cast<unsigned short*>(dst);
  #pragma unroll
  for (int k = 0; k < 4; ++k) {
    d[2 * k] = static_cast<unsigned short>(v.w[k] & 0xffffu);
    d[2 * k + 1] = static_cast<unsigned short>(v.w[k] >> 16);
  }
}

// Whether an element offset (in b16 elements) keeps 16-byte alignment.
__device__ __forceinline__ bool aligned8(unsigned long long elems) { return elems % 8 == 0; }
__device__ __forceinline__ bool aligned16(const void* p) {
  return reinterpret_cast<unsigned long long>(p) % 16 == 0;
}

}  // namespace fi
