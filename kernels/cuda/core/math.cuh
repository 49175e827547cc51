// Float constants and the fast math the kernels share: infinity and NaN without CUDA's headers,
// log2(e) and ln(2) for softmax in base 2, and the hardware approximations (one MUFU each).
#pragma once

namespace fi {

// There is no INFINITY macro without CUDA's headers; the bit pattern is exact.
#define FI_INF __int_as_float(0x7f800000)

// The quiet NaN that stands for "no meaning" (the LSE of a variant without softmax).
__device__ __forceinline__ float nan_f32() { return __int_as_float(0x7fc00000); }

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// 2^x, the hardware approximation (2 ulp, subnormal results flushed to 0); 2^-inf = 0, which is all
// the softmax needs.
__device__ __forceinline__ float exp2_approx(float x) {
#ifdef __CUDACC__
  float r;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(r) : "f"(x));
  return r;
#else  // the host build of the DSL headers (the lowering's differential test)
  return exp2f(x);
#endif
}

// FastMath::tanh_approx: one MUFU.TANH (sm_75+), relative error at most 2^-10.987.
__device__ __forceinline__ float tanh_approx(float x) {
#ifdef __CUDACC__
  float r;
  asm("tanh.approx.f32 %0, %1;" : "=f"(r) : "f"(x));
  return r;
#else  // the host build: the exact function, as the CPU reference computes it
  return tanhf(x);
#endif
}

}  // namespace fi
