// Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC 2011): a
// counter-based generator, so any thread draws the numbers of any (counter, key) without state.
// Mirrored bit for bit by runtime/src/ops/sampling/rng.rs (tested on the Random123 known answers).
#pragma once

namespace fi {

struct Philox4 {
  unsigned x[4];
};

// Ten rounds; the key is bumped by the Weyl constants between rounds (before rounds 1..9).
__device__ __forceinline__ Philox4 philox4x32_10(unsigned c0, unsigned c1, unsigned c2,
                                                 unsigned c3, unsigned k0, unsigned k1) {
#pragma unroll
  for (int r = 0; r < 10; ++r) {
    if (r > 0) {
      k0 += 0x9E3779B9u;
      k1 += 0xBB67AE85u;
    }
    const unsigned lo0 = 0xD2511F53u * c0, hi0 = __umulhi(0xD2511F53u, c0);
    const unsigned lo1 = 0xCD9E8D57u * c2, hi1 = __umulhi(0xCD9E8D57u, c2);
    c0 = hi1 ^ c1 ^ k0;
    c1 = lo1;
    c2 = hi0 ^ c3 ^ k1;
    c3 = lo0;
  }
  return Philox4{{c0, c1, c2, c3}};
}

// One 32-bit word to a uniform in the open interval (0, 1): (2 m + 1) 2^-24 for the top 23 bits m,
// exact in f32, so the logarithm never sees 0 or 1 and the host computes the same value.
__device__ __forceinline__ float philox_uniform(unsigned bits) {
  return static_cast<float>((bits >> 9) * 2u + 1u) * 5.9604644775390625e-8f;
}

// The draws of one call for one row: counter (group, row, offset lo, offset hi), key = the seed.
// Token t of a row uses word t % 4 of group t / 4; groups from kPhiloxScalarGroups on are
// per-row scalar draws (speculative sampling's acceptance tests), apart from every token's.
constexpr unsigned kPhiloxScalarGroups = 0xC0000000u;

struct RowRng {
  unsigned row, off_lo, off_hi, key_lo, key_hi;
  __device__ __forceinline__ Philox4 group(unsigned g) const {
    return philox4x32_10(g, row, off_lo, off_hi, key_lo, key_hi);
  }
};

// state = {seed, offset} in device memory, read by every block of the launch.
__device__ __forceinline__ RowRng row_rng(const unsigned long long* state, unsigned row) {
  const unsigned long long seed = state[0], offset = state[1];
  return RowRng{row, static_cast<unsigned>(offset), static_cast<unsigned>(offset >> 32),
                static_cast<unsigned>(seed), static_cast<unsigned>(seed >> 32)};
}

// The one-thread kernel launched after each draw: a later launch (or a replayed CUDA graph) reads
// the advanced offset, while the blocks of the draw itself all read the same one.
struct SamplingAdvanceArgs {
  unsigned long long* state;  // {seed, offset}
  unsigned long long add;
};
static_assert(sizeof(SamplingAdvanceArgs) == 2 * 8, "SamplingAdvanceArgs must match sampling.rs");

}  // namespace fi
