// What lowered variant code may call: the position struct and the few helpers that give Rust's
// semantics where plain C++ would differ (arithmetic in variant/numeric.cuh; casts, min/max/abs on
// any scalar, checked indexing here; the interval arithmetic of `mask_tile` in variant/tile.cuh),
// plus FI_INF and tanh_approx from core/math.cuh. The lowering in macros/ emits only these names;
// keep the two in step. Compiles for the host too (the differential test of the lowering), as
// numeric.cuh says.
#pragma once
#include "core/math.cuh"
#include "variant/numeric.cuh"
#include "variant/tile.cuh"

namespace fi {

// Mirrors ferrinfer_runtime::variant::Pos.
struct Pos {
  unsigned batch, qo_pos, kv_pos, qo_head, kv_head, qo_len, kv_len, head_dim;
};

__device__ __forceinline__ float abs(float x) { return fabsf(x); }
__device__ __forceinline__ int abs(int x) { return x < 0 ? neg(x) : x; }
__device__ __forceinline__ float min(float a, float b) { return fminf(a, b); }
__device__ __forceinline__ int min(int a, int b) { return a < b ? a : b; }
__device__ __forceinline__ unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
__device__ __forceinline__ float max(float a, float b) { return fmaxf(a, b); }
__device__ __forceinline__ int max(int a, int b) { return a > b ? a : b; }
__device__ __forceinline__ unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }

// `as` casts. Float to integer saturates and maps NaN to 0, as in Rust.
__device__ __forceinline__ float as_f32(float x) { return x; }
__device__ __forceinline__ float as_f32(int x) { return static_cast<float>(x); }
__device__ __forceinline__ float as_f32(unsigned x) { return static_cast<float>(x); }
__device__ __forceinline__ float as_f32(bool x) { return x ? 1.0f : 0.0f; }
__device__ __forceinline__ int as_i32(float x) { return f32_to_i32(x); }
__device__ __forceinline__ int as_i32(int x) { return x; }
__device__ __forceinline__ int as_i32(unsigned x) { return static_cast<int>(x); }
__device__ __forceinline__ int as_i32(bool x) { return x ? 1 : 0; }
__device__ __forceinline__ unsigned as_u32(float x) { return f32_to_u32(x); }
__device__ __forceinline__ unsigned as_u32(int x) { return static_cast<unsigned>(x); }
__device__ __forceinline__ unsigned as_u32(unsigned x) { return x; }
__device__ __forceinline__ unsigned as_u32(bool x) { return x ? 1u : 0u; }

// `self.array[i]`: out of range traps (the launch fails with an error), as Rust indexing panics.
// A negative int becomes a huge unsigned, so one comparison covers both ends.
template <typename T>
__device__ __forceinline__ T index(const T* data, unsigned len, unsigned i) {
  if (i >= len) {
#ifdef __CUDACC__
    __trap();
#else
    __builtin_trap();
#endif
  }
  return data[i];
}
template <typename T>
__device__ __forceinline__ T index(const T* data, unsigned len, int i) {
  return index(data, len, static_cast<unsigned>(i));
}

// `!` where the type is a parameter field's (known to the Params struct, not to the macro): on
// an integer it is bitwise.
__device__ __forceinline__ bool bit_not(bool x) { return !x; }
__device__ __forceinline__ int bit_not(int x) { return ~x; }
__device__ __forceinline__ unsigned bit_not(unsigned x) { return ~x; }
// The element type of a parameter array, for a literal whose type is an array element's.
template <typename T>
struct elem;
template <typename T>
struct elem<const T*> {
  using type = T;
};
template <typename T>
using elem_t = typename elem<T>::type;

__device__ __forceinline__ bool is_multiple_of(unsigned a, unsigned b) {
  return b == 0 ? a == 0 : a % b == 0;
}

}  // namespace fi
