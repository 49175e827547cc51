// Sampling token ids from probabilities or logits without sorting the vocabulary; one block per row.
//
// The draw is an exponential race: token t with weight w_t > 0 gets E_t = -log(u_t) from Philox and
// the key w_t / E_t; the largest key wins, with probability w_t / sum(w) (E_t / w_t are independent
// exponentials of rate w_t). The keys are fixed per (call, row, token), so the winner within any
// subset is the race restricted to that subset: which tokens get a Philox draw does not change the
// winner, only which are allowed. So every pass but the last only loads (finds the allowed set's
// bounds), and the last races over the allowed tokens alone, compacted across the warp
// (race_allowed): Philox, the costly part (10 rounds per 4 tokens), runs on full warps.
//  - top-k: the k-th largest value t by a three-pass radix select over order-preserving keys of the
//    values (11 + 11 + 10 bits, a shared histogram); the set is {v >= t} (ties at t are kept).
//  - min-p: the largest weight W (probabilities: one load pass; logits: exp(0) = 1, the max pass
//    of the softmax gives it), then the race within {w >= min_p W}.
//  - top-p (after top-k): the set N is upward closed (t is in it iff the mass strictly above w_t is
//    below p times the mass S), i.e. {v >= T} for the value T with mass(v > T) < p S <=
//    mass(v >= T): a three-pass radix select by mass finds T (exact integer bin masses, so a seed
//    reproduces bit for bit), then the race within {v >= T}. After top-k, whose set is small, the
//    draw is by rejection over the race's best candidates instead (top_p_race: two passes). From
//    probabilities with no top-k, by rejection over proposals drawn by inverse CDF (top_p_icdf:
//    one pass, which also counts the select's first histograms; a second pass only when a
//    proposal lands in the boundary bin).
// The race runs from the end of the row (backward): a pass before it leaves that end in L2.
// Probabilities that are NaN, negative or infinite weigh 0; logits that are NaN or +-inf are -inf.
// A row without a positive weight gives token 0. Mirrored by runtime/src/ops/sampling/mod.rs.
#pragma once

#include "core/dtype.cuh"
#include "core/math.cuh"
#include "core/warp.cuh"
#include "ops/philox.cuh"

