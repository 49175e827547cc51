// Row norms over [rows, hidden]: RMSNorm, fused residual add + RMSNorm, LayerNorm. Gemma's (1 + w)
// forms are the RMS kinds with weight_offset = 1 (the weight is applied as w + weight_offset).
//
// A row is handled by blockDim.x threads (a multiple of 32, so a warp never spans two rows),
// blockDim.y rows per block. Each thread keeps its first norm_items<VEC, KIND>() packs of the row in
// registers between the reduction and the write, so a row of up to blockDim.x * norm_items()
// packs is read from memory once; the rest of a longer row is read again in the write pass (each
// thread re-reads only what it read itself, so in-place updates need no barrier).
//
// The grid is persistent (about as many blocks as are resident at once) and a block walks its
// rows in steps of gridDim.x * blockDim.y, software-pipelined: the next row's cached packs are
// loaded before this row is reduced and stored, so loads stay in flight through the reduction and
// the stores instead of every block of a wave waiting on memory in the same phase.
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

// Packs each thread keeps in registers per row, twice over (this row and the next one's loads),
// at most what fits under __launch_bounds__(1024) (64 registers) without spilling: RMS 4 (2
// narrow), a row of up to 32k elements at 1024 threads read once; fused add 2 (1 narrow), as its
// next row holds x and residual packs at once; LayerNorm 2, as its f32 gamma and beta packs are
// twice as wide.
template <unsigned VEC, unsigned KIND>
__device__ constexpr unsigned norm_items() {
  return KIND == kNormRms ? (VEC >= 4 ? 4 : 2) : KIND == kNormFusedAddRms ? (VEC >= 4 ? 2 : 1) : 2;
}

// Sum over the threads of this thread's row; every thread of the row gets the same bits (each
// warp sums the same partials in the same lanes, and warp_sum is bitwise uniform). Block-uniform
// control flow: every thread of the block must call it, with the same `phase`.
//
// `partial` holds two sets of per-warp partials and consecutive calls alternate between them
// (`phase` flips), so one barrier per call suffices: a call writes the set that the call before
// last read, and every thread has passed the previous call's barrier, i.e. finished that read.
// The partials are summed across lanes (one shared load and a warp_sum), not in a serial loop.
__device__ __forceinline__ float norm_row_sum(float v, float* partial, unsigned& phase) {
  v = warp_sum(v);
  const unsigned warps = blockDim.x / kWarpSize;
  if (warps == 1) return v;
  float* set = partial + phase * (kNormMaxThreads / kWarpSize) + threadIdx.y * warps;
  phase ^= 1;
  if (lane_id() == 0) set[warp_id()] = v;
  __syncthreads();
  return warp_sum(lane_id() < warps ? set[lane_id()] : 0.0f);
}

template <class T, unsigned VEC>
__device__ __forceinline__ Pack<T, VEC> norm_pack(const void* base, unsigned long long e) {
  return *reinterpret_cast<const Pack<T, VEC>*>(static_cast<const T*>(base) + e);
}

template <class T, unsigned VEC>
__device__ __forceinline__ void norm_put(void* base, unsigned long long e, const Pack<T, VEC>& p) {
  *reinterpret_cast<Pack<T, VEC>*>(static_cast<T*>(base) + e) = p;
}

// residual + x, rounded to T: what the fused kind stores and normalises.
template <class T, unsigned VEC>
__device__ __forceinline__ Pack<T, VEC> norm_add(const Pack<T, VEC>& x,
                                                 const Pack<T, VEC>& r) {
  Pack<T, VEC> sum;
#pragma unroll
  for (unsigned j = 0; j < VEC; ++j) sum.x[j] = from_f32<T>(to_f32(x.x[j]) + to_f32(r.x[j]));
  return sum;
}

template <class T, unsigned VEC>
__device__ __forceinline__ float norm_pack_sum(const Pack<T, VEC>& p, float shift, bool square) {
  float s = 0.0f;
#pragma unroll
  for (unsigned j = 0; j < VEC; ++j) {
    const float v = to_f32(p.x[j]) - shift;
    s += square ? v * v : v;
  }
  return s;
}

