// Sampling token ids from probabilities or logits without sorting the vocabulary; one block per row.
//
// The draw is an exponential race: token t with weight w_t > 0 gets E_t = -log(u_t) from Philox and
// the key w_t / E_t; the largest key wins, with probability w_t / sum(w) (E_t / w_t are independent
// exponentials of rate w_t). The keys are fixed per (call, row, token), so the winner within any
// subset is the race restricted to that subset: filters cost passes over the row, never fresh
// randomness, and a draw does not depend on how the row is split among threads.
//  - top-k: the k-th largest value t by a three-pass radix select over order-preserving keys of the
//    values (11 + 11 + 10 bits, a shared histogram); the set is {v >= t} (ties at t are kept).
//  - min-p: one pass for the race and the largest weight W; if the winner has w < min_p W, a second
//    pass races again within {w >= min_p W}.
//  - top-p (after top-k): rejection with pivots. The set is upward closed (t is in it iff the mass
//    strictly above w_t is < p times the mass S), so if the race winner j of {w > pivot} is not in
//    it, nothing with w <= w_j is either: the next pivot is w_j. One pass per round tests j (mass
//    above w_j) and races within {w > L} for w_j and three higher bounds L at once (bracket_pass),
//    so the pass that rejects j usually proves the next candidate in the set as well. At most
//    kSamplingMaxRounds rounds (never reached in practice); past them the largest weight, always
//    in the set, is returned.
//  The race passes after the first run from the end of the row (scan_row_backward): L2 holds it.
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
constexpr unsigned kSamplingMaxRounds = 64;
constexpr unsigned kSamplingLoads = 4;  // packs in flight per thread in a pass over a row
constexpr unsigned kSampleTopK = 1u, kSampleTopP = 2u, kSampleMinP = 4u;
constexpr unsigned kRadixBins = 2048;