namespace fi {

struct SamplingArgs {
  const float* x;                   // [batch, row_stride]: probabilities or logits
  int* out;                         // [batch] token ids
  const unsigned long long* state;  // {seed, offset}
  const int* top_k_arr;             // [batch], or null for top_k
  const float* top_p_arr;           // [batch], or null for top_p
  const float* min_p_arr;           // [batch], or null for min_p
  const float* temperature_arr;     // [batch], or null for temperature (logits only)
  unsigned long long row_stride;    // elements
  unsigned batch, vocab;
  int top_k;
  float top_p, min_p, temperature;
  unsigned flags;  // kSampleTopK | kSampleTopP | kSampleMinP
  unsigned pad;
};
static_assert(sizeof(SamplingArgs) == 8 * 8 + 8 * 4, "SamplingArgs must match kernels/src/ops/sampling.rs");

constexpr unsigned kSamplingThreads = 512;
constexpr unsigned kSamplingWarps = kSamplingThreads / kWarpSize;
constexpr unsigned kSamplingLoads = 4;  // packs in flight per thread in a pass over a row
constexpr unsigned kSampleTopK = 1u, kSampleTopP = 2u, kSampleMinP = 4u;
constexpr unsigned kRadixBins = 2048;

// race_allowed's per-warp queue of candidates (token, weight): fewer than 32 left over, plus fewer
// than 32 from the packs that are queued (a warp with 32 candidates or more races in place).
constexpr unsigned kRaceQueue = kWarpSize * 2;

struct SamplingSmem {
  union {  // a radix select's histograms, or the race's queues (the race comes after the selects)
    struct {
      unsigned hist[kRadixBins];
      unsigned long long mass[kRadixBins];  // radix select by mass: integer units (mass_units)
    } radix;
    struct {
      unsigned t[kSamplingWarps][kRaceQueue];
      float w[kSamplingWarps][kRaceQueue];
    } queue;
  };
  float f[kSamplingWarps];
  unsigned long long u[kSamplingWarps];
  unsigned pick[2];
  double pick_mass;
};

// Unsigned keys in the order of the floats (no NaN here: values are canonical first).
__device__ __forceinline__ unsigned order_key(float v) {
  const unsigned b = __float_as_uint(v);
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}
__device__ __forceinline__ float order_value(unsigned k) {
  return __uint_as_float((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k);
}

// A race entry: the key's bits above the inverted token, so the u64 maximum is the largest key
// and, among equal keys, the lowest token; 0 means none.
__device__ __forceinline__ unsigned long long race_entry(float key, unsigned t) {
  return (static_cast<unsigned long long>(__float_as_uint(key)) << 32) | (~t);
}
__device__ __forceinline__ unsigned race_token(unsigned long long e) {
  return ~static_cast<unsigned>(e);
}
__device__ __forceinline__ unsigned long long max_u64(unsigned long long a, unsigned long long b) {
  return a > b ? a : b;
}
__device__ __forceinline__ unsigned long long shfl_xor_u64(unsigned long long v, unsigned m) {
  const unsigned lo = __shfl_xor_sync(kFullMask, static_cast<unsigned>(v), m);
  const unsigned hi = __shfl_xor_sync(kFullMask, static_cast<unsigned>(v >> 32), m);
  return (static_cast<unsigned long long>(hi) << 32) | lo;
}

// Block reductions in a fixed order, so every thread gets the bitwise same result on every run.
__device__ __forceinline__ unsigned long long block_max_u64(unsigned long long x, SamplingSmem& sm) {
  for (unsigned o = kWarpSize / 2; o > 0; o /= 2) x = max_u64(x, shfl_xor_u64(x, o));
  __syncthreads();  // the previous reduction's readers are done with sm.u
  if (lane_id() == 0) sm.u[warp_id()] = x;
  __syncthreads();
  x = lane_id() < kSamplingWarps ? sm.u[lane_id()] : 0ull;
  for (unsigned o = kWarpSize / 2; o > 0; o /= 2) x = max_u64(x, shfl_xor_u64(x, o));
  return x;
}
// Exact in any order (integer adds), so every run gets the same bits.
__device__ __forceinline__ unsigned long long block_sum_u64(unsigned long long x, SamplingSmem& sm) {
  for (unsigned o = kWarpSize / 2; o > 0; o /= 2) x += shfl_xor_u64(x, o);
  __syncthreads();
  if (lane_id() == 0) sm.u[warp_id()] = x;
  __syncthreads();
  x = lane_id() < kSamplingWarps ? sm.u[lane_id()] : 0ull;
  for (unsigned o = kWarpSize / 2; o > 0; o /= 2) x += shfl_xor_u64(x, o);
  return x;
}
__device__ __forceinline__ float block_sum(float x, SamplingSmem& sm) {
  x = warp_sum(x);
  __syncthreads();
  if (lane_id() == 0) sm.f[warp_id()] = x;
  __syncthreads();
  return warp_sum(lane_id() < kSamplingWarps ? sm.f[lane_id()] : 0.0f);
}
__device__ __forceinline__ float block_max(float x, SamplingSmem& sm) {
  for (unsigned o = kWarpSize / 2; o > 0; o /= 2) x = fmaxf(x, __shfl_xor_sync(kFullMask, x, o));
  __syncthreads();
  if (lane_id() == 0) sm.f[warp_id()] = x;
  __syncthreads();
  x = lane_id() < kSamplingWarps ? sm.f[lane_id()] : -FI_INF;
  for (unsigned o = kWarpSize / 2; o > 0; o /= 2) x = fmaxf(x, __shfl_xor_sync(kFullMask, x, o));
  return x;
}

// visit(t0, pack) for every VEC-aligned pack of the row, in increasing t0 per thread. One block
// streams a whole row, so memory latency, not bandwidth, bounds a pass: kSamplingLoads packs per
// thread are loaded before any is visited (512 threads x 4 x 16 B = 32 KB in flight per SM).
template <unsigned VEC>
__device__ __forceinline__ Pack<float, VEC> load_pack(const float* p) {
  return *reinterpret_cast<const Pack<float, VEC>*>(p);
}
template <unsigned VEC, class Visit>
__device__ __forceinline__ void scan_row(const float* row, unsigned n, Visit visit) {
  constexpr unsigned kStep = kSamplingThreads * VEC;
  unsigned i = threadIdx.x * VEC;
  for (; i + (kSamplingLoads - 1) * kStep < n; i += kSamplingLoads * kStep) {
    Pack<float, VEC> p[kSamplingLoads];
#pragma unroll
    for (unsigned u = 0; u < kSamplingLoads; ++u) p[u] = load_pack<VEC>(row + i + u * kStep);
#pragma unroll
    for (unsigned u = 0; u < kSamplingLoads; ++u) visit(i + u * kStep, p[u]);
  }
  for (; i < n; i += kStep) visit(i, load_pack<VEC>(row + i));
}

// scan_row from the end of the row: a pass that follows a forward one first meets the lines that
// pass read last, which are the ones still in L2 (the batch's rows exceed it: a forward re-scan
// would evict each line just before it is wanted). Visits in decreasing t0 per thread.
template <unsigned VEC, class Visit>
__device__ __forceinline__ void scan_row_backward(const float* row, unsigned n, Visit visit) {
  constexpr unsigned kStep = kSamplingThreads * VEC;
  const unsigned first = threadIdx.x * VEC;
  if (first >= n) return;
  unsigned m = (n - 1 - first) / kStep + 1;  // this thread's packs: first + q kStep for q < m
  for (; m >= kSamplingLoads; m -= kSamplingLoads) {
    Pack<float, VEC> p[kSamplingLoads];
#pragma unroll
    for (unsigned u = 0; u < kSamplingLoads; ++u) {
      p[u] = load_pack<VEC>(row + first + (m - 1 - u) * kStep);
    }
#pragma unroll
    for (unsigned u = 0; u < kSamplingLoads; ++u) visit(first + (m - 1 - u) * kStep, p[u]);
  }
  for (; m > 0; --m) visit(first + (m - 1) * kStep, load_pack<VEC>(row + first + (m - 1) * kStep));
}

// visit(t0, a, b) for the packs at t0 of rows a and b (zeros where b is null), as scan_row.
template <unsigned VEC, class Visit>
__device__ __forceinline__ void scan_rows(const float* a, const float* b, unsigned n, Visit visit) {
  constexpr unsigned kStep = kSamplingThreads * VEC;
  Pack<float, VEC> zero;
#pragma unroll
  for (unsigned e = 0; e < VEC; ++e) zero.x[e] = 0.0f;
  unsigned i = threadIdx.x * VEC;
  for (; i + (kSamplingLoads - 1) * kStep < n; i += kSamplingLoads * kStep) {
    Pack<float, VEC> p[kSamplingLoads], q[kSamplingLoads];
#pragma unroll
    for (unsigned u = 0; u < kSamplingLoads; ++u) {
      p[u] = load_pack<VEC>(a + i + u * kStep);
      q[u] = b ? load_pack<VEC>(b + i + u * kStep) : zero;
    }
#pragma unroll
    for (unsigned u = 0; u < kSamplingLoads; ++u) visit(i + u * kStep, p[u], q[u]);
  }
  for (; i < n; i += kStep) visit(i, load_pack<VEC>(a + i), b ? load_pack<VEC>(b + i) : zero);
}

__device__ __forceinline__ unsigned philox_word(const Philox4& r, unsigned i) {
  return i == 0 ? r.x[0] : i == 1 ? r.x[1] : i == 2 ? r.x[2] : r.x[3];
}

// Enter token t of weight w > 0 and uniform word `word` into this thread's race entry `best`.
// Since -log(u) >= 1 - u, the key w / -log(u) is at most w / (1 - u): when even that is strictly
// below the thread's best key the logarithm is skipped (the margin covers the rounding of logf and
// the products, so a key equal to the best, which might win the tie by token, is always entered).
// The winner is exactly the one of computing every key, in any order of the tokens.
__device__ __forceinline__ void race_enter(unsigned long long& best, float w, unsigned word,
                                           unsigned t) {
  const float u = philox_uniform(word);
  const float kbest = __uint_as_float(static_cast<unsigned>(best >> 32));
  if (w * 1.000001f <= kbest * (1.0f - u)) return;
  best = max_u64(best, race_entry(w / -logf(u), t));
}

// Canonical values and weights of one row.
template <bool LOGITS>
struct RowValues {
  float m, inv_t;  // logits: the largest value and 1 / temperature
  __device__ __forceinline__ float value(float x) const {
    if (LOGITS) return (x > -FI_INF && x < FI_INF) ? x + 0.0f : -FI_INF;  // + 0 makes -0 into 0
    return (x > 0.0f && x < FI_INF) ? x : 0.0f;
  }
  __device__ __forceinline__ float weight(float v) const {
    if (LOGITS) return v == -FI_INF ? 0.0f : expf((v - m) * inv_t);
    return v;
  }
};

// A logit row's values at temperature `temp` (1 unless positive and finite): 1 / temp and the
// largest value, from one load pass.
template <bool LOGITS, unsigned VEC>
__device__ __forceinline__ RowValues<LOGITS> logit_values(const float* x, unsigned n, float temp,
                                                          SamplingSmem& sm) {
  RowValues<LOGITS> rv{0.0f, 1.0f};
  rv.inv_t = (temp > 0.0f && temp < FI_INF) ? fminf(1.0f / temp, 3.4028234e38f) : 1.0f;
  float m = -FI_INF;
  scan_row<VEC>(x, n, [&](unsigned, const Pack<float, VEC>& p) {
#pragma unroll
    for (unsigned e = 0; e < VEC; ++e) m = fmaxf(m, rv.value(p.x[e]));
  });
  rv.m = block_max(m, sm);
  return rv;
}

// scan_row_backward with a warp-uniform trip count, for visitors that use warp collectives:
// visit(t0, pack, valid), where lanes past their last pack get zeros and valid false.
template <unsigned VEC, class Visit>
__device__ __forceinline__ void scan_row_backward_warp(const float* row, unsigned n, Visit visit) {
  constexpr unsigned kStep = kSamplingThreads * VEC;
  const unsigned first = threadIdx.x * VEC;
  const unsigned warp_first = warp_id() * kWarpSize * VEC;
  if (warp_first >= n) return;  // the whole warp
  const unsigned mine = first < n ? (n - 1 - first) / kStep + 1 : 0u;  // this thread's packs
  unsigned m = (n - 1 - warp_first) / kStep + 1;                        // lane 0's: the most
  Pack<float, VEC> zero;
#pragma unroll
  for (unsigned e = 0; e < VEC; ++e) zero.x[e] = 0.0f;
  for (; m >= kSamplingLoads; m -= kSamplingLoads) {
    Pack<float, VEC> p[kSamplingLoads];
#pragma unroll
    for (unsigned u = 0; u < kSamplingLoads; ++u) {
      const unsigned q = m - 1 - u;
      p[u] = q < mine ? load_pack<VEC>(row + first + q * kStep) : zero;
    }
#pragma unroll
    for (unsigned u = 0; u < kSamplingLoads; ++u) {
      const unsigned q = m - 1 - u;
      visit(first + q * kStep, p[u], q < mine);
    }
  }
  for (; m > 0; --m) {
    const unsigned q = m - 1;
    visit(first + q * kStep, q < mine ? load_pack<VEC>(row + first + q * kStep) : zero, q < mine);
  }
}

// The race winner (a race entry; 0 when none) among the tokens with value >= v_min and weight
// w >= w_min, w > 0: the last pass of every draw, the only one that draws Philox numbers.
// A filtered set is sparse (min-p and top-k: tens to hundreds of tokens of 128K), and a lane with
// one candidate would make its whole warp run Philox, so a warp whose packs hold fewer candidates
// than lanes queues them (token, weight) in shared memory and runs Philox 32 at a time, a lane
// per token. A warp with at least as many candidates as lanes races its packs in place, one Philox
// per pack (a pack lies in one Philox group: VEC divides 4 and t0 is a multiple of VEC). Either
// way every allowed token is entered once with its own key: the winner does not depend on the path.
template <bool LOGITS, unsigned VEC>
__device__ __noinline__ unsigned long long race_allowed(const float* x, unsigned n,
                                                        const RowValues<LOGITS> rv, float v_min,
                                                        float w_min, const RowRng rng,
                                                        SamplingSmem& sm) {
  unsigned* qt = sm.queue.t[warp_id()];
  float* qw = sm.queue.w[warp_id()];
  const unsigned below = (1u << lane_id()) - 1u;  // the lanes before this one
  unsigned long long b = 0;
  unsigned count = 0;  // queued entries, the same in every lane
  __syncthreads();     // the radix selects are done with the histograms the queues overlay
  scan_row_backward_warp<VEC>(x, n, [&](unsigned t0, const Pack<float, VEC>& p, bool valid) {
    float w[VEC];
    unsigned mine = 0;  // bit e: token t0 + e is allowed
    unsigned lanes[VEC];
    unsigned total = 0;
#pragma unroll
    for (unsigned e = 0; e < VEC; ++e) {
      const float v = rv.value(p.x[e]);
      w[e] = v >= v_min ? rv.weight(v) : 0.0f;
      const bool ok = valid && w[e] >= w_min && w[e] > 0.0f;
      mine |= static_cast<unsigned>(ok) << e;
      lanes[e] = __ballot_sync(kFullMask, ok);
      total += __popc(lanes[e]);
    }
    if (total >= kWarpSize) {  // dense: in place, one Philox per pack
      if (mine) {
        const Philox4 r = rng.group(t0 >> 2);
#pragma unroll
        for (unsigned e = 0; e < VEC; ++e) {
          if ((mine >> e) & 1u) race_enter(b, w[e], philox_word(r, (t0 + e) & 3), t0 + e);
        }
      }
      return;
    }
#pragma unroll
    for (unsigned e = 0; e < VEC; ++e) {
      if ((mine >> e) & 1u) {
        const unsigned slot = count + __popc(lanes[e] & below);
        qt[slot] = t0 + e;
        qw[slot] = w[e];
      }
      count += __popc(lanes[e]);
    }
    if (count >= kWarpSize) {
      __syncwarp();  // the entries are written before other lanes read them
      do {
        count -= kWarpSize;
        const unsigned t = qt[count + lane_id()];
        race_enter(b, qw[count + lane_id()], philox_word(rng.group(t >> 2), t & 3), t);
      } while (count >= kWarpSize);
      __syncwarp();  // the slots are read before the next pack writes them again
    }
  });
  __syncwarp();
  if (lane_id() < count) {
    const unsigned t = qt[lane_id()];
    race_enter(b, qw[lane_id()], philox_word(rng.group(t >> 2), t & 3), t);
  }
  return block_max_u64(b, sm);
}

// A weight as integer mass units, so histogram sums are exact and independent of the order of the
// atomics (a seed reproduces bit for bit). Probabilities: the significand, in units of the ulp of
// the weight's binade; every bin of a radix pass holds one binade (the first pass's 11 bits hold
// the exponent), so bin_mass scales a bin's sum by its own ulp: exact. Logits: weights are at most
// exp(0) = 1, in units of 2^-scale, scale = 62 - bits(n) so that n of them fit in 63 bits (rounded:
// at most 2^-46 per token at 128K tokens, against S >= 1).
__device__ __forceinline__ int logit_mass_scale(unsigned n) { return 62 - (32 - __clz(n)); }
template <bool LOGITS>
__device__ __forceinline__ unsigned long long mass_units(float w, int scale) {
  if (LOGITS) return __float2ull_rn(w * __int_as_float((127 + scale) << 23));  // w 2^scale
  const unsigned bits = __float_as_uint(w);
  return (bits & 0x7fffffu) | ((bits >> 23) ? 0x800000u : 0u);
}
// 2^e for -1022 <= e <= 1023, built from its bits (ldexp handles every range: many registers).
__device__ __forceinline__ double pow2(int e) {
  return __longlong_as_double(static_cast<long long>(1023 + e) << 52);
}
// The mass of a bin whose values have the order key `key` above the bin's bits and `units` summed.
template <bool LOGITS>
__device__ __forceinline__ double bin_mass(unsigned key, unsigned long long units, int scale) {
  if (LOGITS) return static_cast<double>(units) * pow2(-scale);
  const int e = static_cast<int>((key >> 23) & 0xffu);  // key of a value >= 0: its bits | 2^31
  return static_cast<double>(units) * pow2((e > 0 ? e : 1) - 150);
}

// *a += v on shared memory, as two 32-bit adds with the carry (exact in any order): sm_80 has no
// native 64-bit shared atomic add (its emulation spilled in the transforms), and on the H200
// sm_90's made the radix select by mass 2.3x slower (top-p draw 0.343 ms against 0.149, b128 over
// 128K tokens).
__device__ __forceinline__ void shared_add_u64(unsigned long long* a, unsigned long long v) {
  unsigned* w = reinterpret_cast<unsigned*>(a);  // little-endian: low word first
  const unsigned lo = static_cast<unsigned>(v);
  const unsigned old = atomicAdd(w, lo);
  const unsigned hi = static_cast<unsigned>(v >> 32) + (old + lo < old ? 1u : 0u);
  if (hi) atomicAdd(w + 1, hi);
}

// A radix select over order-preserving keys of the canonical values >= v_min (11 + 11 + 10 bits,
// shared histograms), three load passes over the row.
//  - by count (MASS false): the k-th largest value t (1 <= k <= n): count(v > t) < k <= count(v >= t).
//  - by mass (MASS true): the value t with mass(v > t) < p S <= mass(v >= t), mass being the sum
//    of weights and S the mass of all (from the first pass's bins); the largest value when p S is
//    0, the smallest when p S exceeds the mass by rounding. Bin masses are exact (mass_units) and
//    summed in double in a fixed order, so t is the same on every run.
// Where a radix select stands between passes: the key bits chosen so far and what the next pass
// still has to find (a count, or a mass). A select can stop after a pass and resume later.
struct RadixState {
  unsigned prefix, mask, remaining;
  double want;
};

// Zeroes the histograms of a radix pass (the masses too for a select by mass).
template <bool MASS>
__device__ __forceinline__ void radix_clear(SamplingSmem& sm) {
  __syncthreads();  // the previous pass's walk (or the previous user of sm.radix) is done
  for (unsigned b = threadIdx.x; b < kRadixBins; b += kSamplingThreads) {
    sm.radix.hist[b] = 0;
    if (MASS) sm.radix.mass[b] = 0;
  }
  __syncthreads();
}

// Counts canonical value v, in bin b, into a radix pass's histograms (sm.radix).
template <bool LOGITS, bool MASS>
__device__ __forceinline__ void radix_count(unsigned* hist, unsigned long long* units, unsigned b,
                                            const RowValues<LOGITS>& rv, float v, int scale) {
  atomicAdd(&hist[b], 1u);
  if (MASS) shared_add_u64(&units[b], mass_units<LOGITS>(rv.weight(v), scale));
}

// Passes [first, last) of a radix select (see radix_select). With `filled`, the first of them
// finds its histograms already counted (top_p_survey counts pass 0 while it reads the row).
template <bool LOGITS, unsigned VEC, bool MASS>
__device__ __noinline__ void radix_passes(const float* x, unsigned n, float p, float v_min,
                                          const RowValues<LOGITS> rv, SamplingSmem& sm,
                                          RadixState& st, unsigned first, unsigned last,
                                          bool filled) {
  unsigned prefix = st.prefix, mask = st.mask, remaining = st.remaining;
  double want = st.want;
  unsigned* hist = sm.radix.hist;
  unsigned long long* units = sm.radix.mass;
  const int scale = logit_mass_scale(n);
  for (unsigned pass = first; pass < last; ++pass) {
    const unsigned shift = pass == 0 ? 21 : pass == 1 ? 10 : 0;
    const unsigned bins = pass == 2 ? 1024 : 2048;
    if (!(filled && pass == first)) {
      radix_clear<MASS>(sm);
      scan_row<VEC>(x, n, [&](unsigned, const Pack<float, VEC>& q) {
#pragma unroll
        for (unsigned e = 0; e < VEC; ++e) {
          const float v = rv.value(q.x[e]);
          const unsigned key = order_key(v);
          if ((key & mask) == prefix && v >= v_min) {
            radix_count<LOGITS, MASS>(hist, units, (key >> shift) & (bins - 1), rv, v, scale);
          }
        }
      });
    }
    __syncthreads();
    if (warp_id() == 0) {
      // Each lane owns bins/32 consecutive bins; a suffix scan over lanes finds the lane whose
      // bins hold the crossing, and that lane walks its bins from the top.
      const unsigned per = bins / kWarpSize, lo = lane_id() * per;
      unsigned c = 0;
      double m = 0.0;
      for (unsigned b = 0; b < per; ++b) {
        c += hist[lo + b];
        if (MASS) m += bin_mass<LOGITS>(prefix | ((lo + b) << shift), units[lo + b], scale);
      }
      unsigned s = c;
      double ms = m;
      for (unsigned o = 1; o < kWarpSize; o *= 2) {
        const unsigned up = __shfl_down_sync(kFullMask, s, o);
        const double upm = __shfl_down_sync(kFullMask, ms, o);
        if (lane_id() + o < kWarpSize) {
          s += up;
          ms += upm;
        }
      }
      if (MASS && pass == 0) want = static_cast<double>(p) * __shfl_sync(kFullMask, ms, 0);
      if (!MASS) {
        unsigned acc = s - c;
        if (acc < remaining && remaining <= s) {
          for (unsigned b = lo + per; b-- > lo;) {
            const unsigned h = hist[b];
            if (acc + h >= remaining) {
              sm.pick[0] = b;
              sm.pick[1] = remaining - acc;
              break;
            }
            acc += h;
          }
        }
      } else {
        // The nonempty bin where the mass from the top reaches want (the top nonempty one when
        // want <= 0). Lanes hold increasing bins, and the lanes' intervals (above, sum] of
        // nonempty lanes tile the mass, so at most one lane holds it. None (want above the
        // mass, by rounding): the lowest nonempty bin, keeping everything below as well.
        const double above = ms - m;
        const bool here = c > 0 && (want <= 0.0 || (above < want && want <= ms));
        const unsigned holders = __ballot_sync(kFullMask, here);
        const unsigned nonempty = __ballot_sync(kFullMask, c > 0);
        if (holders != 0 && lane_id() == 31u - __clz(holders)) {
          double acc = above;
          unsigned last = lo;
          double last_acc = acc;
          bool found = false;
          for (unsigned b = lo + per; b-- > lo;) {
            if (hist[b] == 0) continue;
            const double mb = bin_mass<LOGITS>(prefix | (b << shift), units[b], scale);
            if (want <= 0.0 || acc + mb >= want) {
              sm.pick[0] = b;
              sm.pick_mass = want - acc;
              found = true;
              break;
            }
            last = b;
            last_acc = acc;
            acc += mb;
          }
          if (!found) {  // the walk's sums rounded below the lane's: its lowest nonempty bin
            sm.pick[0] = last;
            sm.pick_mass = want - last_acc;
          }
        } else if (holders == 0 && nonempty != 0 && lane_id() == __ffs(nonempty) - 1) {
          for (unsigned q = lo; q < lo + per; ++q) {
            if (hist[q] > 0) {
              sm.pick[0] = q;
              sm.pick_mass = FI_INF;
              break;
            }
          }
        } else if (nonempty == 0 && lane_id() == 0) {  // nothing >= v_min: keep the prefix
          sm.pick[0] = 0;
          sm.pick_mass = want;
        }
      }
    }
    __syncthreads();
    prefix |= sm.pick[0] << shift;
    if (MASS) want = sm.pick_mass;
    else remaining = sm.pick[1];
    mask |= (bins - 1) << shift;
  }
  st = RadixState{prefix, mask, remaining, want};
}

template <bool LOGITS, unsigned VEC, bool MASS>
__device__ __forceinline__ float radix_select(const float* x, unsigned n, unsigned k, float p,
                                              float v_min, const RowValues<LOGITS>& rv,
                                              SamplingSmem& sm) {
  RadixState st{0u, 0u, k, 0.0};
  radix_passes<LOGITS, VEC, MASS>(x, n, p, v_min, rv, sm, st, 0, 3, false);
  return order_value(st.prefix);
}

template <bool LOGITS, unsigned VEC>
__device__ __forceinline__ float kth_largest(const float* x, unsigned n, unsigned k,
                                             const RowValues<LOGITS>& rv, SamplingSmem& sm) {
  return radix_select<LOGITS, VEC, false>(x, n, k, 0.0f, -FI_INF, rv, sm);
}

// ---- Top-p over a whole row: proposals by inverse CDF, one load pass ----
//
// With no top-k the nucleus N = {v >= T} holds most of a row's mass, so tokens drawn from the
// whole row (probability w / S) mostly land in it, and the first that does is a draw from N
// (rejection sampling with i.i.d. proposals; after kIcdfRounds rounds of kIcdfDraws proposals
// the race within N decides instead, still a draw from N). One pass (top_p_survey) counts the
// radix select's first histograms and, per warp load of 32 packs (an entry), the sum of its
// weights; the first pass's walk then gives the bin b* of the nucleus's boundary. A proposal
// finds its entry in that table by a prefix sum and its token within the entry's one load, and
// is in N when its bin is above b*, out when below; only a proposal in b* itself needs one more
// pass (icdf_resolve; about 1.5% of draws land there at p = 0.9, so over a batch of 128 rows
// most calls have such a row, and the batch waits for it: T by the select's two remaining
// passes made that row's tail two passes, 0.102 ms a b128 call on the H200). So a row costs one
// or two load passes where the radix select and the race cost four. Sums are f32 per entry (a
// fixed lane tree) and f64 over entries in a fixed order: a seed reproduces bit for bit.
constexpr unsigned kIcdfDraws = 4;  // proposals a round, one warp each (one Philox group)
constexpr unsigned kIcdfRounds = 8;
constexpr unsigned kIcdfEntries = 4096;  // table capacity: rows up to 4096 x 32 x VEC tokens
constexpr unsigned kIcdfPer = kIcdfEntries / kSamplingThreads;  // entries a thread sums

struct IcdfSmem {
  float entry[kIcdfEntries];        // weight sum of each warp load, in token order
  double before[kSamplingThreads];  // mass of the entries before thread i's kIcdfPer
  double total;
  unsigned entries, last_group;  // valid entries; the last thread group with positive mass
  unsigned cand[kIcdfDraws];
  float value[kIcdfDraws];
  unsigned verdict[kIcdfDraws];  // kIcdfOut, kIcdfIn, or kIcdfBoundary (icdf_resolve decides)
};
constexpr unsigned kIcdfOut = 0, kIcdfIn = 1, kIcdfBoundary = 2;

// Entry e holds tokens [e / W kStep + (e % W) 32 VEC, + 32 VEC), W the warps: warp e % W's packs
// of step e / W, so entries in index order are in token order.
template <unsigned VEC>
__device__ __forceinline__ unsigned icdf_entry_start(unsigned e) {
  return (e / kSamplingWarps) * (kSamplingThreads * VEC) + (e % kSamplingWarps) * (kWarpSize * VEC);
}

// One pass: the radix select's first histograms (as its pass 0 over every value) and the table.
template <bool LOGITS, unsigned VEC>
__device__ __noinline__ void top_p_survey(const float* x, unsigned n, const RowValues<LOGITS> rv,
                                          SamplingSmem& sm, IcdfSmem& ic) {
  unsigned* hist = sm.radix.hist;
  unsigned long long* units = sm.radix.mass;
  const int scale = logit_mass_scale(n);
  radix_clear<true>(sm);
  scan_row_backward_warp<VEC>(x, n, [&](unsigned t0, const Pack<float, VEC>& p, bool valid) {
    float sum = 0.0f;
#pragma unroll
    for (unsigned e = 0; e < VEC; ++e) {
      const float v = rv.value(p.x[e]);
      const float w = rv.weight(v);
      if (valid) {
        radix_count<LOGITS, true>(hist, units, order_key(v) >> 21, rv, v, scale);  // pass 0
        sum += w;
      }
    }
    for (unsigned o = kWarpSize / 2; o > 0; o /= 2) sum += __shfl_xor_sync(kFullMask, sum, o);
    if (lane_id() == 0) ic.entry[(t0 / (kSamplingThreads * VEC)) * kSamplingWarps + warp_id()] = sum;
  });
  __syncthreads();
  // The entries' exclusive prefix, kIcdfPer a thread, in a fixed order.
  const unsigned entries = ic.entries;
  double mine = 0.0;
  for (unsigned i = 0; i < kIcdfPer; ++i) {
    const unsigned e = threadIdx.x * kIcdfPer + i;
    if (e < entries) mine += ic.entry[e];
  }
  double v = mine;
  for (unsigned o = 1; o < kWarpSize; o *= 2) {
    const double y = __shfl_up_sync(kFullMask, v, o);
    if (lane_id() >= o) v += y;
  }
  if (lane_id() == kWarpSize - 1) sm.u[warp_id()] = static_cast<unsigned long long>(__double_as_longlong(v));
  const unsigned last = __reduce_max_sync(kFullMask, mine > 0.0 ? threadIdx.x + 1 : 0u);
  if (lane_id() == 0) sm.pick[0] = 0;
  __syncthreads();
  double before = 0.0, total = 0.0;
  for (unsigned j = 0; j < kSamplingWarps; ++j) {
    const double t = __longlong_as_double(static_cast<long long>(sm.u[j]));
    if (j < warp_id()) before += t;
    total += t;
  }
  ic.before[threadIdx.x] = before + (v - mine);
  if (lane_id() == 0 && last) atomicMax(&sm.pick[0], last);
  if (threadIdx.x == 0) ic.total = total;
  __syncthreads();
  if (threadIdx.x == 0) ic.last_group = sm.pick[0] ? sm.pick[0] - 1 : 0u;
}

// Warp d's proposal: the token where the running weight sum in token order reaches u S.
template <bool LOGITS, unsigned VEC>
__device__ __forceinline__ unsigned icdf_propose(const float* x, unsigned n,
                                                 const RowValues<LOGITS>& rv, double target,
                                                 const IcdfSmem& ic) {
  // The last thread group whose mass before is below the target (its mass is then positive, but
  // for rounding at the top: then the last group with positive mass).
  unsigned lo = 0, hi = ic.last_group;
  while (lo < hi) {
    const unsigned mid = (lo + hi + 1) / 2;
    if (ic.before[mid] < target) lo = mid;
    else hi = mid - 1;
  }
  double acc = ic.before[lo];
  unsigned e = 0xffffffffu, last_pos = 0xffffffffu;
  for (unsigned i = 0; i < kIcdfPer; ++i) {
    const unsigned c = lo * kIcdfPer + i;
    if (c >= ic.entries || !(ic.entry[c] > 0.0f)) continue;
    if (acc + ic.entry[c] >= target) {
      e = c;
      break;
    }
    acc += ic.entry[c];
    last_pos = c;
  }
  if (e == 0xffffffffu) {  // rounding past the group's end: its last positive entry
    e = last_pos;
    acc -= ic.entry[e];
  }
  // Within the entry: a warp scan of the lanes' packs.
  const unsigned t0 = icdf_entry_start<VEC>(e) + lane_id() * VEC;
  float w[VEC];
  float own = 0.0f;
#pragma unroll
  for (unsigned k = 0; k < VEC; ++k) {
    w[k] = t0 + k < n ? rv.weight(rv.value(x[t0 + k])) : 0.0f;
    own += w[k];
  }
  double incl = own;
  for (unsigned o = 1; o < kWarpSize; o *= 2) {
    const double y = __shfl_up_sync(kFullMask, incl, o);
    if (lane_id() >= o) incl += y;
  }
  incl += acc;
  const double excl = incl - own;
  const bool here = own > 0.0f && excl < target && target <= incl;
  const unsigned holders = __ballot_sync(kFullMask, here);
  // Rounding past the entry's end: its last lane with weight.
  const unsigned lane = holders ? __ffs(holders) - 1 : 31 - __clz(__ballot_sync(kFullMask, own > 0.0f));
  unsigned t = 0;
  if (lane_id() == lane) {
    double c = excl;
    t = 0xffffffffu;
    unsigned last = t0;
#pragma unroll
    for (unsigned k = 0; k < VEC; ++k) {
      if (w[k] > 0.0f) {
        c += w[k];
        last = t0 + k;
        if (t == 0xffffffffu && c >= target) t = t0 + k;
      }
    }
    if (t == 0xffffffffu) t = last;
  }
  return __shfl_sync(kFullMask, t, lane);
}

// One pass deciding this round's proposals in the boundary bin b* without T: after the select's
// pass 0, `want` is the mass still to reach within b*, and v >= T exactly when the mass of b*'s
// tokens strictly above v is below it (that mass and the select's later walks over b*'s sub-bins
// are the same exact integer sums, all of one binade's ulp; `want` <= 0 keeps b*'s largest value
// alone). One pass, where T takes the select's two remaining ones.
template <bool LOGITS, unsigned VEC>
__device__ __noinline__ void icdf_resolve(const float* x, unsigned n, const RowValues<LOGITS> rv,
                                          unsigned boundary, double want, SamplingSmem& sm,
                                          IcdfSmem& ic) {
  const int scale = logit_mass_scale(n);
  float cut[kIcdfDraws];
  unsigned long long above[kIcdfDraws];
#pragma unroll
  for (unsigned d = 0; d < kIcdfDraws; ++d) {
    cut[d] = ic.verdict[d] == kIcdfBoundary ? ic.value[d] : FI_INF;  // +inf: nothing is above
    above[d] = 0;
  }
  scan_row<VEC>(x, n, [&](unsigned, const Pack<float, VEC>& q) {
#pragma unroll
    for (unsigned e = 0; e < VEC; ++e) {
      const float v = rv.value(q.x[e]);
      if ((order_key(v) >> 21) != boundary) continue;
      const unsigned long long u = mass_units<LOGITS>(rv.weight(v), scale);
#pragma unroll
      for (unsigned d = 0; d < kIcdfDraws; ++d) above[d] += v > cut[d] ? u : 0ull;
    }
  });
#pragma unroll
  for (unsigned d = 0; d < kIcdfDraws; ++d) above[d] = block_sum_u64(above[d], sm);
  if (threadIdx.x == 0) {
    for (unsigned d = 0; d < kIcdfDraws; ++d) {
      if (ic.verdict[d] != kIcdfBoundary) continue;
      const bool in = want > 0.0 ? bin_mass<LOGITS>(boundary << 21, above[d], scale) < want
                                 : above[d] == 0;
      ic.verdict[d] = in ? kIcdfIn : kIcdfOut;
    }
  }
  __syncthreads();
}

template <bool LOGITS, unsigned VEC>
__device__ __noinline__ unsigned top_p_icdf(const float* x, unsigned n, const RowValues<LOGITS> rv,
                                            float top_p, const RowRng rng, SamplingSmem& sm) {
  __shared__ IcdfSmem ic;
  if (threadIdx.x == 0) ic.entries = (n + kWarpSize * VEC - 1) / (kWarpSize * VEC);
  top_p_survey<LOGITS, VEC>(x, n, rv, sm, ic);
  if (!(ic.total > 0.0)) return 0;
  RadixState st{0u, 0u, 0u, 0.0};
  radix_passes<LOGITS, VEC, true>(x, n, top_p, -FI_INF, rv, sm, st, 0, 1, true);
  const unsigned boundary = st.prefix >> 21;
  // Boundary values already decided: N is upward closed, so a value at or above one found in is
  // in, and one at or below one found out is out.
  float in_from = FI_INF, out_to = -FI_INF;
  for (unsigned round = 0; round < kIcdfRounds; ++round) {
    if (warp_id() < kIcdfDraws) {
      const unsigned d = warp_id();
      const float u = philox_uniform(philox_word(rng.group(kPhiloxScalarGroups + round), d));
      const unsigned tok = icdf_propose<LOGITS, VEC>(x, n, rv, static_cast<double>(u) * ic.total, ic);
      if (lane_id() == 0) {
        const float v = rv.value(x[tok]);
        const unsigned b = order_key(v) >> 21;
        ic.cand[d] = tok;
        ic.value[d] = v;
        ic.verdict[d] = b > boundary || v >= in_from ? kIcdfIn
                        : b < boundary || v <= out_to ? kIcdfOut
                                                      : kIcdfBoundary;
      }
    }
    __syncthreads();
    bool open = false;  // block-uniform: every thread reads the same verdicts
    for (unsigned d = 0; d < kIcdfDraws; ++d) open = open || ic.verdict[d] == kIcdfBoundary;
    if (open) {
      icdf_resolve<LOGITS, VEC>(x, n, rv, boundary, st.want, sm, ic);
      for (unsigned d = 0; d < kIcdfDraws; ++d) {
        const float v = ic.value[d];
        if ((order_key(v) >> 21) != boundary) continue;
        if (ic.verdict[d] == kIcdfIn) in_from = fminf(in_from, v);
        else out_to = fmaxf(out_to, v);
      }
    }
    for (unsigned d = 0; d < kIcdfDraws; ++d) {  // in order: the first proposal in N wins
      if (ic.verdict[d] == kIcdfIn) return ic.cand[d];
    }
    __syncthreads();  // every thread has read this round's proposals
  }
  radix_passes<LOGITS, VEC, true>(x, n, top_p, -FI_INF, rv, sm, st, 1, 3, false);
  const float t = order_value(st.prefix);
  const unsigned long long best = race_allowed<LOGITS, VEC>(x, n, rv, t, 0.0f, rng, sm);
  return best ? race_token(best) : 0u;
}

// ---- Top-p by rejection over the race's best candidates ----
//
// The race within the nucleus N (upward closed in w) is won by the best key of N; a race over any
// superset B of N ranks its tokens by the same keys, so N's winner is the first of B's ranking that
// lies in N, and t lies in N iff the mass strictly above w_t is below p S. One pass races over B
// keeping the kTopPCandidates best entries; the next pass sums, over the base set, S and the mass
// above each candidate: the first candidate (by key) whose mass above is below p S (or is 0: the
// largest weights) wins. If none does, N lies above the heaviest candidate, and that same pass has
// already raced over B' = {w > that weight}: its candidates are the next round's. Each candidate
// fails with probability about 1 - p (its mass above is about uniform), so at p = 0.9 a row needs
// two passes and all of a batch's 128 rows rarely more: the batch waits for its slowest row, which
// one candidate per round made three or four passes. Masses are integers, floor(w 2^shift) with
// the shift from the largest weight so the row's sum fits 63 bits: exact in any order, so a seed
// reproduces bit for bit. After kTopPRounds rounds the radix select by mass bounds N instead.
constexpr unsigned kTopPCandidates = 4;
constexpr unsigned kTopPRounds = 8;

struct TopPPass {
  unsigned long long top[kTopPCandidates];  // race entries, best first; 0: none
  unsigned long long s, above[kTopPCandidates];
  float w_max;
};

// floor(w 2^shift) for a finite w > 0, from its bits (no double arithmetic in the loop).
__device__ __forceinline__ unsigned long long mass_units_shift(float w, int shift) {
  const unsigned bits = __float_as_uint(w), e = bits >> 23;
  const unsigned long long mant = (bits & 0x7fffffu) | (e ? 0x800000u : 0u);
  const int s = static_cast<int>(e ? e : 1u) - 150 + shift;
  return s >= 0 ? mant << s : (s > -32 ? mant >> -s : 0ull);
}

// Insert entry x (larger than top[K - 1]) into the descending list `top`.
__device__ __forceinline__ void top_insert(unsigned long long (&top)[kTopPCandidates],
                                           unsigned long long x) {
#pragma unroll
  for (unsigned i = 0; i < kTopPCandidates; ++i) {
    const unsigned long long y = top[i];
    top[i] = x > y ? x : y;
    x = x > y ? y : x;
  }
}

// race_enter keeping the best kTopPCandidates entries (the logarithm skipped below the last).
__device__ __forceinline__ void race_enter_top(unsigned long long (&top)[kTopPCandidates], float w,
                                               unsigned word, unsigned t) {
  const float u = philox_uniform(word);
  const float kmin = __uint_as_float(static_cast<unsigned>(top[kTopPCandidates - 1] >> 32));
  if (w * 1.000001f <= kmin * (1.0f - u)) return;
  top_insert(top, race_entry(w / -logf(u), t));
}

// One pass: the race over {base, w > w_gt} keeping the best entries, and over the base set
// {v >= v_min, w > 0} its mass and the mass above each pivot (pivots of +inf count nothing), in
// units of 2^-shift, and its largest weight. Every allowed token gets its own key, in place, one
// Philox per pack (the sets here are dense: top-p keeps most of a row).
template <bool LOGITS, unsigned VEC>
__device__ __noinline__ void top_p_pass(const float* x, unsigned n, const RowValues<LOGITS> rv,
                                        float v_min, float w_gt, const float* pivot, int shift,
                                        const RowRng rng, SamplingSmem& sm, TopPPass& out) {
  unsigned long long top[kTopPCandidates], above[kTopPCandidates], s = 0;
  float piv[kTopPCandidates], w_max = 0.0f;
#pragma unroll
  for (unsigned i = 0; i < kTopPCandidates; ++i) {
    top[i] = 0;
    above[i] = 0;
    piv[i] = pivot[i];
  }
  __syncthreads();  // the previous pass's block reductions are done with sm
  scan_row_backward<VEC>(x, n, [&](unsigned t0, const Pack<float, VEC>& p) {
    float w[VEC];
    bool any = false;
#pragma unroll
    for (unsigned e = 0; e < VEC; ++e) {
      const float v = rv.value(p.x[e]);
      w[e] = v >= v_min ? rv.weight(v) : 0.0f;
      if (w[e] > 0.0f) {
        const unsigned long long u = mass_units_shift(w[e], shift);
        w_max = fmaxf(w_max, w[e]);
        s += u;
#pragma unroll
        for (unsigned i = 0; i < kTopPCandidates; ++i) above[i] += w[e] > piv[i] ? u : 0ull;
      }
      any |= w[e] > w_gt && w[e] > 0.0f;
    }
    if (any) {
      const Philox4 r = rng.group(t0 >> 2);
#pragma unroll
      for (unsigned e = 0; e < VEC; ++e) {
        if (w[e] > w_gt && w[e] > 0.0f) race_enter_top(top, w[e], philox_word(r, (t0 + e) & 3), t0 + e);
      }
    }
  });
  out.s = block_sum_u64(s, sm);
#pragma unroll
  for (unsigned i = 0; i < kTopPCandidates; ++i) out.above[i] = block_sum_u64(above[i], sm);
  out.w_max = block_max(w_max, sm);
  // The block's best entries: the best head, popped from its (one) owner, kTopPCandidates times.
#pragma unroll
  for (unsigned i = 0; i < kTopPCandidates; ++i) {
    const unsigned long long b = block_max_u64(top[0], sm);
    out.top[i] = b;
    if (b != 0 && top[0] == b) {
#pragma unroll
      for (unsigned j = 0; j + 1 < kTopPCandidates; ++j) top[j] = top[j + 1];
      top[kTopPCandidates - 1] = 0;
    }
  }
}

template <bool LOGITS, unsigned VEC>
__device__ __forceinline__ unsigned long long top_p_race(const float* x, unsigned n,
                                                         const RowValues<LOGITS>& rv, float v_min,
                                                         float top_p, const RowRng& rng,
                                                         SamplingSmem& sm) {
  float pivot[kTopPCandidates];
#pragma unroll
  for (unsigned i = 0; i < kTopPCandidates; ++i) pivot[i] = FI_INF;
  TopPPass cur, next;
  top_p_pass<LOGITS, VEC>(x, n, rv, v_min, 0.0f, pivot, -200, rng, sm, cur);
  if (!cur.top[0]) return 0;
  // w_max < 2^(e + 1): units below 2^(62 - bits(n)), n of them below 2^62.
  const int e = static_cast<int>((__float_as_uint(cur.w_max) >> 23) & 0xffu) - 127;
  const int shift = 62 - (32 - __clz(n)) - (e + 1);
  for (unsigned round = 0; round < kTopPRounds; ++round) {
    float w_gt = 0.0f;
#pragma unroll
    for (unsigned i = 0; i < kTopPCandidates; ++i) {
      pivot[i] = cur.top[i] ? rv.weight(rv.value(x[race_token(cur.top[i])])) : FI_INF;
      if (cur.top[i]) w_gt = fmaxf(w_gt, pivot[i]);
    }
    top_p_pass<LOGITS, VEC>(x, n, rv, v_min, w_gt, pivot, shift, rng, sm, next);
    const double want = static_cast<double>(top_p) * static_cast<double>(next.s);
#pragma unroll
    for (unsigned i = 0; i < kTopPCandidates; ++i) {
      if (cur.top[i] && (next.above[i] == 0 || static_cast<double>(next.above[i]) < want)) {
        return cur.top[i];
      }
    }
    if (!next.top[0]) break;  // nothing above the candidates: rounding; let the radix decide
    cur = next;
  }
  const float t = radix_select<LOGITS, VEC, true>(x, n, 0, top_p, v_min, rv, sm);
  return race_allowed<LOGITS, VEC>(x, n, rv, fmaxf(v_min, t), 0.0f, rng, sm);
}

template <bool LOGITS, unsigned VEC>
__device__ __forceinline__ void sample_row(const SamplingArgs& a, unsigned row) {
  __shared__ SamplingSmem sm;
  const unsigned n = a.vocab;
  const float* x = a.x + row * a.row_stride;
  // Per-request values are clamped here (the host validates scalars): k to [1, vocab]; p NaN is 1,
  // else clamped to [0, 1]; min-p NaN is 0, else [0, 1]; a temperature that is not positive and
  // finite is 1.
  unsigned k = n;
  if (a.flags & kSampleTopK) {
    const int kk = a.top_k_arr ? a.top_k_arr[row] : a.top_k;
    k = kk < 1 ? 1u : (static_cast<unsigned>(kk) > n ? n : static_cast<unsigned>(kk));
  }
  float top_p = 1.0f;
  if (a.flags & kSampleTopP) {
    const float p = a.top_p_arr ? a.top_p_arr[row] : a.top_p;
    top_p = p != p ? 1.0f : fminf(fmaxf(p, 0.0f), 1.0f);
  }
  float min_p = 0.0f;
  if (a.flags & kSampleMinP) {
    const float p = a.min_p_arr ? a.min_p_arr[row] : a.min_p;
    min_p = p != p ? 0.0f : fminf(fmaxf(p, 0.0f), 1.0f);
  }
  RowValues<LOGITS> rv{0.0f, 1.0f};
  if (LOGITS) {
    const float temp = a.temperature_arr ? a.temperature_arr[row] : a.temperature;
    rv = logit_values<LOGITS, VEC>(x, n, temp, sm);
  }
  const RowRng rng = row_rng(a.state, row);
  const float t_min = k < n ? kth_largest<LOGITS, VEC>(x, n, k, rv, sm) : -FI_INF;
  // The allowed set is {v >= v_min, w >= w_min, w > 0}: load passes find the bounds, one race.
  float v_min = t_min, w_min = 0.0f;
  if (min_p > 0.0f) {
    // The largest weight W (in the top-k set too: it keeps the largest). From logits it is
    // exp(0) = 1 (or no weight is positive, and nothing races); probabilities need a pass.
    float top = 1.0f;
    if (!LOGITS) {
      float m = 0.0f;
      scan_row<VEC>(x, n, [&](unsigned, const Pack<float, VEC>& p) {
#pragma unroll
        for (unsigned e = 0; e < VEC; ++e) m = fmaxf(m, rv.value(p.x[e]));
      });
      top = block_max(m, sm);
    }
    w_min = min_p * top;
  }
  // Top-p and min-p are exclusive (the host refuses both): w_min is 0 here. After top-k the base
  // set is small and top_p_race's races are cheap (b128 top-k 50 + top-p from logits: 0.154 ms,
  // against 0.194 by the radix select); over a whole row they run Philox for every token, twice,
  // and the radix select's loads win (top-p from probabilities: 0.149 ms against 0.220).
  if (top_p < 1.0f && k < n) {
    const unsigned long long best = top_p_race<LOGITS, VEC>(x, n, rv, v_min, top_p, rng, sm);
    if (threadIdx.x == 0) a.out[row] = static_cast<int>(best ? race_token(best) : 0u);
    return;
  }
  // From probabilities only: from logits the weights cost an exp per token in every pass, and
  // the proposals' code in the logits kernel took its cold NVRTC compile past 3 s.
  if (!LOGITS && top_p < 1.0f && min_p == 0.0f &&
      (n + kWarpSize * VEC - 1) / (kWarpSize * VEC) <= kIcdfEntries) {
    const unsigned t = top_p_icdf<LOGITS, VEC>(x, n, rv, top_p, rng, sm);
    if (threadIdx.x == 0) a.out[row] = static_cast<int>(t);
    return;
  }
  if (top_p < 1.0f) {
    v_min = fmaxf(v_min, radix_select<LOGITS, VEC, true>(x, n, 0, top_p, t_min, rv, sm));
  }
  const unsigned long long best = race_allowed<LOGITS, VEC>(x, n, rv, v_min, w_min, rng, sm);
  const unsigned j = best ? race_token(best) : 0u;
  if (threadIdx.x == 0) a.out[row] = static_cast<int>(j);
}

// ---- Row transforms: softmax with temperature, top-k / top-p renormalisation, top-k masking ----

struct RowTransformArgs {
  const float* x;                // [batch, row_stride]
  float* out;                    // [batch, row_stride]; may be x (each element is read, then written)
  const int* top_k_arr;          // [batch] or null
  const float* top_p_arr;        // [batch] or null
  const float* temperature_arr;  // [batch] or null
  unsigned long long row_stride;
  unsigned batch, vocab;
  int top_k;
  float top_p, temperature;
  unsigned pad;
};
static_assert(sizeof(RowTransformArgs) == 6 * 8 + 6 * 4, "RowTransformArgs must match sampling.rs");

constexpr unsigned kSoftmax = 0, kTopKRenorm = 1, kTopPRenorm = 2, kTopKMask = 3;

// out = f(x) for every element, read before written (so out may be x).
template <unsigned VEC, class F>
__device__ __forceinline__ void map_row(const float* x, float* out, unsigned n, F f) {
  for (unsigned i = threadIdx.x * VEC; i < n; i += kSamplingThreads * VEC) {
    Pack<float, VEC> p = *reinterpret_cast<const Pack<float, VEC>*>(x + i);
#pragma unroll
    for (unsigned e = 0; e < VEC; ++e) p.x[e] = f(p.x[e]);
    *reinterpret_cast<Pack<float, VEC>*>(out + i) = p;
  }
}

// Softmax: logits canonical as for sampling (NaN and +-inf count as -inf; a row without a finite
// logit becomes zeros). Top-k / top-p renormalisation of probabilities: the kept weights over
// their sum, 0 elsewhere (a row without positive weight becomes zeros). Top-k masking: logits
// below the k-th largest become -inf (ties kept); NaN and +-inf become -inf.
template <unsigned OP, unsigned VEC>
__device__ __forceinline__ void transform_row(const RowTransformArgs& a, unsigned row) {
  __shared__ SamplingSmem sm;
  const unsigned n = a.vocab;
  const float* x = a.x + row * a.row_stride;
  float* out = a.out + row * a.row_stride;
  constexpr bool kLogits = OP == kSoftmax || OP == kTopKMask;
  RowValues<kLogits> rv{0.0f, 1.0f};
  if constexpr (OP == kSoftmax) {
    const float temp = a.temperature_arr ? a.temperature_arr[row] : a.temperature;
    rv = logit_values<kLogits, VEC>(x, n, temp, sm);
    float z = 0.0f;
    if (rv.m > -FI_INF) {
      scan_row<VEC>(x, n, [&](unsigned, const Pack<float, VEC>& p) {
#pragma unroll
        for (unsigned e = 0; e < VEC; ++e) z += rv.weight(rv.value(p.x[e]));
      });
    }
    z = block_sum(z, sm);
    const float inv_z = z > 0.0f ? 1.0f / z : 0.0f;
    map_row<VEC>(x, out, n, [&](float v) { return rv.weight(rv.value(v)) * inv_z; });
  } else if constexpr (OP == kTopKMask) {
    const int kk = a.top_k_arr ? a.top_k_arr[row] : a.top_k;
    const unsigned k = kk < 1 ? 1u : (static_cast<unsigned>(kk) > n ? n : static_cast<unsigned>(kk));
    const float t = k < n ? kth_largest<true, VEC>(x, n, k, rv, sm) : -FI_INF;
    map_row<VEC>(x, out, n, [&](float v) {
      const float c = rv.value(v);
      return c >= t ? c : -FI_INF;
    });
  } else {
    float t = 0.0f;
    if constexpr (OP == kTopKRenorm) {
      const int kk = a.top_k_arr ? a.top_k_arr[row] : a.top_k;
      const unsigned k = kk < 1 ? 1u : (static_cast<unsigned>(kk) > n ? n : static_cast<unsigned>(kk));
      if (k < n) t = kth_largest<false, VEC>(x, n, k, rv, sm);
    } else {
      const float pp = a.top_p_arr ? a.top_p_arr[row] : a.top_p;
      const float p = pp != pp ? 1.0f : fminf(fmaxf(pp, 0.0f), 1.0f);
      if (p < 1.0f) t = radix_select<false, VEC, true>(x, n, 0, p, -FI_INF, rv, sm);
    }
    float kept = 0.0f;
    scan_row<VEC>(x, n, [&](unsigned, const Pack<float, VEC>& q) {
#pragma unroll
      for (unsigned e = 0; e < VEC; ++e) {
        const float v = rv.value(q.x[e]);
        if (v >= t) kept += v;
      }
    });
    kept = block_sum(kept, sm);
    const float inv = kept > 0.0f ? 1.0f / kept : 0.0f;
    map_row<VEC>(x, out, n, [&](float v) {
      const float c = rv.value(v);
      return c >= t ? c * inv : 0.0f;
    });
  }
}

// ---- Chain speculative sampling ----

struct SpeculativeArgs {
  const float* draft_probs;         // [batch, n, vocab]
  const int* draft_ids;             // [batch, n]
  const float* target_probs;        // [batch, n + 1, vocab]
  int* out;                         // [batch, n + 1], -1 after the emitted token
  int* accepted;                    // [batch]: draft tokens accepted
  int* emitted;                     // [batch]: tokens written (accepted + 1)
  const unsigned long long* state;  // {seed, offset}
  unsigned batch, n, vocab, pad;
};
static_assert(sizeof(SpeculativeArgs) == 7 * 8 + 4 * 4, "SpeculativeArgs must match sampling.rs");

// Draft token i (in order) is accepted when u_i p_draft < p_target (probability min(1, pt/pd)),
// u_i the row's scalar draw i; an id outside the vocabulary is rejected. At the first rejection
// the emitted token is drawn from max(0, p_target - p_draft) of that position (from p_target
// when that has no mass); with all accepted, the bonus token from p_target of position n.
// Probabilities canonical as for sampling. Warp 0 runs the tests, a lane each; the block then
// races over one row (two when the residual is needed).
template <unsigned VEC>
__device__ __forceinline__ void chain_speculative(const SpeculativeArgs& a, unsigned row) {
  __shared__ SamplingSmem sm;
  const unsigned n = a.n, V = a.vocab;
  const RowRng rng = row_rng(a.state, row);
  const unsigned long long vocab = V;
  const float* draft = a.draft_probs + static_cast<unsigned long long>(row) * n * vocab;
  const float* target = a.target_probs + static_cast<unsigned long long>(row) * (n + 1) * vocab;
  int* out = a.out + static_cast<unsigned long long>(row) * (n + 1);
  const RowValues<false> rv{0.0f, 1.0f};
  if (warp_id() == 0) {
    // Lane l tests draft token base + l (the tests are independent; only the first failure
    // counts), so the block waits for one round of dependent loads, not n.
    unsigned acc = n;
    for (unsigned base = 0; base < n; base += kWarpSize) {
      const unsigned i = base + lane_id();
      bool pass = false;
      int d = 0;
      if (i < n) {
        d = a.draft_ids[static_cast<unsigned long long>(row) * n + i];
        if (d >= 0 && static_cast<unsigned>(d) < V) {
          const float pd = rv.value(draft[i * vocab + d]);
          const float pt = rv.value(target[i * vocab + d]);
          const float u =
              philox_uniform(philox_word(rng.group(kPhiloxScalarGroups + (i >> 2)), i & 3));
          pass = u * pd < pt;
        }
      }
      const unsigned fail = __ballot_sync(kFullMask, i < n && !pass);
      const unsigned first = fail ? base + __ffs(fail) - 1 : n;
      if (i < first && i < n) out[i] = d;
      if (fail) {
        acc = first;
        break;
      }
    }
    if (lane_id() == 0) sm.pick[0] = acc;
  }
  __syncthreads();
  const unsigned acc = sm.pick[0];
  const float* t_row = target + acc * vocab;
  const float* d_row = acc < n ? draft + acc * vocab : nullptr;
  unsigned long long best = 0;
  for (unsigned pass = d_row ? 0 : 1; pass < 2 && best == 0; ++pass) {
    unsigned long long b = 0;
    scan_rows<VEC>(t_row, pass == 0 ? d_row : nullptr, V,
                   [&](unsigned i, const Pack<float, VEC>& pt, const Pack<float, VEC>& pd) {
                     Philox4 r;
                     bool have = false;
#pragma unroll
                     for (unsigned e = 0; e < VEC; ++e) {
                       const float w = rv.value(pt.x[e]) - rv.value(pd.x[e]);
                       if (!(w > 0.0f)) continue;
                       const unsigned t = i + e;
                       if (!have) {
                         r = rng.group(t >> 2);
                         have = true;
                       }
                       race_enter(b, w, philox_word(r, t & 3), t);
                     }
                   });
    best = block_max_u64(b, sm);
  }
  if (threadIdx.x == 0) {
    out[acc] = best ? static_cast<int>(race_token(best)) : 0;
    for (unsigned i = acc + 1; i <= n; ++i) out[i] = -1;
    a.accepted[row] = static_cast<int>(acc);
    a.emitted[row] = static_cast<int>(acc + 1);
  }
}

}  // namespace fi