// The RMS kinds' output pack: x * scale * (w + weight_offset).
template <class T, unsigned VEC>
__device__ __forceinline__ Pack<T, VEC> norm_scale(const Pack<T, VEC>& p,
                                                   const Pack<T, VEC>& w, float scale,
                                                   float weight_offset) {
  Pack<T, VEC> o;
#pragma unroll
  for (unsigned j = 0; j < VEC; ++j) {
    o.x[j] = from_f32<T>(to_f32(p.x[j]) * scale * (to_f32(w.x[j]) + weight_offset));
  }
  return o;
}

// Pack c (in elements) of the output: (x - shift) * scale * (w + weight_offset) for the RMS kinds
// (shift 0), (x - mean) * rstd * gamma + beta for LayerNorm. Loads only the weights.
template <class T, unsigned VEC, unsigned KIND>
__device__ __forceinline__ Pack<T, VEC> norm_apply(const NormArgs& a, unsigned c,
                                                   const Pack<T, VEC>& p, float shift,
                                                   float scale) {
  Pack<T, VEC> o;
  if (KIND == kNormLayer) {
    const Pack<float, VEC> g = norm_pack<float, VEC>(a.weight, c);
    const Pack<float, VEC> b = norm_pack<float, VEC>(a.bias, c);
#pragma unroll
    for (unsigned j = 0; j < VEC; ++j) {
      o.x[j] = from_f32<T>((to_f32(p.x[j]) - shift) * scale * g.x[j] + b.x[j]);
    }
  } else {
    o = norm_scale(p, norm_pack<T, VEC>(a.weight, c), scale, a.weight_offset);
  }
  return o;
}

