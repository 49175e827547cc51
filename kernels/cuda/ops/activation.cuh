// Gated activations: out[r, c] = act(x[r, c]) * x[r, d + c] for x [rows, 2 * d], out [rows, d];
// act is SiLU, GELU (erf) or GELU (tanh approximation), evaluated in f32.
//
// Thread (threadIdx.x, threadIdx.y) of block (bx, by) handles pack bx * blockDim.x + threadIdx.x of
// rows by * blockDim.y + threadIdx.y, stepping by gridDim.y * blockDim.y rows (grid.y is capped at
// 65535). Mirrored by kernels/src/ops/activation.rs.
#pragma once

#include "core/dtype.cuh"
#include "core/math.cuh"

namespace fi {

struct ActArgs {
  const void* x;  // [rows, 2 * d]
  void* out;      // [rows, d]
  unsigned rows, d;
};
static_assert(sizeof(ActArgs) == 2 * 8 + 2 * 4, "ActArgs must match kernels/src/ops/activation.rs");

constexpr unsigned kActSilu = 0;
constexpr unsigned kActGelu = 1;
constexpr unsigned kActGeluTanh = 2;

template <unsigned ACT>
__device__ __forceinline__ float activate(float x) {
  if (ACT == kActSilu) {
    // The hardware exp2 and a fast divide keep the kernel memory-bound (an IEEE divide and expf
    // cost about as many instructions as the loads take time); both are within a few ulp of f32.
    // For x below about -88 the denominator is inf and the quotient -0, the limit.
    return __fdividef(x, 1.0f + exp2_approx(-x * kLog2e));
  } else if (ACT == kActGelu) {
    return 0.5f * x * (1.0f + erff(x * 0.70710678118654752f));
  } else {
    // sqrt(2 / pi) * (x + 0.044715 x^3)
    const float u = 0.79788456080286536f * (x + 0.044715f * x * x * x);
    return 0.5f * x * (1.0f + tanhf(u));
  }
}

// d must be a multiple of VEC and both pointers aligned to a pack (the host checks).
template <class T, unsigned VEC, unsigned ACT>
__device__ __forceinline__ void act_and_mul(const ActArgs& a) {
  using P = Pack<T, VEC>;
  const unsigned col = blockIdx.x * blockDim.x + threadIdx.x;
  if (col >= a.d / VEC) return;
  const T* x = static_cast<const T*>(a.x);
  T* out = static_cast<T*>(a.out);
  const unsigned long long d = a.d, c = static_cast<unsigned long long>(col) * VEC;
  const unsigned long long step = static_cast<unsigned long long>(gridDim.y) * blockDim.y;
  for (unsigned long long r = static_cast<unsigned long long>(blockIdx.y) * blockDim.y + threadIdx.y;
       r < a.rows; r += step) {
    const T* in = x + r * 2 * d + c;
    const P g = *reinterpret_cast<const P*>(in);
    const P u = *reinterpret_cast<const P*>(in + d);
    P o;
#pragma unroll
    for (unsigned j = 0; j < VEC; ++j) {
      o.x[j] = from_f32<T>(activate<ACT>(to_f32(g.x[j])) * to_f32(u.x[j]));
    }
    *reinterpret_cast<P*>(out + r * d + c) = o;
  }
}

}  // namespace fi
