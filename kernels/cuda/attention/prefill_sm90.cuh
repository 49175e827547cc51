// Prefill and append, FlashAttention-3 style for sm_90a: the same work items, arguments and
// results as attention/prefill.cuh (the plan's 128-row tiles), computed by warpgroup MMAs.
// Persistent: a CTA takes one item of each round of gridDim.x of the plan's list (longest first),
// so the next item's Q and K/V load during this item's last tiles.
// Three warpgroups a CTA: a producer that copies each item's Q (into Q slots; by TMA where the
// launch has a Q map) and its K/V tiles into stages (by TMA inside a request, else cp.async
// through the page table, K and V rows in one loop; K and V each have their own empty mbarrier,
// freed after S and after P V), and two consumers of 64 query rows each. A consumer
// computes S = Q K^T with both operands in shared memory, the online softmax on S's
// accumulators, and O += P V with P from registers (S's accumulator layout is the A operand's),
// then frees the stage. Head dims 64, 128 and 256: the tile sizes per head dim are in
// PrefillSm90Shape, the MMA shapes in sm90_qk / sm90_pv; the loops are the same. The two
// consumers take turns issuing their MMAs (named barriers), so one's softmax runs under the
// other's MMAs. The producer gives registers to the consumers (setmaxnreg). Query and key hooks
// rewrite the tiles in shared memory once they land: each consumer its Q rows once an item, both
// consumers half of each K tile (in order: sm90_hook_rows).
// Launch: grid min(num_items, num_sms), block kThreads, dynamic shared kSmemBytes
// (kernels/src/attention/prefill.rs mirrors these).
#pragma once
#include "core/abi.cuh"
#include "core/dtype.cuh"
#include "core/grid_order.cuh"
#include "core/math.cuh"
#include "core/warp.cuh"
#include "sm80/cp_async.cuh"
#include "sm80/mma.cuh"
#include "sm80/smem.cuh"
#include "sm90/barrier.cuh"
#include "sm90/tma.cuh"
#include "sm90/warpgroup.cuh"
#include "sm90/wgmma.cuh"
#include "variant/hooks.cuh"
#include "attention/causal.cuh"
#include "attention/epilogue.cuh"
#include "attention/kv.cuh"
#include "attention/work.cuh"

