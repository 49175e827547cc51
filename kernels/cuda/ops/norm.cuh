// Row norms over [rows, hidden]: RMSNorm, fused residual add + RMSNorm, LayerNorm. Gemma's (1 + w)
// forms are the RMS kinds with weight_offset = 1 (the weight is applied as w + weight_offset).
//
// A row is handled by blockDim.x threads (a multiple of 32), blockDim.y rows per block. Each thread
// keeps its first kItems packs of the row in registers between the reduction and the write, so a
// row of up to blockDim.x * norm_items<VEC>() * VEC elements is read from memory once; the rest of a longer
// row is read again in the write pass (each thread re-reads only what it read itself).
// Mirrored by kernels/src/ops/norm.rs.
#pragma once

#include "core/dtype.cuh"
#include "core/warp.cuh"

namespace fi {

struct NormArgs {
  void* x;              // [rows, hidden]; fused add: overwritten with the normed row
  void* residual;       // fused add: [rows, hidden], becomes residual + x (rounded to T)
  const void* weight;   // [hidden]: T for the RMS kinds, f32 gamma for LayerNorm
  const float* bias;    // LayerNorm: f32 beta [hidden]
  void* out;            // RMSNorm, LayerNorm: [rows, hidden]
  unsigned rows, hidden;
  float eps, weight_offset;
};
static_assert(sizeof(NormArgs) == 5 * 8 + 4 * 4, "NormArgs must match kernels/src/ops/norm.rs");

constexpr unsigned kNormRms = 0;
constexpr unsigned kNormFusedAddRms = 1;
constexpr unsigned kNormLayer = 2;
constexpr unsigned kNormMaxThreads = 1024;

template <class T, unsigned N>
struct alignas(sizeof(T) * N) NormPack {
  T x[N];
};

// Packs each thread keeps in registers (16 or 32 registers of raw elements): a row of up to 64k
// elements (VEC 8), 32k (VEC 4), 8k (VEC 2) or 4k (VEC 1) at 1024 threads is read once. More narrow
// packs spill at 1024 threads.
template <unsigned VEC>
__device__ constexpr unsigned norm_items() {
  return VEC >= 4 ? 8 : 4;
}

// Sum over the threads of this thread's row; every thread of the row gets the same bits (same
// order everywhere). Block-uniform control flow: every thread of the block must call it.
__device__ __forceinline__ float norm_row_sum(float v, float* partial) {
  v = warp_sum(v);
  const unsigned warps = blockDim.x / kWarpSize;
  if (warps == 1) return v;
  const unsigned base = threadIdx.y * warps;
  if (lane_id() == 0) partial[base + warp_id()] = v;
  __syncthreads();
  float total = 0.0f;
  for (unsigned w = 0; w < warps; ++w) total += partial[base + w];
  __syncthreads();  // the next reduction reuses partial
  return total;
}

// Pack i of the row at element offset `at`, as the norm sees it: x, or for the fused kind the
// rounded sum residual + x, stored back into residual here.
template <class T, unsigned VEC, unsigned KIND>
__device__ __forceinline__ NormPack<T, VEC> norm_load(const NormArgs& a, unsigned long long at,
                                                      unsigned i) {
  using P = NormPack<T, VEC>;
  const unsigned long long e = at + static_cast<unsigned long long>(i) * VEC;
  const P x = *reinterpret_cast<const P*>(static_cast<const T*>(a.x) + e);
  if (KIND != kNormFusedAddRms) return x;
  P* r = reinterpret_cast<P*>(static_cast<T*>(a.residual) + e);
  const P old = *r;
  P sum;
#pragma unroll
  for (unsigned j = 0; j < VEC; ++j) sum.x[j] = from_f32<T>(to_f32(x.x[j]) + to_f32(old.x[j]));
  *r = sum;
  return sum;
}

// Pack i again in the write pass, for a row longer than the registers hold. The fused kind reads
// the residual this thread stored in the first pass.
template <class T, unsigned VEC, unsigned KIND>
__device__ __forceinline__ NormPack<T, VEC> norm_reload(const NormArgs& a, unsigned long long at,
                                                        unsigned i) {
  const void* src = KIND == kNormFusedAddRms ? a.residual : a.x;
  return *reinterpret_cast<const NormPack<T, VEC>*>(static_cast<const T*>(src) + at +
                                                    static_cast<unsigned long long>(i) * VEC);
}

template <class T, unsigned VEC>
__device__ __forceinline__ float norm_pack_sum(const NormPack<T, VEC>& p, float shift, bool square) {
  float s = 0.0f;
#pragma unroll
  for (unsigned j = 0; j < VEC; ++j) {
    const float v = to_f32(p.x[j]) - shift;
    s += square ? v * v : v;
  }
  return s;
}

// out = (x - shift) * scale * (w + weight_offset) for the RMS kinds (shift 0),
// (x - mean) * rstd * gamma + beta for LayerNorm.
template <class T, unsigned VEC, unsigned KIND>
__device__ __forceinline__ void norm_store(const NormArgs& a, unsigned long long at, unsigned i,
                                           const NormPack<T, VEC>& p, float shift, float scale) {
  const unsigned long long e = at + static_cast<unsigned long long>(i) * VEC;
  const unsigned c = i * VEC;
  NormPack<T, VEC> o;
  if (KIND == kNormLayer) {
    using F = NormPack<float, VEC>;
    const F g = *reinterpret_cast<const F*>(static_cast<const float*>(a.weight) + c);
    const F b = *reinterpret_cast<const F*>(a.bias + c);
#pragma unroll
    for (unsigned j = 0; j < VEC; ++j) {
      o.x[j] = from_f32<T>((to_f32(p.x[j]) - shift) * scale * g.x[j] + b.x[j]);
    }
  } else {
    const NormPack<T, VEC> w =
        *reinterpret_cast<const NormPack<T, VEC>*>(static_cast<const T*>(a.weight) + c);
#pragma unroll
    for (unsigned j = 0; j < VEC; ++j) {
      o.x[j] = from_f32<T>(to_f32(p.x[j]) * scale * (to_f32(w.x[j]) + a.weight_offset));
    }
  }
  void* dst = KIND == kNormFusedAddRms ? a.x : a.out;
  *reinterpret_cast<NormPack<T, VEC>*>(static_cast<T*>(dst) + e) = o;
}

// hidden must be a multiple of VEC and every pointer aligned to a pack (the host checks).
template <class T, unsigned VEC, unsigned KIND>
__device__ __forceinline__ void norm(const NormArgs& a) {
  using P = NormPack<T, VEC>;
  constexpr unsigned kItems = norm_items<VEC>();
  __shared__ float partial[kNormMaxThreads / kWarpSize];
  const unsigned long long row =
      static_cast<unsigned long long>(blockIdx.x) * blockDim.y + threadIdx.y;
  // Rows past the end still take part in every __syncthreads, with nothing to read or write.
  const bool live = row < a.rows;
  const unsigned packs = live ? a.hidden / VEC : 0;
  const unsigned long long at = row * a.hidden;
  const unsigned tx = threadIdx.x, nx = blockDim.x;

  P cache[kItems];
#pragma unroll
  for (unsigned k = 0; k < kItems; ++k) {
    if (tx + k * nx < packs) cache[k] = norm_load<T, VEC, KIND>(a, at, tx + k * nx);
  }
  // First statistic: the sum of squares (RMS) or the sum (LayerNorm).
  const bool square = KIND != kNormLayer;
  float s = 0.0f;
#pragma unroll
  for (unsigned k = 0; k < kItems; ++k) {
    if (tx + k * nx < packs) s += norm_pack_sum(cache[k], 0.0f, square);
  }
  for (unsigned i = tx + kItems * nx; i < packs; i += nx) {
    s += norm_pack_sum(norm_load<T, VEC, KIND>(a, at, i), 0.0f, square);
  }
  s = norm_row_sum(s, partial);
  const float inv_n = 1.0f / static_cast<float>(a.hidden);

  float shift = 0.0f, scale;
  if (KIND == kNormLayer) {
    // Variance about the mean, a second pass over the registers (and memory past them): no
    // cancellation of E[x^2] - E[x]^2 when the mean is large.
    shift = s * inv_n;
    float v = 0.0f;
#pragma unroll
    for (unsigned k = 0; k < kItems; ++k) {
      if (tx + k * nx < packs) v += norm_pack_sum(cache[k], shift, true);
    }
    for (unsigned i = tx + kItems * nx; i < packs; i += nx) {
      v += norm_pack_sum(norm_reload<T, VEC, KIND>(a, at, i), shift, true);
    }
    v = norm_row_sum(v, partial);
    scale = rsqrtf(v * inv_n + a.eps);
  } else {
    scale = rsqrtf(s * inv_n + a.eps);
  }

#pragma unroll
  for (unsigned k = 0; k < kItems; ++k) {
    if (tx + k * nx < packs) norm_store<T, VEC, KIND>(a, at, tx + k * nx, cache[k], shift, scale);
  }
  for (unsigned i = tx + kItems * nx; i < packs; i += nx) {
    norm_store<T, VEC, KIND>(a, at, i, norm_reload<T, VEC, KIND>(a, at, i), shift, scale);
  }
}

}  // namespace fi