// hidden must be a multiple of VEC and every pointer aligned to a pack (the host checks).
//
// Loads come before stores in each phase: the compiler may not move a load above a store that
// might alias it, so interleaving them would leave one load in flight per thread at a time.
template <class T, unsigned VEC, unsigned KIND>
__device__ __forceinline__ void norm(const NormArgs& a) {
  using P = Pack<T, VEC>;
  constexpr unsigned kItems = norm_items<VEC, KIND>();
  constexpr bool kFused = KIND == kNormFusedAddRms;
  __shared__ float partial[2 * kNormMaxThreads / kWarpSize];
  unsigned phase = 0;
  const unsigned tx = threadIdx.x, nx = blockDim.x;
  const unsigned long long stride = static_cast<unsigned long long>(gridDim.x) * blockDim.y;
  const unsigned all_packs = a.hidden / VEC;
  // Pack i of row r, in elements; whether a row's cached pack k exists (rows past the end have
  // none).
  auto elem = [&](unsigned long long r, unsigned i) {
    return r * a.hidden + i * VEC;  // i * VEC < hidden: 32-bit
  };
  auto has_in = [&](unsigned long long r, unsigned k) {
    return r < a.rows && tx + k * nx < all_packs;
  };
  // The cached packs of row r: x, and for the fused kind the residual.
  auto load = [&](unsigned long long r, P (&xs)[kItems], P (&rs)[kItems]) {
#pragma unroll
    for (unsigned k = 0; k < kItems; ++k) {
      if (has_in(r, k)) xs[k] = norm_pack<T, VEC>(a.x, elem(r, tx + k * nx));
    }
    if (kFused) {
#pragma unroll
      for (unsigned k = 0; k < kItems; ++k) {
        if (has_in(r, k)) rs[k] = norm_pack<T, VEC>(a.residual, elem(r, tx + k * nx));
      }
    }
  };

  // The fused kind keeps its cached packs' weights in registers for all its rows (a pack's weight
  // is the same in every row): the write pass then waits on no load after the reduction. It has
  // the registers (2 packs per thread); RMS (4) and LayerNorm (f32, twice as wide) do not.
  constexpr bool kKeepWeights = kFused;
  P weights[kKeepWeights ? kItems : 1];
  if (kKeepWeights) {
#pragma unroll
    for (unsigned k = 0; k < kItems; ++k) {
      if (tx + k * nx < all_packs) weights[k] = norm_pack<T, VEC>(a.weight, (tx + k * nx) * VEC);
    }
  }
  P cache[kItems], res[kItems];
  const unsigned long long first = static_cast<unsigned long long>(blockIdx.x) * blockDim.y;
  load(first + threadIdx.y, cache, res);
  // Block-uniform trip count: rows past the end still take part in every __syncthreads, with
  // nothing to read or write.
  for (unsigned long long base = first; base < a.rows; base += stride) {
    const unsigned long long row = base + threadIdx.y;
    const unsigned packs = row < a.rows ? all_packs : 0;
    auto has = [&](unsigned k) { return tx + k * nx < packs; };
    // The next row's loads go out before this row's reduction and stores (another row: no
    // aliasing even in place).
    P next[kItems], next_res[kItems];
    load(row + stride, next, next_res);

    // Fused: store the rounded sum x + residual into the residual.
    if (kFused) {
#pragma unroll
      for (unsigned k = 0; k < kItems; ++k) {
        if (has(k)) {
          cache[k] = norm_add(cache[k], res[k]);
          norm_put(a.residual, elem(row, tx + k * nx), cache[k]);
        }
      }
    }
    // First statistic: the sum of squares (RMS) or the sum (LayerNorm).
    const bool square = KIND != kNormLayer;
    float s = 0.0f;
#pragma unroll
    for (unsigned k = 0; k < kItems; ++k) {
      if (has(k)) s += norm_pack_sum(cache[k], 0.0f, square);
    }
    // Past the registers (rows longer than they hold): one pack at a time.
    for (unsigned i = tx + kItems * nx; i < packs; i += nx) {
      P p = norm_pack<T, VEC>(a.x, elem(row, i));
      if (kFused) {
        p = norm_add(p, norm_pack<T, VEC>(a.residual, elem(row, i)));
        norm_put(a.residual, elem(row, i), p);
      }
      s += norm_pack_sum(p, 0.0f, square);
    }
    s = norm_row_sum(s, partial, phase);
    const float inv_n = 1.0f / static_cast<float>(a.hidden);
    // The fused kind normalises the residual it stored (this thread's own stores: no barrier).
    const void* src = kFused ? a.residual : a.x;

    float shift = 0.0f, scale;
    if (KIND == kNormLayer) {
      // Variance about the mean, a second pass over the registers (and memory past them): no
      // cancellation of E[x^2] - E[x]^2 when the mean is large.
      shift = s * inv_n;
      float v = 0.0f;
#pragma unroll
      for (unsigned k = 0; k < kItems; ++k) {
        if (has(k)) v += norm_pack_sum(cache[k], shift, true);
      }
      for (unsigned i = tx + kItems * nx; i < packs; i += nx) {
        v += norm_pack_sum(norm_pack<T, VEC>(src, elem(row, i)), shift, true);
      }
      v = norm_row_sum(v, partial, phase);
      scale = rsqrtf(v * inv_n + a.eps);
    } else {
      scale = rsqrtf(s * inv_n + a.eps);
    }

    // Write: every cached output first (weight loads only), then the stores.
    void* dst = kFused ? a.x : a.out;
#pragma unroll
    for (unsigned k = 0; k < kItems; ++k) {
      if (has(k)) {
        cache[k] = kKeepWeights
                       ? norm_scale(cache[k], weights[kKeepWeights ? k : 0], scale, a.weight_offset)
                       : norm_apply<T, VEC, KIND>(a, (tx + k * nx) * VEC, cache[k], shift, scale);
      }
    }
#pragma unroll
    for (unsigned k = 0; k < kItems; ++k) {
      if (has(k)) norm_put(dst, elem(row, tx + k * nx), cache[k]);
    }
    for (unsigned i = tx + kItems * nx; i < packs; i += nx) {
      norm_put(dst, elem(row, i),
               norm_apply<T, VEC, KIND>(a, i * VEC, norm_pack<T, VEC>(src, elem(row, i)), shift,
                                        scale));
    }
#pragma unroll
    for (unsigned k = 0; k < kItems; ++k) {
      cache[k] = next[k];
      if (kFused) res[k] = next_res[k];
    }
  }
}

}  // namespace fi