namespace fi {

// The FA3 entry's third parameter (kernels/src/abi.rs: Sm90Maps): tensor maps of K and V, a ragged
// cache as [rows, kv heads, head dim] with boxes of 64 columns x 1 head x kTileKv rows, a paged
// one as [pages, page slots, kv heads, head dim] with boxes of 64 x 1 x rows_per_copy x 1 page;
// the 128-byte swizzle, so one TMA copy writes (part of) one column block of a tile in the
// layout wgmma reads. `tma` 0 (strides or page sizes TMA cannot take): every tile goes through
// cp.async. Q's map is [query rows, qo heads, head dim] with boxes of 64 columns x group heads x
// kTileQ / group rows: a box lands as the tile's packed rows (row r: query row r / group, head
// r % group), one column block a copy; `q_tma` 0 (a group that does not divide kTileQ, strides
// TMA cannot take): Q goes through cp.async. Passed as a __grid_constant__ parameter: TMA reads
// the maps in place.
struct Sm90Maps {
  TensorMap k, v, q;
  unsigned tma;
  unsigned rows_per_copy;  // a paged cache's rows a copy: min(page size, kTileKv)
  unsigned q_tma;
};
static_assert(sizeof(Sm90Maps) == 448, "Sm90Maps as kernels/src/abi.rs lays it out");

// The FA3 template's shape at head dim D with K/V tiles of KV keys. A consumer holds O (D / 2
// floats a thread), S (KV / 2) and P (KV / 4) in its registers: at head dim 256, O is 128 floats,
// so the K/V tile is 64 keys (S 32, P 16). Shared memory (227 KiB an SM): at 64, two Q slots and
// three stages of 128-key K and V (128 KiB); at 128, one Q slot and three stages (224 KiB), or
// for long prompts two stages of 176 keys (208 KiB: FlashAttention-3's tile, fewer softmax
// turns a key); at 256 the Q tile alone is 64 KiB, so one Q slot and two stages of 64-key K and
// V (32 KiB each): 192 KiB. kernels/src/attention/prefill.rs picks KV (sm90_kv_tile).
template <int D, int KV>
struct PrefillSm90Shape {
  static_assert(D == 64 || D == 128 || D == 256,
                "the sm90 prefill template is built for head dims 64, 128 and 256");
  static_assert((D == 256 && KV == 64) || (D == 128 && (KV == 128 || KV == 176)) ||
                    (D == 64 && KV == 128),
                "K/V tiles: 128 keys at head dim 64, 128 or 176 at 128, 64 at 256");
  static constexpr int kTileQ = 128;  // two consumer warpgroups of 64 rows
  static constexpr int kTileKv = KV;
  // Three stages where they fit beside one Q tile (long rows gain more from the deeper K/V
  // pipeline than from a second Q slot: kernels/notes/fa3.md, v9 and v10). With two Q slots
  // (head dim 64) the next item's Q lands while this item's is read; with one it waits for both
  // consumers to finish this item's S.
  static constexpr int kStages = KV == 128 ? 3 : 2;
  static constexpr int kQSlots = D == 64 ? 2 : 1;
  static constexpr int kThreads = 3 * kWarpgroupThreads;
  // A row of a tile is D elements; a tile is stored as D / 64 column blocks of 64 elements (128
  // bytes a row), each block rows x 128 bytes with the 128-byte swizzle: the 16-byte unit u of
  // row r sits at unit u ^ (r % 8). That is the layout wgmma's descriptors read (swizzle mode 1).
  static constexpr int kQBytes = kTileQ * D * 2;
  static constexpr int kKvBytes = kTileKv * D * 2;
  static constexpr int kKAt = kQSlots * kQBytes;
  static constexpr int kVAt = kKAt + kStages * kKvBytes;
  // Key byte offsets of the tile being issued, two slots (this tile's and the next's) so no
  // barrier separates one tile's readers from the next tile's writers.
  static constexpr int kOffsetSlots = 2;
  static constexpr int kOffsetsAt = kVAt + kStages * kKvBytes;  // [kOffsetSlots][kTileKv] u64
  static constexpr int kBarriersAt = kOffsetsAt + kOffsetSlots * kTileKv * 8;
  // Per Q slot full and empty, then per stage K full, V full, K empty and V empty.
  static constexpr int kBarriers = 2 * kQSlots + 4 * kStages;
  // The items the producer hands out (prefill_sm90's Item, at most kItemBytes each), two slots
  // more than Q slots: the producer writes item n's slot before it waits for item n's Q slot,
  // which is safe once the consumers are past item n - kItemSlots + 1's last S (the wait of the
  // producer's previous item); and the consumers read item n in place (no registers) to its end,
  // since the slot is rewritten only after they are past item n + 1's last S.
  static constexpr int kItemBytes = 128;
  static constexpr int kItemSlots = kQSlots + 2;
  static constexpr int kItemsAt = kBarriersAt + kBarriers * 8;
  static constexpr int kSmemBytes = kItemsAt + kItemSlots * kItemBytes;
};

// Byte offset of 16-byte unit u (of D / 8) of row r in a swizzled tile of `rows` rows.
template <int D>
__device__ __forceinline__ unsigned sw128_offset(unsigned rows, unsigned r, unsigned u) {
  return (u / 8) * rows * 128 + r * 128 + (((u % 8) ^ (r % 8)) << 4);
}

// Descriptor (128-byte swizzle) of a K-major tile (Q or K) of `rows` rows from row `row`, and the
// byte step to its 16-column slice kk: slices step 32 bytes inside a 128-byte block row and one
// block (rows x 128 bytes) every four slices; 8-row groups are 1024 bytes apart.
__device__ __forceinline__ unsigned long long sm90_k_major(const unsigned char* tile,
                                                           unsigned row) {
  return wgmma_desc(tile + row * 128, 16, 1024, 1);
}
__device__ __forceinline__ constexpr unsigned sm90_k_step(unsigned rows, unsigned kk) {
  return (kk / 4) * rows * 128 + (kk % 4) * 32;
}

// S (+)= Q K^T for the 64 rows of Q from `row` (of a tile of TQ rows) against a K tile of KV
// keys: D / 16 steps of 16 dims, each one MMA as wide as the tile (m64n176k16, m64n128k16 or
// m64n64k16). The descriptors are made once and stepped by constants.
template <bool BF16, int D, int TQ, int KV>
__device__ __forceinline__ void sm90_qk(float (&s)[KV / 2], const unsigned char* q, unsigned row,
                                        const unsigned char* k) {
  static_assert(KV == 64 || KV == 128 || KV == 176, "K/V tiles of 64, 128 or 176 keys");
  const unsigned long long a0 = sm90_k_major(q, row), b0 = sm90_k_major(k, 0);
  #pragma unroll
  for (unsigned kk = 0; kk < D / 16; ++kk) {
    const unsigned long long a = wgmma_desc_at(a0, sm90_k_step(TQ, kk));
    const unsigned long long b = wgmma_desc_at(b0, sm90_k_step(KV, kk));
    // The first k-step overwrites S (no zeroing of the accumulators after the fence).
    if constexpr (KV == 176) {
      wgmma_ss_64x176x16<BF16, 0>(s, a, b, kk > 0);
    } else if constexpr (KV == 128) {
      wgmma_ss_64x128x16<BF16, 0>(s, a, b, kk > 0);
    } else {
      wgmma_ss_64x64x16<BF16, 0>(s, a, b, kk > 0);
    }
  }
}

// The descriptor of a V tile of KV keys (N-major): 64-column blocks are KV x 128 bytes apart
// (the leading offset), 8-key groups 1024 bytes.
template <int KV>
__device__ __forceinline__ unsigned long long sm90_v_desc(const unsigned char* v) {
  return wgmma_desc(v, KV * 128, 1024, 1);
}

// O += P V for keys [16 kb, 16 kb + 16) of the V tile `v` (sm90_v_desc), P (those 16 keys) from
// registers. 16 keys are two 8-row groups (2048 bytes), and an n128 MMA covers two 64-column
// blocks. Head dim 64 is one block (m64n64k16), 128 one n128 MMA, 256 two: columns 0-127
// (blocks 0-1) into O's first 64 floats, 128-255 (blocks 2-3) into the next 64
// (sm90/wgmma.cuh: wgmma_cols).
template <bool BF16, int D, int KV>
__device__ __forceinline__ void sm90_pv(float (&o)[D / 2], const unsigned (&p)[4],
                                        unsigned long long v, unsigned kb) {
  constexpr unsigned kBlock = KV * 128;
  const unsigned long long at = wgmma_desc_at(v, kb * 2048);
  if constexpr (D == 64) {
    wgmma_rs_64x64x16<BF16, 1>(o, p, at, true);
  } else {
    static_assert(D == 128 || D == 256, "head dims 64, 128 and 256");
    wgmma_rs_64x128x16<BF16, 1>(wgmma_cols<0, 64>(o), p, at, true);
    if constexpr (D == 256) {
      wgmma_rs_64x128x16<BF16, 1>(wgmma_cols<64, 64>(o), p, wgmma_desc_at(at, 2 * kBlock), true);
    }
  }
}

// The query (kQuery) or key hook in place on rows [r0, r0 + rows) of a swizzled tile of
// `tile_rows` rows, by `threads` threads from thread `tid`: element d and its rotary partner d +
// D / 2 together, as prefill.cuh applies them; `pos(r)` is row r's position. The writes go
// through the generic proxy and wgmma reads through the async one: the caller fences and then
// syncs with the tile's readers.
template <class V, class T, int D, bool kQuery, class P, class PosOf>
__device__ __forceinline__ void sm90_hook_rows(const P& p, unsigned char* tile, unsigned tile_rows,
                                               unsigned r0, unsigned rows, unsigned tid,
                                               unsigned threads, const PosOf& pos) {
  #pragma unroll 1
  for (unsigned c = tid; c < rows * (D / 2); c += threads) {
    const unsigned r = r0 + c / (D / 2), d = c % (D / 2);
    const Pos at = pos(r);
    auto elem = [&](unsigned e) {
      return reinterpret_cast<unsigned short*>(tile + sw128_offset<D>(tile_rows, r, e / 8)) + e % 8;
    };
    unsigned short* const x = elem(d);
    unsigned short* const y = elem(d + D / 2);
    const float xv = load_elem<T>(x), yv = load_elem<T>(y);
    if constexpr (kQuery) {
      store_elem<T>(x, hook_query<V>(p, xv, yv, d, at));
      store_elem<T>(y, hook_query<V>(p, yv, xv, d + D / 2, at));
    } else {
      store_elem<T>(x, hook_key<V>(p, xv, yv, d, at));
      store_elem<T>(y, hook_key<V>(p, yv, xv, d + D / 2, at));
    }
  }
}

// Producer register budget and the consumers': 128 x 40 + 256 x 232 (at head dim 256, 48 + 224)
// = the 168 x 384 a CTA of 384 threads starts with (65536 registers an SM, one CTA); setmaxnreg
// moves registers only within those. The producer holds no copy state across tiles (its arrivals
// are asynchronous); at head dim 256 its TMA path (eight copies a page) spills 4 bytes at 40,
// and the consumers' O, S and P fit 224 there. At 24, which would give the consumers 240
// (FlashAttention-3's split, whose producer is one TMA thread), this producer spills.
template <int D>
constexpr unsigned kSm90ProducerRegs = D == 256 ? 48 : 40;
template <int D>
constexpr unsigned kSm90ConsumerRegs = D == 256 ? 224 : 232;

// FI_SM90_OVERLAP: 1 (default) overlaps at head dims 64 and 128, 0 never, 2 at every head dim
// (a measurement switch); the runtime defines 0 for a variant whose overlapping build spills,
// and at head dim 128 for a launch whose K/V all go through cp.async (no TMA maps).
#ifndef FI_SM90_OVERLAP
#define FI_SM90_OVERLAP 1
#endif
// Whether the consumers overlap a tile's softmax with the previous tile's P V (FA3's
// intra-warpgroup overlap) or run S, softmax and P V in order. Measured (H200, kernels/notes/
// fa3.md): at head dim 64 the overlap gains 17% (v16); at 128, once K and V came by TMA (v18),
// 8-10% on single prompts (s8192 causal 565 vs 514 TFLOP/s), 1% ragged, -2-3% over pages of 16
// (cp.async; v16 without TMA: 0-3% slower, the producer's copies then competed for issue slots);
// at 256 (two stages, the producer's V(t + 1) waits for P V(t - 1)) 18% slower. The overlap
// keeps P(t - 1) live across the softmax, so heavy hooks spill with it (then built in order).
// A key hook keeps the loop in order: both consumers rewrite each K tile before either's S, so
// neither's softmax could hide under the other's MMAs (and the tile's rewrite, not the MMAs,
// takes the time).
template <class V, int D>
constexpr bool kSm90Overlap =
    !V::kHasKey && (FI_SM90_OVERLAP == 2 || (FI_SM90_OVERLAP == 1 && D != 256));

// FI_SM90_Q_TMA: 1 (default) copies Q by TMA where the launch has a Q map (maps.q_tma), one
// instruction a column block from one producer thread; 0 always by cp.async, 16 copies of 16
// bytes from each producer thread (an A/B switch).
#ifndef FI_SM90_Q_TMA
#define FI_SM90_Q_TMA 1
#endif

template <class V, class P, class T, int D, int KV>
__device__ void prefill_sm90(const AttnArgs& a, const P& p, const Sm90Maps& maps) {
  using Sh = PrefillSm90Shape<D, KV>;
  constexpr int kTileQ = Sh::kTileQ, kTileKv = Sh::kTileKv;
  constexpr bool kBf16 = kIsBf16<T>;

  // The CTA's n-th item: one in each round of gridDim.x items of the plan's list (longest first
  // within blocks of a few rounds, runtime/src/attention/plan.rs: PREFILL_BLOCK_ROUNDS),
  // every other round from the far end (a snake), so each CTA gets about the same work. Indices
  // only grow, and padding sits at the list's end, so the first invalid item (padding, or past
  // the padded length) ends the CTA's items. Handing items out at run time from a counter in the
  // workspace measured the same once the list was truly longest first (kernels/notes/fa3.md).
  let_next_grid_start();  // the merge pass waits for this grid's end (core/grid_order.cuh)
  const unsigned num_items = a.work == nullptr ? 0u : static_cast<unsigned>(a.work[ws_header::kPaddedLen]);
  if (blockIdx.x >= num_items) return;  // the whole CTA (an empty list still launches one)
  auto item_index = [&](unsigned n) {
    return n * gridDim.x + ((n & 1) ? gridDim.x - 1 - blockIdx.x : blockIdx.x);
  };

  extern __shared__ __attribute__((aligned(1024))) unsigned char sm90_smem[];
  unsigned long long* const key_off =
      reinterpret_cast<unsigned long long*>(sm90_smem + Sh::kOffsetsAt);
  unsigned long long* const bars = reinterpret_cast<unsigned long long*>(sm90_smem + Sh::kBarriersAt);
  auto q_full = [&](unsigned slot) { return bars + slot; };
  auto q_empty = [&](unsigned slot) { return bars + Sh::kQSlots + slot; };
  auto k_full = [&](unsigned s) { return bars + 2 * Sh::kQSlots + s; };
  auto v_full = [&](unsigned s) { return bars + 2 * Sh::kQSlots + Sh::kStages + s; };
  // K is free once S is done, V once P V is: K's stage refills a tile earlier.
  auto k_empty = [&](unsigned s) { return bars + 2 * Sh::kQSlots + 2 * Sh::kStages + s; };
  auto v_empty = [&](unsigned s) { return bars + 2 * Sh::kQSlots + 3 * Sh::kStages + s; };
  auto q_tile = [&](unsigned slot) { return sm90_smem + slot * Sh::kQBytes; };
  auto k_tile = [&](unsigned s) { return sm90_smem + Sh::kKAt + s * Sh::kKvBytes; };
  auto v_tile = [&](unsigned s) { return sm90_smem + Sh::kVAt + s * Sh::kKvBytes; };
  unsigned char* const item_slots = sm90_smem + Sh::kItemsAt;
  // K/V tiles and Q slots are counted over the CTA's items: tile g sits in stage g % kStages,
  // the n-th valid item's Q in slot n % kQSlots; a barrier's phase is its use count's parity.
  auto stage = [](unsigned g) { return g % Sh::kStages; };
  auto phase = [](unsigned g) { return (g / Sh::kStages) & 1; };

  const unsigned group = a.num_qo_heads / a.num_kv_heads;
  const bool causal = a.causal != 0;
  // One item's request, keys and causal bound, as prefill.cuh reads them.
  struct Item {
    WorkItem w;
    unsigned qo_begin, qo_len;
    KvSeq kv;
    KeyPositions kp;
    long long shift;
    ItemKeys keys;
  };
  // Written in place (a shared-memory slot), field by field.
  auto item_at = [&](Item& it, unsigned idx) {
    it.w = work_item(a.work, idx);
    if (!it.w.valid) return;
    const unsigned b = it.w.request;
    it.qo_begin = static_cast<unsigned>(a.qo_indptr[b]);
    it.qo_len = static_cast<unsigned>(a.qo_indptr[b + 1]) - it.qo_begin;
    it.kv = kv_seq(a, b);
    it.kp = key_positions(a.work, b, it.kv.len);
    it.shift = it.kp.causal_shift(it.qo_len);
    it.keys = item_keys(it.w, group, it.shift, causal, kTileKv);
  };
  static_assert(sizeof(Item) <= Sh::kItemBytes && alignof(Item) <= 8, "an Item fits its slot");
  auto item_slot = [&](unsigned slot) {
    return reinterpret_cast<Item*>(item_slots + slot * Sh::kItemBytes);
  };
  // Padding rows of a partial tile repeat the last real row (as in prefill.cuh).
  auto packed = [](const WorkItem& w, unsigned r) {
    return min(w.qo_tile_start + r, w.qo_tile_end - 1);
  };

  if (threadIdx.x == 0) {
    for (unsigned slot = 0; slot < Sh::kQSlots; ++slot) {
      mbar_init(q_full(slot), 2 * kWarpgroupThreads);  // see the producer's Q
      mbar_init(q_empty(slot), 2 * kWarpgroupThreads);
    }
    for (unsigned s = 0; s < Sh::kStages; ++s) {
      mbar_init(k_full(s), kWarpgroupThreads);
      mbar_init(v_full(s), kWarpgroupThreads);
      mbar_init(k_empty(s), 2 * kWarpgroupThreads);
      mbar_init(v_empty(s), 2 * kWarpgroupThreads);
    }
    mbar_init_fence();
  }
  __syncthreads();

  if (warpgroup_id() == 0) {
    // ---- Producer: every thread copies its share of each tile with cp.async and arrives on the
    // tile's barrier once those copies land (mbar_arrive_on_copies), without waiting for them:
    // it runs ahead until a stage is not yet free, so every free stage is in flight.
    regs_shrink<kSm90ProducerRegs<D>>();
    const unsigned pt = warpgroup_thread();
    const T* const q = static_cast<const T*>(a.q);
    const char* const k = static_cast<const char*>(a.k);
    const char* const v = static_cast<const char*>(a.v);
    // Each thread copies unit `u` of rows `r0 + kRowsPerPass it`: D / 8 lanes cover one row.
    const unsigned u = pt % (D / 8), r0 = pt / (D / 8);
    constexpr unsigned kRowsPerPass = kWarpgroupThreads / (D / 8);
    // A counted loop (at most every item and the stop): ptxas allocates an unbounded one's
    // consumers worse (ALiBi spilled 624 bytes).
    unsigned g = 0, co = 0;  // K/V tiles issued, and those of them copied by cp.async
    for (unsigned n = 0; n <= num_items; ++n) {
      const unsigned slot = n % Sh::kQSlots;
      // Thread 0 writes the CTA's n-th item (an invalid one is the stop) into its slot while
      // the Q slot may still be busy (see kItemSlots), then hands it to the producer threads
      // and, with the Q slot, to the consumers. All read it in place (40 registers hold no copy).
      Item& it = *item_slot(n % Sh::kItemSlots);
      if (pt == 0) item_at(it, item_index(n));
      if (n >= Sh::kQSlots) mbar_wait(q_empty(slot), ((n / Sh::kQSlots) - 1) & 1);
      named_sync(1, kWarpgroupThreads);
      // Q's barrier takes two arrivals a thread: a plain one, which releases the item to the
      // consumers, and one when the thread's Q copies land. The stop has no copies.
      mbar_arrive(q_full(slot));
      if (!it.w.valid) {
        mbar_arrive(q_full(slot));  // the consumers' stop
        break;
      }
      const unsigned tiles = it.keys.tiles;
      const WorkItem& w = it.w;
      if (FI_SM90_Q_TMA && maps.q_tma != 0) {
        // Q by TMA: thread 0 copies the tile's D / 64 column blocks, each one box of kTileQ /
        // group query rows of the KV head's group of heads, and arrives for all 128 threads.
        // The tile's packed rows start at query row qo_tile_start / group (the group divides
        // kTileQ). Rows past the request read the next request's rows (or zeros past the
        // buffer): padding rows, which write nothing (the epilogue).
        if (pt == 0) {
          unsigned char* const sq = q_tile(slot);
          // The slot may last have been written by cp.async (see the K/V tiles below).
          fence_proxy_async();
          mbar_arrive_expect_tx(q_full(slot), Sh::kQBytes);
          const int head = static_cast<int>(w.kv_head * group);
          const int row = static_cast<int>(it.qo_begin + w.qo_tile_start / group);
          #pragma unroll
          for (int cb = 0; cb < D / 64; ++cb) {
            tma_load_3d(sq + cb * kTileQ * 128, &maps.q, q_full(slot), cb * 64, head, row);
          }
          mbar_arrive_n(q_full(slot), kWarpgroupThreads - 1);
        }
        __syncwarp();
      } else {
        // Q: unit u of rows r0 + i kRowsPerPass. Packed row p is query row p / group of head
        // p % group; a pass steps both by the same amounts (a head past the group carries into
        // the row), so the source pointer steps by two constants: two divisions an item, not
        // one a copy, and no item field read in the loop. The consumers wait on these copies at
        // every item's start (ncu of the ragged row, kernels/notes/fa3.md, session 10). Padding
        // rows of a partial tile read the thread's last real row; any real row will do, as
        // they write nothing (the epilogue).
        const unsigned last = w.qo_tile_end - 1;
        unsigned pr = min(w.qo_tile_start + r0, last);
        const unsigned row = pr / group, row_step = kRowsPerPass / group;
        unsigned h = pr - row * group;
        const unsigned head_step = kRowsPerPass - row_step * group;
        // Strides times rows stay inside one buffer, far below 2^63: the signed steps are exact.
        const long long sn = static_cast<long long>(a.q_stride_n);
        const long long sh = static_cast<long long>(a.q_stride_h);
        const T* src = q + (it.qo_begin + row) * sn + (w.kv_head * group + h) * sh + u * 8;
        const long long step = row_step * sn + head_step * sh, carry = sn - group * sh;
        unsigned char* const sq = q_tile(slot);
        #pragma unroll 1
        for (unsigned i = 0; i < kTileQ / kRowsPerPass; ++i) {
          const unsigned at = sw128_offset<D>(kTileQ, r0 + i * kRowsPerPass, u);
          cp_async_16(smem_u32(sq + at), src, true);
          if (pr + kRowsPerPass <= last) {
            pr += kRowsPerPass;
            src += step;
            h += head_step;
            if (h >= group) {
              h -= group;
              src += carry;
            }
          }
        }
        mbar_arrive_on_copies(q_full(slot));
      }

      for (unsigned t = 0; t < tiles; ++t) {
        const unsigned gt = g + t, s = stage(gt);
        const unsigned j0 = w.kv_start + t * kTileKv;
        unsigned char* const kt = k_tile(s);
        unsigned char* const vt = v_tile(s);
        // K's and/or V's stage must be free before any arrival for this tile (it must not land
        // in the phase before) and before the copies: thread 0 waits, and the others follow it
        // through a named barrier (cp.async tiles) or skip the tile (TMA tiles).
        auto wait_empty = [&](bool with_k, bool with_v) {
          if (gt >= Sh::kStages) {
            if (with_k) mbar_wait(k_empty(s), phase(gt - Sh::kStages));
            if (with_v) mbar_wait(v_empty(s), phase(gt - Sh::kStages));
          }
        };
        // A tile that ends inside its request goes by TMA: thread 0 alone waits, copies D / 64
        // column blocks of K and of V (a page at a time for a paged cache), each barrier
        // expecting the tile's bytes, and arrives for all 128 producer threads; the others skip
        // the tile (to the next cp.async tile's or item's named barrier, where thread 0 joins
        // them). Keys past the item's stop are real keys of the request, masked by the
        // consumers. A tile crossing the request's end goes by cp.async, which zero-fills the
        // keys past it (TMA would bring the next request's rows, a last page's unused slots or
        // a buffer's tail, and 0 * NaN is NaN in P V). A paged copy must also start on a
        // multiple of its rows (a split chunk may start at any multiple of 16 keys): else it
        // would run past its page, where TMA zero-fills.
        if (maps.tma != 0 && (it.kv.block_size == 0 || j0 % maps.rows_per_copy == 0) &&
            j0 + kTileKv <= it.kv.len) {
          if (pt == 0) {
            const int head = static_cast<int>(w.kv_head);
            // The tile's K (with_k) and V (with_v) copies, a column block (and a page) at a time,
            // K's and V's of each block in turn.
            auto copy = [&](bool with_k, bool with_v) {
              if (it.kv.block_size == 0) {
                // A ragged block id is its first token: the tile is rows id + j0 on.
                const int row = it.kv.blocks[0] + static_cast<int>(j0);
                #pragma unroll
                for (int cb = 0; cb < D / 64; ++cb) {
                  const unsigned at = cb * kTileKv * 128;
                  if (with_k) tma_load_3d(kt + at, &maps.k, k_full(s), cb * 64, head, row);
                  if (with_v) tma_load_3d(vt + at, &maps.v, v_full(s), cb * 64, head, row);
                }
              } else {
                // A page (or a tile's share of one) a copy: rows_per_copy rows from slot j % page.
                const unsigned per = maps.rows_per_copy, bs = it.kv.block_size;
                for (unsigned r = 0; r < static_cast<unsigned>(kTileKv); r += per) {
                  const unsigned j = j0 + r;
                  const int page = it.kv.blocks[j / bs], slot = static_cast<int>(j % bs);
                  #pragma unroll
                  for (int cb = 0; cb < D / 64; ++cb) {
                    const unsigned at = cb * kTileKv * 128 + r * 128;
                    if (with_k) tma_load_4d(kt + at, &maps.k, k_full(s), cb * 64, head, slot, page);
                    if (with_v) tma_load_4d(vt + at, &maps.v, v_full(s), cb * 64, head, slot, page);
                  }
                }
              }
            };
            // Issues the tile's K and/or V: waits for their stages' empty barriers, then (a stage
            // may last have been written by cp.async, the generic proxy) a fence orders those
            // writes before the async proxy's, and each full barrier expects its bytes and gets
            // the arrivals of all 128 producer threads.
            auto issue = [&](bool with_k, bool with_v) {
              wait_empty(with_k, with_v);
              fence_proxy_async();
              if (with_k) mbar_arrive_expect_tx(k_full(s), Sh::kKvBytes);
              if (with_v) mbar_arrive_expect_tx(v_full(s), Sh::kKvBytes);
              copy(with_k, with_v);
              if (with_k) mbar_arrive_n(k_full(s), kWarpgroupThreads - 1);
              if (with_v) mbar_arrive_n(v_full(s), kWarpgroupThreads - 1);
            };
            if constexpr (Sh::kStages == 2) {
              // K and V on their own pipelines: K's stage is free once S is done, a turn before
              // V's (freed after P V, which the overlapped loop waits for after the next tile's
              // softmax), so K is copied as soon as its stage is free. With two stages, waiting
              // for both put every tile's load on the consumers' path (the 176-key tile ran 0.77
              // of the 128-key one that way; split, 1.02-1.03: kernels/notes/fa3.md, session 23).
              issue(true, false);
              issue(false, true);
            } else {
              // Three stages hide the wait for both (split, the 128-key tile measured 0.97-1.0).
              issue(true, true);
            }
          }
          __syncwarp();  // warp 0 whole again before its next aligned barrier
          continue;
        }
        if (pt == 0) wait_empty(true, true);
        __syncwarp();
        // One page lookup a key: thread pt finds the byte offsets of keys pt, pt + 128, ... (of
        // a 64-key tile, threads past it have none; a constant loop count for 128 keys).
        const unsigned live = min(it.keys.stop - j0, static_cast<unsigned>(kTileKv));
        // Slots by cp.async tile (TMA tiles have no barrier between them to separate readers).
        unsigned long long* const offs = key_off + (co++ % Sh::kOffsetSlots) * kTileKv;
        #pragma unroll
        for (unsigned r = pt; r < static_cast<unsigned>(kTileKv); r += kWarpgroupThreads) {
          offs[r] = r < live ? it.kv.offset(j0 + r, w.kv_head) * sizeof(T) : 0ull;
        }
        named_sync(1, kWarpgroupThreads);
        // K and V rows in one loop: each key's offset is read once for both (the producer's
        // instructions compete with the consumers' softmax for issue slots, so the loop keeps
        // to a load, two 64-bit adds and the copies a row). K's arrival also waits for V's
        // copies, which land together. Keys past the item's end are zero-filled: P is 0 there,
        // and 0 * V must not be NaN. Where a pass is a multiple of 8 rows, row r % 8 and so the
        // swizzle is the same every pass: the unit's offset steps by a constant.
        const unsigned k_at = smem_u32(kt), v_at = smem_u32(vt);
        const char* k_unit = k + u * 16;
        const char* v_unit = v + u * 16;
        // Opaque, so the compiler adds each row's offset to them (two adds) rather than
        // re-associating it with u * 16 and then with each base (three).
        asm("" : "+l"(k_unit));
        asm("" : "+l"(v_unit));
        const unsigned at0 = sw128_offset<D>(kTileKv, r0, u);
        #pragma unroll 4
        for (unsigned i = 0; i < kTileKv / kRowsPerPass; ++i) {
          const unsigned r = r0 + i * kRowsPerPass;
          const unsigned long long o = offs[r];
          const unsigned at = kRowsPerPass % 8 == 0 ? at0 + i * kRowsPerPass * 128
                                                    : sw128_offset<D>(kTileKv, r, u);
          cp_async_16(k_at + at, k_unit + o, r < live);
          cp_async_16(v_at + at, v_unit + o, r < live);
        }
        mbar_arrive_on_copies(k_full(s));
        mbar_arrive_on_copies(v_full(s));
      }
      g += tiles;
    }
    // The last copies land before the producer leaves (their arrivals are pending on it).
    cp_async_commit();
    cp_async_wait<0>();
    return;
  }

  // ---- Consumers: warpgroup 1 takes rows 0-63 of the tile, warpgroup 2 rows 64-127.
  regs_grow<kSm90ConsumerRegs<D>>();
  // cw through a shuffle: ptxas then knows it is warp-uniform and keeps the MMA descriptors made
  // from it in uniform registers (no per-MMA moves into them).
  const unsigned cw = __shfl_sync(kFullMask, warpgroup_id() - 1, 0), wt = warpgroup_thread();
  const unsigned lane = wt % kWarpSize, t4 = lane % 4;
  // This thread's two rows of the tile (accumulator layout, sm90/wgmma.cuh).
  const unsigned row0 = cw * 64 + (wt / kWarpSize) * 16 + lane / 4;
  // A score s enters the softmax as x = core(s * pre) (variant/hooks.cuh: the logits hook split
  // around its scales; without a hook x = s), weighted 2^(x * post - max): sm_scale is in pre, or
  // in post without a logits hook, and log2(e) in post. Taken once per kernel, not per score.
  const float pre = V::kHasLogits ? a.sm_scale * hook_logits_pre<V>(p) : 1.0f;
  float post = V::kHasLogits ? hook_logits_post<V>(p) : a.sm_scale;
  if constexpr (V::kSoftmax) post *= kLog2e;
  // A bounded logits core (soft-capping) small enough against post: no running row maximum
  // (variant/hooks.cuh, fixed_max); m stays 0.
  const bool fixed_m = fixed_max<V, kBf16>(post);
  // Turns: the two consumers issue their MMAs alternately (named barriers 2 and 3, each
  // completed by one consumer's sync and the other's arrival). Consumer 1 lets 0 go first.
  const unsigned my_turn = 2 + cw, their_turn = 3 - cw;
  if (cw == 1) named_arrive(2, 2 * kWarpgroupThreads);

  // The producer's cp.async stores reach shared memory through the generic proxy and wgmma
  // reads it through the async proxy: each consumer thread orders the two once it has seen a
  // tile's barrier complete.
  auto wait_copies = [](unsigned long long* bar, unsigned parity) {
    mbar_wait(bar, parity);
    fence_proxy_async();
  };

  float o[D / 2];  // the accumulator layout (sm90/wgmma.cuh) over D columns
  float m[2], z[2];
  unsigned pa[kTileKv / 16][4];
  float sacc[kTileKv / 2];
  float scale[2];
  bool grew;
  // P, bf16/f16 pairs in S's accumulator layout, which is the A operand's: 16 keys a step.
  auto to_p = [&] {
    #pragma unroll
    for (unsigned kb = 0; kb < kTileKv / 16; ++kb) {
      #pragma unroll
      for (unsigned r = 0; r < 4; ++r) {
        pa[kb][r] = pack2<T>(sacc[8 * kb + 2 * r], sacc[8 * kb + 2 * r + 1]);
      }
    }
  };
  // O += P V for the tile in `vt` (inside a fence; P was converted before it), committed.
  auto issue_pv = [&](const unsigned char* vt) {
    const unsigned long long vd = sm90_v_desc<kTileKv>(vt);
    #pragma unroll
    for (unsigned kb = 0; kb < kTileKv / 16; ++kb) sm90_pv<kBf16, D, kTileKv>(o, pa[kb], vd, kb);
    wgmma_commit();
  };
  // S = Q K^T: this warpgroup's 64 rows of `sq` by the keys of `kt` (inside a fence).
  auto issue_s = [&](const unsigned char* sq, const unsigned char* kt) {
    sm90_qk<kBf16, D, kTileQ, kTileKv>(sacc, sq, cw * 64, kt);
    wgmma_commit();
  };

  unsigned g = 0;
  for (unsigned n = 0; n < num_items; ++n) {  // counted: see the producer's loop
    const unsigned slot = n % Sh::kQSlots;
    wait_copies(q_full(slot), (n / Sh::kQSlots) & 1);
    const Item& it = *item_slot(n % Sh::kItemSlots);  // read in place (see kItemSlots)
    if (!it.w.valid) break;
    const WorkItem& w = it.w;
    const ItemKeys& keys = it.keys;
    const unsigned &b = w.request, &kv_head = w.kv_head, &qo_begin = it.qo_begin, &qo_len = it.qo_len;
    const KeyPositions& kp = it.kp;
    const long long& shift = it.shift;
    auto row_of = [&](int hf) { return packed(w, row0 + 8 * hf); };
    // This warp's first and last packed rows, and the tiles the variant's mask may cut.
    const unsigned warp_rows[2] = {packed(w, row0 - lane / 4), packed(w, row0 - lane / 4 + 15)};
    MaskCuts<V> cuts;
    unsigned char* const sq = q_tile(slot);
    if constexpr (V::kHasQuery) {
      // This consumer's 64 rows, before its first S (and not once Q is freed: no tiles).
      if (keys.tiles > 0) {
        auto pos = [&](unsigned r) {
          const unsigned pr = packed(w, r), h = kv_head * group + pr % group;
          return Pos{b, pr / group, 0, h, kv_head, qo_len, kp.total, D};
        };
        sm90_hook_rows<V, T, D, true>(p, sq, kTileQ, cw * 64, 64, wt, kWarpgroupThreads, pos);
        fence_proxy_async();
        named_sync(4 + cw, kWarpgroupThreads);
      }
    }

    #pragma unroll
    for (int i = 0; i < D / 2; ++i) o[i] = 0.0f;
    m[0] = m[1] = fixed_m ? 0.0f : -FI_INF;
    z[0] = z[1] = 0.0f;
    // The softmax of tile t on sacc; O's rescale is left in `scale` and `grew`.
    auto softmax_tile = [&](unsigned t) {
      const unsigned j0 = w.kv_start + t * kTileKv;
      scale[0] = scale[1] = 1.0f;
      grew = false;
      // Logits, masks and the online softmax, as prefill.cuh's: each call below passes constant
      // flags, so each inlines to its own straight-line copy (a runtime test per element made the
      // loop one branch an element: 2.4k instructions a tile, and instruction-fetch stalls).
      // `boundary`: the tile crosses the item's end or a row's diagonal, or the variant's mask
      // may cut it (interior tiles have no mask code). `fold`: x stays unscaled by post until the
      // exponent, where x * post - m is one FFMA (the row max commutes with a positive post; a
      // masked -inf stays -inf). Element i is row hf = (i / 2) % 2 of this thread, key
      // 8 (i / 4) + 2 t4 + i % 2 of the tile. It leaves O's rescale in `scale` (`grew`: any row's
      // maximum moved). `fixed` (with fold off): the exponent is x with no maximum (fixed_m).
      auto logits_softmax = [&](const bool fold, const bool boundary, const bool fixed) {
        // On a boundary tile row hf keeps the keys before the item's stop and (causal) at or
        // before its diagonal: element i (key 8 (i / 4) + 2 t4 + i % 2 of the tile) is kept iff
        // 8 (i / 4) + i % 2 < live[hf], one compare with a constant an element where two 64-bit
        // compares were (Standard's hd128 build 5.5% fewer instructions; AttentionSink's in-order
        // build at head dim 128 then fits). Not with a mask hook: its two registers more made
        // CustomMask's in-order build at head dim 64 spill (kernels/notes/fa3.md, session 24).
        constexpr bool kLive = !V::kHasMask;
        int live[2];
        if (kLive && boundary) {
          #pragma unroll
          for (int hf = 0; hf < 2; ++hf) {
            long long end = keys.stop;
            const long long diag = static_cast<long long>(row_of(hf) / group) + shift;
            if (causal && diag < end) end = diag + 1;
            end -= static_cast<long long>(j0) + 2 * t4;
            live[hf] = end < 0 ? -1 : end > kTileKv ? kTileKv : static_cast<int>(end);
          }
        }
        #pragma unroll
        for (int i = 0; i < kTileKv / 2; ++i) {
          const int hf = (i / 2) % 2;
          const unsigned j = j0 + 8 * (i / 4) + 2 * t4 + (i % 2);
          float x = V::kHasLogits ? sacc[i] * pre : fold ? sacc[i] : sacc[i] * post;
          bool keep = true;
          if (kLive && boundary) {
            keep = 8 * (i / 4) + (i % 2) < live[hf];
          } else if (boundary) {
            const long long diag = static_cast<long long>(row_of(hf) / group) + shift;
            keep = (j < keys.stop) & (!causal | (static_cast<long long>(j) <= diag));
          }
          if constexpr (V::kHasMask || V::kHasLogits) {
            const unsigned pr = row_of(hf);
            const unsigned h = kv_head * group + pr % group;
            const Pos at{b, pr / group, kp.offset + j, h, kv_head, qo_len, kp.total, D};
            if constexpr (V::kHasMask) {
              if (boundary) keep = keep && hook_mask<V>(p, at);
            }
            if constexpr (V::kHasLogits) {
              if (keep) {
                x = hook_logits_core<V>(p, x, at);
                if (!fold) x *= post;
              }
            }
          }
          if (boundary) x = keep ? x : (V::kSoftmax ? -FI_INF : 0.0f);
          sacc[i] = x;
        }
        if (V::kSoftmax && fixed) {
          #pragma unroll
          for (int hf = 0; hf < 2; ++hf) {
            float sum = 0.0f;
            #pragma unroll
            for (int q4 = 0; q4 < kTileKv / 8; ++q4) {
              #pragma unroll
              for (int e = 0; e < 2; ++e) {
                float& x = sacc[4 * q4 + 2 * hf + e];
                x = exp2_approx(x);
                sum += x;
              }
            }
            z[hf] += sum;
          }
        } else if constexpr (V::kSoftmax) {
          #pragma unroll
          for (int hf = 0; hf < 2; ++hf) {
            float mx = fold ? -FI_INF : m[hf];
            #pragma unroll
            for (int q4 = 0; q4 < kTileKv / 8; ++q4) {
              mx = fmaxf(mx, fmaxf(sacc[4 * q4 + 2 * hf], sacc[4 * q4 + 2 * hf + 1]));
            }
            mx = fmaxf(mx, __shfl_xor_sync(kFullMask, mx, 1));
            mx = fmaxf(mx, __shfl_xor_sync(kFullMask, mx, 2));
            if (fold) mx = fmaxf(m[hf], mx * post);
            mx = next_max(m[hf], mx);  // the reference may trail the maximum (epilogue.cuh)
            // While nothing is visible the max is -inf; 0 stands in so no -inf - -inf appears.
            const float base = mx == -FI_INF ? 0.0f : mx;
            scale[hf] = exp2_approx(m[hf] - base);
            grew = grew || mx != m[hf];
            m[hf] = mx;
            float sum = 0.0f;
            #pragma unroll
            for (int q4 = 0; q4 < kTileKv / 8; ++q4) {
              #pragma unroll
              for (int e = 0; e < 2; ++e) {
                float& x = sacc[4 * q4 + 2 * hf + e];
                x = exp2_approx(fold ? fmaf(x, post, -base) : x - base);
                sum += x;
              }
            }
            z[hf] = z[hf] * scale[hf] + sum;
          }
        }
      };
      // The variant's mask runs per score on the tiles it may cut (with the causal and end
      // checks), and on no others.
      const bool cut = cuts.may_cut(t, p, b, warp_rows[0], warp_rows[1], group, kv_head,
                                    kp.offset + w.kv_start, kTileKv, kTileKv, qo_len, kp.total, D);
      const bool boundary = t >= keys.first_masked || cut;
      if constexpr (V::kSoftmax && kLogitsCoreBound<V> > 0.0f) {
        // A bounded core: the copies without a maximum, or (a core too large against post for
        // them) the unfolded copies, which take either sign of post. Two copies a call site, as
        // for a variant without a logits hook.
        if (fixed_m) {
          if (boundary) {
            logits_softmax(false, true, true);
          } else {
            logits_softmax(false, false, true);
          }
        } else if (boundary) {
          logits_softmax(false, true, false);
        } else {
          logits_softmax(false, false, false);
        }
      } else if constexpr (V::kSoftmax) {
        // Without a logits hook post is sm_scale log2(e), and the launch runs FA2 for
        // sm_scale <= 0 (runtime: PrefillKernel::choose), so the unfolded copies need not be
        // built: two copies of the softmax a call site fewer, a third less for ptxas (Standard
        // hd128 2.9-3.3 s -> 1.8-2.6 s, SlidingWindow 5.3-5.8 -> 2.7-4.0 on a 2-core machine).
        // Not at head dim 64, whose build without them ran 2.3% slower (kernels/notes/fa3.md,
        // session 16; 128 and 256 were even or faster).
        if ((!V::kHasLogits && D != 64) || post > 0.0f) {
          if (boundary) {
            logits_softmax(true, true, false);
          } else {
            logits_softmax(true, false, false);
          }
        } else if (boundary) {
          logits_softmax(false, true, false);
        } else {
          logits_softmax(false, false, false);
        }
      } else if (boundary) {
        logits_softmax(false, true, false);
      } else {
        logits_softmax(false, false, false);
      }
    };

    // The steps both consumer orders share. S(gt) on its own, in this consumer's turn, waited
    // for; K's stage is then free.
    auto s_alone = [&](unsigned gt) {
      wait_copies(k_full(stage(gt)), phase(gt));
      if constexpr (V::kHasKey) {
        // Each consumer rewrites half the tile's keys before its item stop (past it they are
        // masked), then both wait for the whole tile.
        const unsigned j0 = w.kv_start + (gt - g) * kTileKv, lo = cw * (kTileKv / 2);
        const unsigned live = min(keys.stop - j0, static_cast<unsigned>(kTileKv));
        const unsigned rows = live > lo ? min(live - lo, kTileKv / 2u) : 0u;
        auto pos = [&](unsigned r) {
          return Pos{b, 0, kp.offset + j0 + r, 0, kv_head, qo_len, kp.total, D};
        };
        sm90_hook_rows<V, T, D, false>(p, k_tile(stage(gt)), kTileKv, lo, rows, wt,
                                       kWarpgroupThreads, pos);
        fence_proxy_async();
        named_sync(6, 2 * kWarpgroupThreads);
      }
      named_sync(my_turn, 2 * kWarpgroupThreads);
      wgmma_fence();
      issue_s(sq, k_tile(stage(gt)));
      named_arrive(their_turn, 2 * kWarpgroupThreads);
      wgmma_wait<0>();
      wgmma_hold(sacc);
      mbar_arrive(k_empty(stage(gt)));
    };
    // O += P V(gt) on its own, waited for; V's stage is then free. The rescaled O and the new P
    // are written before the fence (the compiler may not sink register arithmetic past it).
    auto pv_alone = [&](unsigned gt) {
      wait_copies(v_full(stage(gt)), phase(gt));
      wgmma_hold(o);
      wgmma_hold(pa);
      wgmma_fence();
      issue_pv(v_tile(stage(gt)));
      wgmma_wait<0>();
      wgmma_hold(o);
      wgmma_hold(pa);
      mbar_arrive(v_empty(stage(gt)));
    };
    // O to the new row maxima, where any moved (most tiles of a long row move none).
    auto rescale_o = [&] {
      if (!fixed_m && __any_sync(kFullMask, grew)) {
        #pragma unroll
        for (int i = 0; i < D / 2; ++i) o[i] *= scale[(i / 2) % 2];
      }
    };

    // Epilogue (epilogue.cuh), as prefill.cuh: unsplit items write o and lse, split items their
    // chunk's partial row and LSE.
    auto epilogue = [&] {
      const bool split = w.partial >= 0;
      #pragma unroll
      for (int hf = 0; hf < 2; ++hf) {
        float zz = z[hf];
        zz += __shfl_xor_sync(kFullMask, zz, 1);
        zz += __shfl_xor_sync(kFullMask, zz, 2);
        // Padding rows (which repeat the last real row) go through the shuffles of the store and
        // write nothing.
        const bool live = w.qo_tile_start + row0 + 8 * hf < w.qo_tile_end;
        const unsigned pr = row_of(hf);
        const unsigned i = pr / group, h = kv_head * group + pr % group;
        const Pos at{b, i, 0, h, kv_head, qo_len, kp.total, D};
        // The LSE is taken only where it is written (a log2 and its special cases a row).
        // Without a maximum (fixed_m) a row that saw no key has z = 0: its m is -inf as online.
        const float mh = fixed_m && zz == 0.0f ? -FI_INF : m[hf];
        const auto end = finish_row<V>(p, mh, zz, at, !split);
        if (!split) {
          unsigned pairs[D / 8];
          #pragma unroll
          for (int q4 = 0; q4 < D / 8; ++q4) {
            const unsigned d = 8 * q4 + 2 * t4;
            const float x0 = out_elem<V>(p, o[4 * q4 + 2 * hf], end, d, at);
            const float x1 = out_elem<V>(p, o[4 * q4 + 2 * hf + 1], end, d + 1, at);
            pairs[q4] = pack2<T>(x0, x1);
          }
          store_row_by_quad<T, D>(out_row<T>(a, qo_begin + i, h), pairs, t4, live);
          if (live && t4 == 0 && a.lse != nullptr) write_lse(a, qo_begin + i, h, end.lse());
        } else if (live) {
          const unsigned long long prow = partial_row(w.partial, i);
          float* dst = partial_out<D>(a, prow, h);
          #pragma unroll
          for (int q4 = 0; q4 < D / 8; ++q4) {
            const float pair[2] = {o[4 * q4 + 2 * hf], o[4 * q4 + 2 * hf + 1]};
            store_partial<2>(dst + 8 * q4 + 2 * t4, pair, end);
          }
          if (t4 == 0) write_partial_lse<V::kSoftmax>(a, prow, h, end.lse());
        }
      }
    };

    mbar_arrive_if(q_empty(slot), keys.tiles == 0);  // no S reads this Q
    if constexpr (kSm90Overlap<V, D>) {
      // FA3's intra-warpgroup overlap: S(t) and P V(t - 1) are issued in one turn, S first, and
      // the softmax of S(t) runs while P V(t - 1) computes; the other consumer's turn follows,
      // so the tensor cores get both consumers' 2 x 2 MMAs back to back while each softmax hides
      // under the other's. P(t - 1) stays in registers until its MMA is waited for; O is rescaled
      // for tile t after it. Tile 0 (S alone) and the last P V are peeled off the loop: ptxas
      // keeps MMAs in flight across a wait only in straight-line pipelines.
      if (keys.tiles > 0) {
        s_alone(g);
        mbar_arrive_if(q_empty(slot), keys.tiles == 1);
        softmax_tile(0);  // O is still 0: nothing to rescale
        to_p();
      }
      for (unsigned t = 1; t < keys.tiles; ++t) {
        const unsigned gt = g + t;
        wait_copies(k_full(stage(gt)), phase(gt));
        wait_copies(v_full(stage(gt - 1)), phase(gt - 1));
        named_sync(my_turn, 2 * kWarpgroupThreads);
        wgmma_hold(o);
        wgmma_hold(pa);
        wgmma_fence();
        issue_s(sq, k_tile(stage(gt)));
        issue_pv(v_tile(stage(gt - 1)));
        named_arrive(their_turn, 2 * kWarpgroupThreads);
        wgmma_wait<1>();  // S(t) is done; P V(t - 1) may still run
        wgmma_hold(sacc);
        mbar_arrive(k_empty(stage(gt)));
        mbar_arrive_if(q_empty(slot), t + 1 == keys.tiles);  // the item's last S: Q is free
        softmax_tile(t);
        wgmma_wait<0>();
        wgmma_hold(o);
        wgmma_hold(pa);
        mbar_arrive(v_empty(stage(gt - 1)));
        rescale_o();
        to_p();
      }
      // The last P V, then the epilogue. (Issuing the next item's first S with this P V, to run
      // under the epilogue, lost 2.9% on the ragged row once it fired at a quarter of the item
      // ends: the turn it takes waits for the other consumer's epilogue; kernels/notes/fa3.md,
      // session 18.)
      if (keys.tiles > 0) pv_alone(g + keys.tiles - 1);
      epilogue();
    } else {
      // S, its softmax, then P V, each tile; K's stage is freed once S is done.
      for (unsigned t = 0; t < keys.tiles; ++t) {
        s_alone(g + t);
        mbar_arrive_if(q_empty(slot), t + 1 == keys.tiles);  // the item's last S: Q is free
        softmax_tile(t);
        rescale_o();
        to_p();
        pv_alone(g + t);
      }
      epilogue();
    }
    g += keys.tiles;
  }
}

}  // namespace fi