struct SamplingSmem {
  unsigned hist[kRadixBins];
  float mass[kRadixBins];  // radix select by mass (top-p renormalisation)
  float f[kSamplingWarps];
  unsigned long long u[kSamplingWarps];
  unsigned pick[2];
  float pick_mass;
  unsigned long long bracket_win[4];  // bracket_pass results (kBracket)
  float bracket_mass[4];
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
// Since -log(u) >= 1 - u, the key w / -log(u) is at most w / (1 - u): when even that cannot beat
// the thread's best key the logarithm is skipped (the thread visits tokens in increasing order, so
// its best has the lower token and wins a tie; the margin covers the rounding of logf and the
// products). The winner is exactly the one of computing every key.
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

// Race over the tokens of the row with value >= t_min and weight w > w_gt, w >= w_ge (and w > 0);
// also sums their weights and finds the largest (as a race entry of the weight). One instance
// serves every pass, which keeps registers and compile time down.
template <bool LOGITS, unsigned VEC>
__device__ __noinline__ void race_pass(const float* x, unsigned n, const RowValues<LOGITS> rv,
                                       float t_min, const RowRng rng, float w_gt, float w_ge,
                                       unsigned long long& best, float& sum,
                                       unsigned long long& top, SamplingSmem& sm) {
  unsigned long long b = 0, tp = 0;
  float s = 0.0f;
  scan_row<VEC>(x, n, [&](unsigned t0, const Pack<float, VEC>& p) {
    // VEC divides 4 and t0 is a multiple of VEC, so a pack lies in one Philox group.
    Philox4 r;
    bool have = false;
#pragma unroll
    for (unsigned e = 0; e < VEC; ++e) {
      const float v = rv.value(p.x[e]);
      if (!(v >= t_min)) continue;
      const float w = rv.weight(v);
      if (!(w > w_gt && w >= w_ge && w > 0.0f)) continue;
      const unsigned t = t0 + e;
      s += w;
      tp = max_u64(tp, race_entry(w, t));
      if (!have) {
        r = rng.group(t >> 2);
        have = true;
      }
      race_enter(b, w, philox_word(r, t & 3), t);
    }
  });
  best = block_max_u64(b, sm);
  top = block_max_u64(tp, sm);
  sum = block_sum(s, sm);
}

// Top-p with brackets: the race winner of any {w > L} with L below the set (mass(w > L) >= target)
// is the draw when it lies in the set, and a token j is in it when some L' <= w_j has
// mass(w > L') < target. One pass races within, and sums the mass above, kBracket nested lower
// bounds at once: the candidate's weight (the pivot test) and thresholds spaced geometrically up to
// a weight known to have less than the target above it. So a pass that rejects the candidate
// usually also proves the next one in the set, and the slowest row of a batch needs a pass or two
// more than its first race, where one pivot per pass needs several.
constexpr unsigned kBracket = 4;
struct Bracket {
  float l[kBracket];  // increasing
};

template <bool LOGITS, unsigned VEC>
__device__ __noinline__ void bracket_pass(const float* x, unsigned n, const RowValues<LOGITS> rv,
                                          float t_min, const RowRng rng, const Bracket br,
                                          bool race, SamplingSmem& sm) {
  unsigned long long b[kBracket];
  float s[kBracket];
#pragma unroll
  for (unsigned k = 0; k < kBracket; ++k) {
    b[k] = 0;
    s[k] = 0.0f;
  }
  scan_row_backward<VEC>(x, n, [&](unsigned t0, const Pack<float, VEC>& p) {
    Philox4 r;
    bool have = false;
#pragma unroll
    for (unsigned e = 0; e < VEC; ++e) {
      const float v = rv.value(p.x[e]);
      if (!(v >= t_min)) continue;
      const float w = rv.weight(v);
      if (!(w > br.l[0] && w > 0.0f)) continue;
      // The sets holding the token are 0..k; the last has the smallest best, so when the token
      // cannot beat that one it beats none (race_enter's bound, whose margin never skips a key
      // equal to the best: the entries break ties by token in either scan direction).
      unsigned long long least = b[0];
#pragma unroll
      for (unsigned k = 0; k < kBracket; ++k) {
        if (w > br.l[k]) {
          s[k] += w;
          least = b[k];
        }
      }
      if (!race) continue;  // masses only: no Philox
      const unsigned t = t0 + e;
      if (!have) {
        r = rng.group(t >> 2);
        have = true;
      }
      const float u = philox_uniform(philox_word(r, t & 3));
      const float kbest = __uint_as_float(static_cast<unsigned>(least >> 32));
      if (w * 1.000001f <= kbest * (1.0f - u)) continue;
      const unsigned long long entry = race_entry(w / -logf(u), t);
#pragma unroll
      for (unsigned k = 0; k < kBracket; ++k) {
        if (w > br.l[k]) b[k] = max_u64(b[k], entry);
      }
    }
  });
#pragma unroll
  for (unsigned k = 0; k < kBracket; ++k) {
    const unsigned long long bk = block_max_u64(b[k], sm);
    const float sk = block_sum(s[k], sm);
    if (threadIdx.x == 0) {
      sm.bracket_win[k] = bk;
      sm.bracket_mass[k] = sk;
    }
  }
  __syncthreads();
}

// A radix select over order-preserving keys of the canonical values (11 + 11 + 10 bits, shared
// histograms), three passes over the row.
//  - by count (MASS false): the k-th largest value t (1 <= k <= n): count(v > t) < k <= count(v >= t).
//  - by mass (MASS true): the value t with mass(v > t) < target <= mass(v >= t), mass being the sum
//    of weights; the largest value when target <= 0, the smallest when target exceeds the mass.
//    The histogram sums are float atomics, so t can differ run to run where the mass above a value
//    is within rounding of target.
template <bool LOGITS, unsigned VEC, bool MASS>
__device__ float radix_select(const float* x, unsigned n, unsigned k, float target,
                              const RowValues<LOGITS>& rv, SamplingSmem& sm) {
  unsigned prefix = 0, mask = 0, remaining = k;
  float want = target;
  for (unsigned pass = 0; pass < 3; ++pass) {
    const unsigned shift = pass == 0 ? 21 : pass == 1 ? 10 : 0;
    const unsigned bins = pass == 2 ? 1024 : 2048;
    for (unsigned b = threadIdx.x; b < kRadixBins; b += kSamplingThreads) {
      sm.hist[b] = 0;
      if (MASS) sm.mass[b] = 0.0f;
    }
    __syncthreads();
    scan_row<VEC>(x, n, [&](unsigned, const Pack<float, VEC>& p) {
#pragma unroll
      for (unsigned e = 0; e < VEC; ++e) {
        const float v = rv.value(p.x[e]);
        const unsigned key = order_key(v);
        if ((key & mask) == prefix) {
          const unsigned b = (key >> shift) & (bins - 1);
          atomicAdd(&sm.hist[b], 1u);
          if (MASS) atomicAdd(&sm.mass[b], rv.weight(v));
        }
      }
    });
    __syncthreads();
    if (warp_id() == 0) {
      // Each lane owns bins/32 consecutive bins; a suffix scan over lanes finds the lane whose
      // bins hold the crossing, and that lane walks its bins from the top.
      const unsigned per = bins / kWarpSize, lo = lane_id() * per;
      unsigned c = 0;
      float m = 0.0f;
      for (unsigned b = 0; b < per; ++b) {
        c += sm.hist[lo + b];
        if (MASS) m += sm.mass[lo + b];
      }
      unsigned s = c;
      float ms = m;
      for (unsigned o = 1; o < kWarpSize; o *= 2) {
        const unsigned up = __shfl_down_sync(kFullMask, s, o);
        const float upm = __shfl_down_sync(kFullMask, ms, o);
        if (lane_id() + o < kWarpSize) {
          s += up;
          ms += upm;
        }
      }
      if (!MASS) {
        unsigned acc = s - c;
        if (acc < remaining && remaining <= s) {
          for (unsigned b = lo + per; b-- > lo;) {
            const unsigned h = sm.hist[b];
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
        const float above = ms - m;
        const bool here = c > 0 && (want <= 0.0f || (above < want && want <= ms));
        const unsigned holders = __ballot_sync(kFullMask, here);
        const unsigned nonempty = __ballot_sync(kFullMask, c > 0);
        if (holders != 0 && lane_id() == 31u - __clz(holders)) {
          float acc = above;
          unsigned last = lo;
          float last_acc = acc;
          bool found = false;
          for (unsigned b = lo + per; b-- > lo;) {
            if (sm.hist[b] == 0) continue;
            if (want <= 0.0f || acc + sm.mass[b] >= want) {
              sm.pick[0] = b;
              sm.pick_mass = want - acc;
              found = true;
              break;
            }
            last = b;
            last_acc = acc;
            acc += sm.mass[b];
          }
          if (!found) {  // the walk's sums rounded below the lane's: its lowest nonempty bin
            sm.pick[0] = last;
            sm.pick_mass = want - last_acc;
          }
        } else if (holders == 0 && lane_id() == __ffs(nonempty) - 1) {
          for (unsigned q = lo; q < lo + per; ++q) {
            if (sm.hist[q] > 0) {
              sm.pick[0] = q;
              sm.pick_mass = FI_INF;
              break;
            }
          }
        }
      }
    }
    __syncthreads();
    prefix |= sm.pick[0] << shift;
    if (MASS) want = sm.pick_mass;
    else remaining = sm.pick[1];
    mask |= (bins - 1) << shift;
  }
  return order_value(prefix);
}

template <bool LOGITS, unsigned VEC>
__device__ __forceinline__ float kth_largest(const float* x, unsigned n, unsigned k,
                                             const RowValues<LOGITS>& rv, SamplingSmem& sm) {
  return radix_select<LOGITS, VEC, false>(x, n, k, 0.0f, rv, sm);
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
    rv.inv_t = (temp > 0.0f && temp < FI_INF) ? fminf(1.0f / temp, 3.4028234e38f) : 1.0f;
    float m = -FI_INF;
    scan_row<VEC>(x, n, [&](unsigned, const Pack<float, VEC>& p) {
#pragma unroll
      for (unsigned e = 0; e < VEC; ++e) m = fmaxf(m, rv.value(p.x[e]));
    });
    rv.m = block_max(m, sm);
  }
  const RowRng rng = row_rng(a.state, row);
  const float t_min = k < n ? kth_largest<LOGITS, VEC>(x, n, k, rv, sm) : -FI_INF;

  unsigned long long best, top;
  float mass;
  race_pass<LOGITS, VEC>(x, n, rv, t_min, rng, 0.0f, 0.0f, best, mass, top, sm);
  unsigned j = best ? race_token(best) : 0u;
  if (best && min_p > 0.0f) {
    const float thr = min_p * __uint_as_float(static_cast<unsigned>(top >> 32));
    if (!(rv.weight(rv.value(x[j])) >= thr)) {
      // {w >= thr} is {w > the float below thr}; the other bounds are empty.
      Bracket br;
      br.l[0] = nextafterf(thr, 0.0f);
#pragma unroll
      for (unsigned k = 1; k < kBracket; ++k) br.l[k] = FI_INF;
      bracket_pass<LOGITS, VEC>(x, n, rv, t_min, rng, br, true, sm);
      j = race_token(sm.bracket_win[0]);  // the token of weight W is always in: a winner exists
    }
  }
  if (best && top_p < 1.0f) {
    const float target = top_p * mass;
    // Invariant: j wins the race within {w > some L below the set}; hi is a weight with less than
    // the target above it (the largest weight has none).
    float hi = __uint_as_float(static_cast<unsigned>(top >> 32));
    unsigned round = 0;
    for (; round < kSamplingMaxRounds; ++round) {
      const float wj = rv.weight(rv.value(x[j]));
      Bracket br;
      br.l[0] = wj;
      const float ratio = hi / wj;  // wj <= hi, both positive
#pragma unroll
      for (unsigned k = 1; k < kBracket; ++k) {
        br.l[k] = fmaxf(wj * powf(ratio, static_cast<float>(k) / kBracket), br.l[k - 1]);
      }
      bracket_pass<LOGITS, VEC>(x, n, rv, t_min, rng, br, false, sm);  // masses only
      const float above = sm.bracket_mass[0];
      if (above <= 0.0f || above < target) break;  // j is in the set (most rows, first round)
      // j is out. The last bound with at least the target above it (bound 0 at least) races the
      // next candidate; the bound after it (or hi) has less above it.
      unsigned k = 0;
#pragma unroll
      for (unsigned q = 1; q < kBracket; ++q) {
        if (sm.bracket_mass[q] > 0.0f && sm.bracket_mass[q] >= target) k = q;
      }
      Bracket rb;
      rb.l[0] = br.l[k];
#pragma unroll
      for (unsigned q = 1; q < kBracket; ++q) rb.l[q] = FI_INF;
      if (k + 1 < kBracket) hi = br.l[k + 1];
      __syncthreads();  // every thread has read the masses before the race pass writes its own
      bracket_pass<LOGITS, VEC>(x, n, rv, t_min, rng, rb, true, sm);
      const unsigned long long nb = sm.bracket_win[0];
      if (nb == 0) break;  // nothing above (a rounding corner): keep j, as one pivot per pass does
      j = race_token(nb);
      const float wc = rv.weight(rv.value(x[j]));
      if (wc >= hi) break;  // at least hi: less than the target above it, in the set
      __syncthreads();      // every thread has read the race result before the next pass
    }
    if (round == kSamplingMaxRounds) j = race_token(top);
  }
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
    rv.inv_t = (temp > 0.0f && temp < FI_INF) ? fminf(1.0f / temp, 3.4028234e38f) : 1.0f;
    float m = -FI_INF;
    scan_row<VEC>(x, n, [&](unsigned, const Pack<float, VEC>& p) {
#pragma unroll
      for (unsigned e = 0; e < VEC; ++e) m = fmaxf(m, rv.value(p.x[e]));
    });
    rv.m = block_max(m, sm);
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
      if (p < 1.0f) {
        float total = 0.0f;
        scan_row<VEC>(x, n, [&](unsigned, const Pack<float, VEC>& q) {
#pragma unroll
          for (unsigned e = 0; e < VEC; ++e) total += rv.value(q.x[e]);
        });
        total = block_sum(total, sm);
        t = radix_select<false, VEC, true>(x, n, 0, p * total, rv, sm);
      }
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
