// The numeric semantics of lowered hook code, the same as the CPU reference (the Rust that
// #[attention_variant] keeps calls ferrinfer's `__private::dsl`, which implements these rules):
//   - integer +, -, *, unary - and abs wrap (two's complement), as Rust's wrapping_* methods;
//   - shifts take the amount modulo the bit width (Rust's wrapping_shl/shr; `>>` on i32 is
//     arithmetic);
//   - integer x / 0 == 0 and x % 0 == x; i32::MIN / -1 == i32::MIN and i32::MIN % -1 == 0;
//   - f32 +, -, *, / round to nearest, each on its own: never contracted into a multiply-add, so a
//     threshold in a mask flips on no input (plain `a * b + c` is contracted by NVRTC by default);
//   - f32 to integer `as` saturates, NaN to 0 (fi::as_i32 / fi::as_u32 in dsl.cuh).
// Every function is overloaded on the exact C++ type of its operands, and the lowering gives both
// operands the same type, so no call is ambiguous.
//
// No includes: NVRTC compiles it as is; a host build (the differential test) includes <math.h>
// and defines __device__ and __forceinline__ first. Only the float intrinsics need a host branch.
#pragma once

namespace fi {

// Integer arithmetic goes through unsigned, where C++ defines wrap-around (signed overflow is
// undefined behaviour, and compilers do exploit it); the conversion back is modular (C++20, and
// what nvcc, NVRTC, GCC and Clang have always done).
__device__ __forceinline__ int add(int a, int b) {
  return static_cast<int>(static_cast<unsigned>(a) + static_cast<unsigned>(b));
}
__device__ __forceinline__ unsigned add(unsigned a, unsigned b) { return a + b; }
__device__ __forceinline__ int sub(int a, int b) {
  return static_cast<int>(static_cast<unsigned>(a) - static_cast<unsigned>(b));
}
__device__ __forceinline__ unsigned sub(unsigned a, unsigned b) { return a - b; }
__device__ __forceinline__ int mul(int a, int b) {
  return static_cast<int>(static_cast<unsigned>(a) * static_cast<unsigned>(b));
}
__device__ __forceinline__ unsigned mul(unsigned a, unsigned b) { return a * b; }
__device__ __forceinline__ int neg(int a) { return static_cast<int>(0u - static_cast<unsigned>(a)); }
__device__ __forceinline__ float neg(float a) { return -a; }

// x / 0 == 0 and x % 0 == x keep a == (a / b) * b + a % b; MIN / -1 wraps to MIN.
__device__ __forceinline__ int div(int a, int b) {
  if (b == 0) return 0;
  if (b == -1) return neg(a);
  return a / b;
}
__device__ __forceinline__ unsigned div(unsigned a, unsigned b) { return b == 0 ? 0u : a / b; }
__device__ __forceinline__ int rem(int a, int b) {
  if (b == 0) return a;
  if (b == -1) return 0;
  return a % b;
}
__device__ __forceinline__ unsigned rem(unsigned a, unsigned b) { return b == 0 ? a : a % b; }

// The shift amount may be i32 or u32 (as in Rust); only its low five bits count.
__device__ __forceinline__ int shl(int a, unsigned s) {
  return static_cast<int>(static_cast<unsigned>(a) << (s & 31u));
}
__device__ __forceinline__ unsigned shl(unsigned a, unsigned s) { return a << (s & 31u); }
__device__ __forceinline__ int shr(int a, unsigned s) { return a >> (s & 31u); }
__device__ __forceinline__ unsigned shr(unsigned a, unsigned s) { return a >> (s & 31u); }
__device__ __forceinline__ int shl(int a, int s) { return shl(a, static_cast<unsigned>(s)); }
__device__ __forceinline__ unsigned shl(unsigned a, int s) { return shl(a, static_cast<unsigned>(s)); }
__device__ __forceinline__ int shr(int a, int s) { return shr(a, static_cast<unsigned>(s)); }
__device__ __forceinline__ unsigned shr(unsigned a, int s) { return shr(a, static_cast<unsigned>(s)); }

// f32: the _rn intrinsics are never fused into a multiply-add (CUDA C++ Programming Guide,
// "Floating-Point Standard"); Rust does not fuse either.
#ifdef __CUDACC__
__device__ __forceinline__ float add(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ float sub(float a, float b) { return __fsub_rn(a, b); }
__device__ __forceinline__ float mul(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ float div(float a, float b) { return __fdiv_rn(a, b); }
#else
// The host build compiles with -ffp-contract=off.
inline float add(float a, float b) { return a + b; }
inline float sub(float a, float b) { return a - b; }
inline float mul(float a, float b) { return a * b; }
inline float div(float a, float b) { return a / b; }
#endif
// Rust's `%` on f32 is the exact fmod.
__device__ __forceinline__ float rem(float a, float b) { return fmodf(a, b); }

// f32 to integer, Rust's `as`: round toward zero, saturate, NaN to 0 (what cvt.rzi does).
#ifdef __CUDACC__
__device__ __forceinline__ int f32_to_i32(float x) { return __float2int_rz(x); }
__device__ __forceinline__ unsigned f32_to_u32(float x) { return __float2uint_rz(x); }
#else
inline int f32_to_i32(float x) {
  if (x != x) return 0;
  if (x <= -2147483648.0f) return -2147483647 - 1;
  if (x >= 2147483648.0f) return 2147483647;
  return static_cast<int>(x);
}
inline unsigned f32_to_u32(float x) {
  if (!(x > 0.0f)) return 0u;  // also NaN
  if (x >= 4294967296.0f) return 4294967295u;
  return static_cast<unsigned>(x);
}
#endif

}  // namespace fi
