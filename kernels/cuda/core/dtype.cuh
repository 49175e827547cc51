// Storage types. Q, K, V and O hold f16 or bf16; every computation is f32. There are no CUDA
// headers in a translation unit, so the conversions are written in PTX (round to nearest even, as
// the `half` crate on the host rounds).
#pragma once

namespace fi {

struct f16 {
  unsigned short bits;
};
struct bf16 {
  unsigned short bits;
};

__device__ __forceinline__ float to_f32(f16 x) {
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(x.bits));
  return f;
}

// bf16 is the high half of an f32, so widening is exact: the bits become the upper 16 of 32.
__device__ __forceinline__ float to_f32(bf16 x) {
  float f;
  asm("mov.b32 %0, {%1, %2};" : "=f"(f) : "h"((unsigned short)0), "h"(x.bits));
  return f;
}

template <class T>
__device__ T from_f32(float x);

template <>
__device__ __forceinline__ f16 from_f32<f16>(float x) {
  f16 r;
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(r.bits) : "f"(x));
  return r;
}

template <>
__device__ __forceinline__ bf16 from_f32<bf16>(float x) {
  bf16 r;
  asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r.bits) : "f"(x));
  return r;
}

template <class T>
constexpr bool kIsBf16 = false;
template <>
constexpr bool kIsBf16<bf16> = true;

// {lo, hi} as one b16x2 register, rounded to nearest even, lo in the low half (the lower address
// in memory, the lower column of an MMA fragment).
template <class T>
__device__ __forceinline__ unsigned pack2(float lo, float hi) {
  unsigned r;
  if constexpr (kIsBf16<T>) {
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;\n" : "=r"(r) : "f"(hi), "f"(lo));
  } else {
    asm("cvt.rn.f16x2.f32 %0, %1, %2;\n" : "=r"(r) : "f"(hi), "f"(lo));
  }
  return r;
}

// N elements moved as one access of sizeof(T) * N bytes (16 for eight 16-bit elements or four
// floats) when the pointer is aligned to it: the vector type of every memory-bound kernel.
template <class T, unsigned N>
struct alignas(sizeof(T) * N) Pack {
  T x[N];
};

}  // namespace fi
