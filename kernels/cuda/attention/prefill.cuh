// Prefill and append, FlashAttention-2 style for sm_80+ (it also serves Hopper until an FA3 path
// exists). One CTA per work item of the plan: a tile of TILE_Q packed query rows (GQA heads packed
// into the rows, see runtime/src/attention/plan.rs) of one request and KV head, over one KV chunk.
// Q stays in shared memory; K and V tiles of kCtaKv keys stream through two stages with cp.async,
// so tile t + 1 loads during all of tile t (one barrier per tile); key offsets come from a
// per-tile table. S, O live in registers as mma.sync m16n8k16 fragments (sm80/mma.cuh); the
// online softmax runs in base 2, and rows end in attention/epilogue.cuh.
// The 16-row tile (decode on tensor cores, prefill of very short requests) may have two warps
// along the keys (KV_WARPS, chosen per plan): they share the 16 rows, each computes S, the
// softmax and P V over its own kTileKv keys of every CTA tile, and their (m, z, O) merge in
// shared memory at the end. So one CTA keeps twice the K/V bytes in flight of a one-warp CTA
// (FlashInfer's decode on tensor cores does the same, with four warps; four lost here).
// Launch: grid num_items, block PrefillShape::kThreads, dynamic shared PrefillShape::kSmemBytes
// (kernels/src/prefill.rs mirrors these).
#pragma once
#include "core/abi.cuh"
#include "core/dtype.cuh"
#include "core/grid_order.cuh"
#include "core/math.cuh"
#include "core/warp.cuh"
#include "sm80/cp_async.cuh"
#include "sm80/ldmatrix.cuh"
#include "sm80/mma.cuh"
#include "sm80/smem.cuh"
#include "variant/hooks.cuh"
#include "attention/causal.cuh"
#include "attention/epilogue.cuh"
#include "attention/kv.cuh"
#include "attention/work.cuh"

namespace fi {

// Warps of a 64-row tile; kernels/src/prefill.rs has the same number.
constexpr unsigned kPrefillWarps = 4;

// What the K/V loads and the key hook need of the CTA's request, kept in shared memory between
// tiles rather than in registers (the 128-row tile has none to spare).
struct PrefillCta {
  KvSeq kv;
  unsigned kv_start, kv_stop, kv_head, request, qo_len;
  int shift;  // key j is causally visible to query row i iff j <= i + shift
  unsigned kv_offset, kv_total;  // KeyPositions (work.cuh): what the key hook sees
};
// kernels/src/prefill.rs reserves this many bytes for it.
constexpr int kPrefillCtaBytes = 72;
static_assert(sizeof(PrefillCta) <= kPrefillCtaBytes, "PrefillCta must fit its reserved bytes");

// KV_WARPS: warps along the keys, 1 or (at the 16-row tile) 2; the plan picks the instance per
// batch (kernels/src/attention/prefill.rs, `choose_kv_warps`).
template <int D, int TILE_Q, int TILE_KV, int KV_WARPS = 1>
struct PrefillShape {
  static_assert(TILE_Q == 16 || TILE_Q == 64 || TILE_Q == 128, "query tile of 16, 64 or 128 rows");
  static_assert(TILE_KV == 32 || TILE_KV == 64 || (TILE_KV == 16 && TILE_Q == 16 && KV_WARPS == 1),
                "K/V tile of 32 or 64 keys (a warp's slice), or 16 at the one-warp 16-row tile");
  static_assert(KV_WARPS == 1 || (TILE_Q == 16 && KV_WARPS == 2),
                "warps along the keys: 2, at the 16-row tile only");
  // One warp per 16 rows, at most kPrefillWarps; at head dim 256 a warp cannot hold two 16-row
  // output blocks (256 f32 registers), so a 128-row tile gets 8 warps instead.
  static constexpr int kQWarps =
      (D == 256 || TILE_Q / 16 < int(kPrefillWarps)) ? TILE_Q / 16 : int(kPrefillWarps);
  // Warps along the keys: warp w takes the rows of w / kKvWarps and key slice w % kKvWarps.
  static constexpr int kKvWarps = KV_WARPS;
  static constexpr int kWarps = kQWarps * kKvWarps;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kMmaQ = TILE_Q / (16 * kQWarps);  // 16-row blocks per warp
  // Keys per K/V tile (a multiple of 16, see the plan), chosen by kernels/src/prefill.rs: 64
  // halves the per-key cost of the softmax bookkeeping and barriers, but two 16-row blocks per
  // warp at head dim 128 then hold 128 f32 outputs and 64 scores per thread, which fits 255
  // registers only for variants with light hooks (the runtime keeps it when nothing spills).
  static constexpr int kTileKv = TILE_KV;  // keys of a warp's slice
  static constexpr int kCtaKv = kKvWarps * kTileKv;  // keys of the CTA's K/V tile
  static constexpr int kMmaKv = kTileKv / 8;  // 8-key blocks of S
  static constexpr int kMmaD = D / 8;  // 8-column blocks of O
  static constexpr int kChunks = D / 8;  // 16-byte chunks per row
  static constexpr int kRowBytes = D * 2;
  static constexpr int kStages = 2;  // K/V tiles in shared memory: this one and the next
  // Shared memory, in this order: the Q tile, kStages K tiles, kStages V tiles, the byte offsets
  // of two tiles' keys, the block ids of two tiles' keys, PrefillCta.
  static constexpr int kQBytes = TILE_Q * kRowBytes;
  static constexpr int kKvBytes = kCtaKv * kRowBytes;
  static constexpr int kOffsetsAt = kQBytes + 2 * kStages * kKvBytes;
  static constexpr int kIdsAt = kOffsetsAt + 2 * kCtaKv * 8;
  static constexpr int kCtaAt = kIdsAt + 2 * kCtaKv * 4;
  static constexpr int kSmemBytes = kCtaAt + kPrefillCtaBytes;
  // K/V copies: each thread always copies the same 16-byte chunk of kRowsPerCopy-apart rows.
  static constexpr int kRowsPerCopy = kThreads / kChunks;
  static_assert(kThreads % kChunks == 0 && kCtaKv % kRowsPerCopy == 0, "whole rows per copy");
  static_assert(TILE_Q * kChunks % kThreads == 0, "whole Q rows per copy");
  // The merge of the warps along the keys, over the drained K/V stages: each warp's O (16 rows
  // of D f32, rows kMergeStride floats apart: 8 more than D, so that a quad's float2 of 8 rows
  // fall on distinct banks), then each warp's m and z of the 16 rows.
  static constexpr int kMergeStride = D + 8;
  static constexpr int kMergeBytes = kKvWarps * 16 * (kMergeStride + 2) * 4;
  static_assert(kKvWarps == 1 || (kQWarps == 1 && kMmaQ == 1), "warps along the keys: 16 rows");
  static_assert(kKvWarps == 1 || kMergeBytes <= 2 * kStages * kKvBytes, "merge in the stages");
  static_assert((D / 8) % kKvWarps == 0, "each warp merges whole 8-column blocks");
};

template <class V, class P, class T, int D, int TILE_Q, int TILE_KV, int KV_WARPS = 1>
__device__ void prefill(const AttnArgs& a, const P& p) {
  using Sh = PrefillShape<D, TILE_Q, TILE_KV, KV_WARPS>;
  constexpr int kTileKv = Sh::kTileKv, kCtaKv = Sh::kCtaKv, kKvWarps = Sh::kKvWarps;
  constexpr int kMmaQ = Sh::kMmaQ, kMmaKv = Sh::kMmaKv;
  constexpr int kMmaD = Sh::kMmaD, kChunks = Sh::kChunks, kThreads = Sh::kThreads;
  constexpr int kRowBytes = Sh::kRowBytes, kKvBytes = Sh::kKvBytes;

  let_next_grid_start();  // the merge pass waits for this grid's end (core/grid_order.cuh)
  const WorkItem w = work_item(a.work, blockIdx.x);
  if (!w.valid) return;  // the whole CTA: padding of the work list

  // 1024-byte alignment: ldmatrix addresses step through the swizzled chunks of a row by XOR
  // (see sm80/smem.cuh), which needs every tile to start at a multiple of its row bytes.
  extern __shared__ __attribute__((aligned(1024))) unsigned char prefill_smem[];
  const unsigned smem = smem_addr(prefill_smem);
  const SmemTile<TILE_Q, D> sq{prefill_smem};
  // K/V tile t lives in stage t % 2: K stages, then V stages (2 kKvBytes further on).
  unsigned char* const kv_smem = prefill_smem + Sh::kQBytes;
  auto sk = [&](unsigned tile) { return SmemTile<kCtaKv, D>{kv_smem + (tile % 2) * kKvBytes}; };
  // Tile t's key byte offsets and block ids live in slot t % 2 of their tables.
  unsigned long long* const key_off =
      reinterpret_cast<unsigned long long*>(prefill_smem + Sh::kOffsetsAt);
  int* const key_ids = reinterpret_cast<int*>(prefill_smem + Sh::kIdsAt);
  PrefillCta& cta = *reinterpret_cast<PrefillCta*>(prefill_smem + Sh::kCtaAt);

  const unsigned b = w.request, kv_head = w.kv_head;
  const unsigned qo_begin = static_cast<unsigned>(a.qo_indptr[b]);
  const unsigned qo_len = static_cast<unsigned>(a.qo_indptr[b + 1]) - qo_begin;
  const unsigned group = a.num_qo_heads / a.num_kv_heads;
  const KvSeq kv = kv_seq(a, b);
  const bool causal = a.causal != 0;
  // Hooks see key j at position kp.offset + j of a request of kp.total keys (work.cuh).
  const KeyPositions kp = key_positions(a.work, b, kv.len);
  // Key j is causally visible to query row i iff j <= i + shift.
  const long long shift = kp.causal_shift(qo_len);

  // The item's keys and its tiles that need a mask (causal.cuh).
  const ItemKeys keys = item_keys(w, group, shift, causal, kCtaKv);
  const unsigned kv_stop = keys.stop, num_tiles = keys.tiles, first_masked = keys.first_masked;

  // Padding rows of a partial tile repeat the last real row: every hook sees a real position, and
  // their results are never written.
  auto packed = [&](unsigned r) { return min(w.qo_tile_start + r, w.qo_tile_end - 1); };

  // Prologue: Q, then K and V of tile 0 with the block ids of tile 2, two commit groups.
  const T* q = static_cast<const T*>(a.q);
  #pragma unroll 1
  for (int it = 0; it < TILE_Q * kChunks / kThreads; ++it) {
    const unsigned c = it * kThreads + threadIdx.x;
    const unsigned r = c / kChunks, ch = c % kChunks, pr = packed(r);
    const unsigned i = pr / group, h = kv_head * group + pr % group;
    cp_async_16(sq.addr(r, ch), q + (qo_begin + i) * a.q_stride_n + h * a.q_stride_h + ch * 8,
                true);
  }
  cp_async_commit();

  if (threadIdx.x == 0) {
    cta = PrefillCta{kv, w.kv_start, kv_stop, kv_head, b, qo_len, static_cast<int>(shift),
                     kp.offset, kp.total};
  }
  // Key offsets: one page lookup per key and tile (not per 16-byte chunk). The block ids of tile
  // t + 2 stream into shared memory with K/V(t + 1) (cp.async, no register waits on them); the
  // offsets of tile t + 2 are computed from them during tile t, and K/V(t + 1) copies are a table
  // read and an add. Keys at or past kv_stop get offset 0 (a valid address, never read).
  // One warp per tile does the per-key work, a different one each tile; with warps along the keys
  // (a CTA tile of kKvWarps slices), every thread takes its keys.
  auto key_warp = [&](unsigned tile) {
    if constexpr (kKvWarps > 1) {
      return true;
    } else {
      return warp_id() == tile % Sh::kWarps;
    }
  };
  auto key_first = [&]() -> unsigned {
    if constexpr (kKvWarps > 1) {
      return threadIdx.x;
    } else {
      return lane_id();
    }
  };
  constexpr unsigned kKeyStride = kKvWarps > 1 ? kThreads : kWarpSize;
  auto fetch_ids = [&](unsigned tile) {
    if (!key_warp(tile)) return;
    const unsigned j0 = cta.kv_start + tile * kCtaKv, stop = cta.kv_stop;
    for (unsigned r = key_first(); r < kCtaKv; r += kKeyStride) {
      const unsigned j = j0 + r;
      cp_async_4(smem + Sh::kIdsAt + ((tile % 2) * kCtaKv + r) * 4,
                 cta.kv.blocks + (j < stop ? cta.kv.block_of(j) : 0), j < stop);
    }
  };
  // Offsets from ids in shared memory (`from_ids`) or, in the prologue, from the index itself.
  auto fill_offsets = [&](unsigned tile, bool from_ids) {
    if (!key_warp(tile)) return;
    const unsigned start = from_ids ? cta.kv_start : w.kv_start;
    const unsigned stop = from_ids ? cta.kv_stop : kv_stop;
    const unsigned j0 = start + tile * kCtaKv;
    for (unsigned r = key_first(); r < kCtaKv; r += kKeyStride) {
      const unsigned j = j0 + r;
      unsigned long long off = 0;
      if (j < stop) {
        off = from_ids ? cta.kv.offset_in(key_ids[(tile % 2) * kCtaKv + r], j, cta.kv_head)
                       : kv.offset(j, kv_head);
      }
      key_off[(tile % 2) * kCtaKv + r] = off * sizeof(T);
    }
  };
  // Each thread copies chunk `ch` of rows `r_copy + it * kRowsPerCopy` of K and V. Keys at or
  // past kv_stop are zero-filled: P is 0 there, and 0 * V must not be NaN.
  const unsigned ch = threadIdx.x % kChunks, r_copy = threadIdx.x / kChunks;
  auto load_kv = [&](unsigned tile, unsigned stop) {
    const unsigned j0 = w.kv_start + tile * kCtaKv;
    const unsigned live_rows = min(stop - j0, static_cast<unsigned>(kCtaKv));
    const unsigned long long* const offs = key_off + (tile % 2) * kCtaKv;
    const unsigned dst0 = smem + Sh::kQBytes + (tile % 2) * kKvBytes;
    const char* const k = static_cast<const char*>(a.k) + ch * 16;
    const char* const v = static_cast<const char*>(a.v) + ch * 16;
    #pragma unroll 4
    for (int it = 0; it < kCtaKv / Sh::kRowsPerCopy; ++it) {
      const unsigned r = it * Sh::kRowsPerCopy + r_copy;
      const unsigned long long off = offs[r];
      const unsigned dst = dst0 + SmemTile<kCtaKv, D>::chunk_offset(r, ch);
      const bool live = r < live_rows;
      cp_async_16(dst, k + off, live);
      cp_async_16(dst + Sh::kStages * kKvBytes, v + off, live);
    }
  };
  fill_offsets(0, false);
  fill_offsets(1, false);
  __syncthreads();
  if (num_tiles > 0) load_kv(0, kv_stop);
  if (num_tiles > 2) fetch_ids(2);
  cp_async_commit();

  if constexpr (V::kHasQuery) {
    cp_async_wait<1>();
    __syncthreads();
    // Element d and its rotary partner d + D/2 are transformed together by one thread.
    for (unsigned c = threadIdx.x; c < TILE_Q * (D / 2); c += kThreads) {
      const unsigned r = c / (D / 2), d = c % (D / 2), pr = packed(r);
      const unsigned i = pr / group, h = kv_head * group + pr % group;
      const Pos at{b, i, 0, h, kv_head, qo_len, kp.total, D};
      unsigned short* x = sq.elem(r, d);
      unsigned short* y = sq.elem(r, d + D / 2);
      const float xv = load_elem<T>(x), yv = load_elem<T>(y);
      store_elem<T>(x, hook_query<V>(p, xv, yv, d, at));
      store_elem<T>(y, hook_query<V>(p, yv, xv, d + D / 2, at));
    }
  }

  const unsigned lane = lane_id(), warp = warp_id();
  const unsigned g = lane / 4, t4 = lane % 4;
  // This warp's rows and, with warps along the keys, its slice of every K/V tile.
  const unsigned row0 = (warp / kKvWarps) * kMmaQ * 16;
  const unsigned kv_warp = warp % kKvWarps;
  // ldmatrix row addresses of this lane (sm80/ldmatrix.cuh says which lane gives which row). Row r
  // of a fragment is r % 8 = lane % 8 in every case, so chunk c sits at c ^ (lane % 8): stepping
  // the logical chunk by 2n is an XOR of the address with 32n, and a step of 16 rows is an add.
  const unsigned q_lane = smem + (row0 + lane % 16) * kRowBytes + ((lane / 16) ^ (lane % 8)) * 16;
  const unsigned k_lane = ((lane / 16) * 8 + lane % 8) * kRowBytes +
                          (((lane / 8) % 2) ^ (lane % 8)) * 16;
  const unsigned v_lane = (((lane / 8) % 2) * 8 + lane % 8) * kRowBytes +
                          ((lane / 16) ^ (lane % 8)) * 16;
  // This thread's rows: fragment rows g and g + 8 of each 16-row block.
  // Query row and head of fragment row (mq, hf), recomputed where needed rather than held in
  // registers across the KV loop (the hook-free kernel needs them only in the epilogue).
  auto row_of = [&](int mq, int hf) { return packed(row0 + mq * 16 + g + 8 * hf); };

  float o[kMmaQ][kMmaD][4];
  float m[kMmaQ][2], z[kMmaQ][2];
  #pragma unroll
  for (int mq = 0; mq < kMmaQ; ++mq) {
    #pragma unroll
    for (int nd = 0; nd < kMmaD; ++nd) {
      #pragma unroll
      for (int e = 0; e < 4; ++e) o[mq][nd][e] = 0.0f;
    }
    #pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      m[mq][hf] = -FI_INF;
      z[mq][hf] = 0.0f;
    }
  }
  // A score s enters the softmax as x = core(s * pre) (variant/hooks.cuh: the logits hook split
  // around its scales; without a hook x = s), weighted 2^(x * post - max): sm_scale is in pre, or
  // in post without a logits hook, and log2(e) in post. Taken once per kernel, not per score.
  // The 16- and 64-row tiles run at 128 registers, where the split's two live scales spill
  // (SoftCap, head dim 128, 16 rows: 32 B): they call the whole hook, scaled by sm_scale alone.
  constexpr bool kSplit = V::kHasLogits && TILE_Q == 128;
  const float pre = kSplit ? a.sm_scale * hook_logits_pre<V>(p) : a.sm_scale;
  float post = !V::kHasLogits ? a.sm_scale : kSplit ? hook_logits_post<V>(p) : 1.0f;
  if constexpr (V::kSoftmax) post *= kLog2e;
  // A bounded logits core (soft-capping) small enough against post: no running row maximum
  // (variant/hooks.cuh, fixed_max), m stays 0. Split hooks only (the 128-row tile, one warp
  // along the keys).
  const bool fixed_m = kSplit && kKvWarps == 1 && fixed_max<V, kIsBf16<T>>(post);
  if (fixed_m) {
    #pragma unroll
    for (int mq = 0; mq < kMmaQ; ++mq) m[mq][0] = m[mq][1] = 0.0f;
  }
  // The 128-row tile runs the variant's mask only on tiles mask_keeps_tile does not clear; the
  // smaller tiles (128 registers, where its bounds spill 16 B) on every tile.
  constexpr bool kMaskEveryTile = V::kHasMask && TILE_Q != 128;
  MaskCuts<V> cuts;  // the tiles the variant's mask may cut, for this warp's rows and keys

  for (unsigned tile = 0; tile < num_tiles; ++tile) {
    const unsigned j0 = w.kv_start + tile * kCtaKv;
    cp_async_wait<0>();  // this tile's K and V (and tile + 2's ids) landed, issued a tile ago
    // Every warp is past tile - 1: its K/V stage and table slots are free for tile + 1 / + 2.
    __syncthreads();
    if (tile + 1 < num_tiles) load_kv(tile + 1, cta.kv_stop);
    if (tile + 3 < num_tiles) fetch_ids(tile + 3);
    cp_async_commit();
    if (tile + 2 < num_tiles) fill_offsets(tile + 2, true);
    if constexpr (V::kHasKey) {
      const SmemTile<kCtaKv, D> ks = sk(tile);
      const unsigned stop = cta.kv_stop, head = cta.kv_head, req = cta.request;
      const unsigned rows = cta.qo_len, len = cta.kv_total, off = cta.kv_offset;
      for (unsigned c = threadIdx.x; c < kCtaKv * (D / 2); c += kThreads) {
        const unsigned r = c / (D / 2), d = c % (D / 2), j = j0 + r;
        if (j >= stop) continue;
        const Pos at{req, 0, off + j, 0, head, rows, len, D};
        unsigned short* x = ks.elem(r, d);
        unsigned short* y = ks.elem(r, d + D / 2);
        const float xv = load_elem<T>(x), yv = load_elem<T>(y);
        store_elem<T>(x, hook_key<V>(p, xv, yv, d, at));
        store_elem<T>(y, hook_key<V>(p, yv, xv, d + D / 2, at));
      }
      __syncthreads();
    }
    // This warp's slice starts kv_warp * kTileKv rows (a multiple of 8: the swizzle is unchanged)
    // into the CTA tile, at key jw.
    const unsigned slice = kv_warp * kTileKv * kRowBytes;
    const unsigned k_tile = smem + Sh::kQBytes + (tile % 2) * kKvBytes + slice + k_lane;
    const unsigned v_tile =
        smem + Sh::kQBytes + (Sh::kStages + tile % 2) * kKvBytes + slice + v_lane;
    const unsigned jw = j0 + kv_warp * kTileKv;

    // S = Q K^T for this warp's rows and the tile's keys.
    float s[kMmaQ][kMmaKv][4];
    #pragma unroll
    for (int mq = 0; mq < kMmaQ; ++mq) {
      #pragma unroll
      for (int nb = 0; nb < kMmaKv; ++nb) {
        #pragma unroll
        for (int e = 0; e < 4; ++e) s[mq][nb][e] = 0.0f;
      }
    }
    #pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      unsigned qa[kMmaQ][4];
      #pragma unroll
      for (int mq = 0; mq < kMmaQ; ++mq) {
        ldmatrix_x4(qa[mq], (q_lane ^ (kk * 32)) + mq * 16 * kRowBytes);
      }
      #pragma unroll
      for (int nbp = 0; nbp < kMmaKv / 2; ++nbp) {
        unsigned kb[4];
        ldmatrix_x4(kb, (k_tile ^ (kk * 32)) + nbp * 16 * kRowBytes);
        #pragma unroll
        for (int mq = 0; mq < kMmaQ; ++mq) {
          mma_16816<T>(s[mq][2 * nbp], qa[mq], kb[0], kb[1]);
          mma_16816<T>(s[mq][2 * nbp + 1], qa[mq], kb[2], kb[3]);
        }
      }
    }

    // Logits (base 2 with softmax), masks and the online softmax. Each call below passes constant
    // flags, so each inlines to its own specialisation:
    // `boundary`: the tile crosses the chunk end or a row's diagonal, or the variant's mask may
    // cut this warp's part of it, so the causal mask, the key bound and the variant's mask are
    // tested (interior tiles have no mask code at all; the variant's mask is called only for keys
    // the others keep).
    // `fold`: x stays unscaled by post until the exponent, where x * post - m is one FFMA (a
    // masked -inf stays -inf). The row max commutes with post only when it is positive; otherwise
    // x is scaled first. `fixed` (with fold off): the exponent is x with no maximum (fixed_m).
    auto logits_softmax = [&](const bool fold, const bool boundary, const bool fixed) {
      #pragma unroll
      for (int mq = 0; mq < kMmaQ; ++mq) {
        #pragma unroll
        for (int nb = 0; nb < kMmaKv; ++nb) {
          #pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int hf = e / 2;
            const unsigned j = jw + nb * 8 + 2 * t4 + (e & 1);
            const float raw = s[mq][nb][e];
            float x = V::kHasLogits ? raw * pre : fold ? raw : raw * post;
            bool keep = true;
            if (boundary) {
              // The row's last causally visible key (may be negative).
              const int diag = static_cast<int>(row_of(mq, hf) / group) + cta.shift;
              // Bitwise: predicated selects rather than a branch per element.
              keep = (j < cta.kv_stop) & (!causal | (static_cast<int>(j) <= diag));
            }
            const unsigned pr = row_of(mq, hf);
            const unsigned h = kv_head * group + pr % group;
            const Pos at{b, pr / group, kp.offset + j, h, kv_head, qo_len, kp.total, D};
            if constexpr (V::kHasMask) {
              if (boundary || kMaskEveryTile) keep = keep && hook_mask<V>(p, at);
            }
            if constexpr (V::kHasLogits) {
              if (keep) {
                x = kSplit ? hook_logits_core<V>(p, x, at) : hook_logits<V>(p, x, at);
                if (!fold) x *= post;
              }
            }
            if (boundary || kMaskEveryTile) x = keep ? x : (V::kSoftmax ? -FI_INF : 0.0f);
            s[mq][nb][e] = x;
          }
        }
      }

      if (V::kSoftmax && fixed) {
        #pragma unroll
        for (int mq = 0; mq < kMmaQ; ++mq) {
          #pragma unroll
          for (int hf = 0; hf < 2; ++hf) {
            float sum = 0.0f;
            #pragma unroll
            for (int nb = 0; nb < kMmaKv; ++nb) {
              #pragma unroll
              for (int e = 2 * hf; e < 2 * hf + 2; ++e) {
                s[mq][nb][e] = exp2_approx(s[mq][nb][e]);
                sum += s[mq][nb][e];
              }
            }
            z[mq][hf] += sum;
          }
        }
      } else if constexpr (V::kSoftmax) {
        float scale[kMmaQ][2];
        bool grew = false;
        #pragma unroll
        for (int mq = 0; mq < kMmaQ; ++mq) {
          #pragma unroll
          for (int hf = 0; hf < 2; ++hf) {
            float mx = fold ? -FI_INF : m[mq][hf];
            #pragma unroll
            for (int nb = 0; nb < kMmaKv; ++nb) {
              mx = fmaxf(mx, fmaxf(s[mq][nb][2 * hf], s[mq][nb][2 * hf + 1]));
            }
            mx = fmaxf(mx, __shfl_xor_sync(kFullMask, mx, 1));
            mx = fmaxf(mx, __shfl_xor_sync(kFullMask, mx, 2));
            if (fold) mx = fmaxf(m[mq][hf], mx * post);
            // No next_max slack here (FA3's, epilogue.cuh): at head dim 128's 128-row tile FA2 ran
            // 9% slower with it on single prompts (kernels/notes/prefill.md, session 19).
            // While nothing is visible the max is -inf; 0 stands in so that no -inf - -inf appears.
            const float base = mx == -FI_INF ? 0.0f : mx;
            scale[mq][hf] = exp2_approx(m[mq][hf] - base);
            grew = grew || mx != m[mq][hf];
            m[mq][hf] = mx;
            float sum = 0.0f;
            #pragma unroll
            for (int nb = 0; nb < kMmaKv; ++nb) {
              #pragma unroll
              for (int e = 2 * hf; e < 2 * hf + 2; ++e) {
                s[mq][nb][e] = exp2_approx(fold ? fmaf(s[mq][nb][e], post, -base)
                                                 : s[mq][nb][e] - base);
                sum += s[mq][nb][e];
              }
            }
            // Each thread sums its own columns; the row's four threads add up at the end.
            z[mq][hf] = z[mq][hf] * scale[mq][hf] + sum;
          }
        }
        // Once the row maxima settle (most tiles of a long row), no output needs rescaling.
        if (__any_sync(kFullMask, grew)) {
          #pragma unroll
          for (int mq = 0; mq < kMmaQ; ++mq) {
            #pragma unroll
            for (int nd = 0; nd < kMmaD; ++nd) {
              #pragma unroll
              for (int e = 0; e < 4; ++e) o[mq][nd][e] *= scale[mq][e / 2];
            }
          }
        }
      }
    };
    // The variant's mask runs per score on the warp's tiles it may cut, and on no others (on
    // every tile with kMaskEveryTile).
    bool cut = false;
    if constexpr (!kMaskEveryTile) {
      cut = cuts.may_cut(tile, p, b, packed(row0), packed(row0 + kMmaQ * 16 - 1), group, kv_head,
                         kp.offset + w.kv_start + kv_warp * kTileKv, kCtaKv, kTileKv, qo_len,
                         kp.total, D);
    }
    const bool boundary = tile >= first_masked || cut;
    // Only the 128-row tile takes the folded copies: it was measured there (+1-3%), and the
    // smaller tiles' 128-register allocations spill with both. Not with a logits hook: its
    // copies were not measured (the FA3 template folds those).
    if constexpr (kSplit && V::kSoftmax && kLogitsCoreBound<V> > 0.0f) {
      // A bounded core: the copies without a maximum, or the unfolded ones (FA3's choice).
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
    } else if constexpr (!V::kHasLogits && V::kSoftmax && TILE_Q == 128) {
      if (post > 0.0f) {
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

    // O += P V, P rounded to the storage type as the MMA needs.
    #pragma unroll
    for (int kk = 0; kk < kTileKv / 16; ++kk) {
      unsigned pa[kMmaQ][4];
      #pragma unroll
      for (int mq = 0; mq < kMmaQ; ++mq) {
        pa[mq][0] = pack2<T>(s[mq][2 * kk][0], s[mq][2 * kk][1]);
        pa[mq][1] = pack2<T>(s[mq][2 * kk][2], s[mq][2 * kk][3]);
        pa[mq][2] = pack2<T>(s[mq][2 * kk + 1][0], s[mq][2 * kk + 1][1]);
        pa[mq][3] = pack2<T>(s[mq][2 * kk + 1][2], s[mq][2 * kk + 1][3]);
      }
      #pragma unroll
      for (int ndp = 0; ndp < kMmaD / 2; ++ndp) {
        unsigned vb[4];
        ldmatrix_x4_trans(vb, (v_tile ^ (ndp * 32)) + kk * 16 * kRowBytes);
        #pragma unroll
        for (int mq = 0; mq < kMmaQ; ++mq) {
          mma_16816<T>(o[mq][2 * ndp], pa[mq], vb[0], vb[1]);
          mma_16816<T>(o[mq][2 * ndp + 1], pa[mq], vb[2], vb[3]);
        }
      }
    }
  }
  cp_async_wait<0>();

  if constexpr (kKvWarps > 1) {
    // Warps along the keys: each holds (m, z, O) of the 16 rows over its own key slices. Every
    // thread's copies have landed (cp_async_wait<0> above, and the last tile issued none), and
    // past this barrier no warp reads the K/V stages again: they take the warps' states.
    __syncthreads();
    constexpr int kStride = Sh::kMergeStride;
    float* const mo = reinterpret_cast<float*>(kv_smem);  // [kKvWarps][16][kStride]
    float* const mm = mo + kKvWarps * 16 * kStride;  // [kKvWarps][16]
    float* const mz = mm + kKvWarps * 16;  // [kKvWarps][16]
    #pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      const unsigned r = g + 8 * hf;
      // m is the same on the row's four threads; each holds a part of z.
      float zz = z[0][hf];
      zz += __shfl_xor_sync(kFullMask, zz, 1);
      zz += __shfl_xor_sync(kFullMask, zz, 2);
      if (t4 == 0) {
        mm[kv_warp * 16 + r] = m[0][hf];
        mz[kv_warp * 16 + r] = zz;
      }
      float* const row = mo + (kv_warp * 16 + r) * kStride + 2 * t4;
      #pragma unroll
      for (int nd = 0; nd < kMmaD; ++nd) {
        *reinterpret_cast<float2*>(row + nd * 8) =
            make_float2(o[0][nd][2 * hf], o[0][nd][2 * hf + 1]);
      }
    }
    __syncthreads();
    // Warp kv_warp merges and writes its kCols 8-column blocks of every row: rescaled to the
    // largest m (softmax) or summed as they are (softmax off), then the epilogue (epilogue.cuh)
    // once per row and element: sink, normalisation, output hook, o and lse; or a split item's
    // partial and LSE.
    constexpr int kCols = kMmaD / kKvWarps;
    const unsigned col0 = kv_warp * kCols * 8 + 2 * t4;
    const bool split = w.partial >= 0;
    #pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      const unsigned r = g + 8 * hf;
      float mx = -FI_INF;
      #pragma unroll
      for (int k = 0; k < kKvWarps; ++k) mx = fmaxf(mx, mm[k * 16 + r]);
      // While no warp saw a key the max is -inf; 0 stands in so that no -inf - -inf appears.
      const float base = mx == -FI_INF ? 0.0f : mx;
      float zz = 0.0f;
      float acc[kCols][2];
      #pragma unroll
      for (int c = 0; c < kCols; ++c) acc[c][0] = acc[c][1] = 0.0f;
      #pragma unroll
      for (int k = 0; k < kKvWarps; ++k) {
        float wt = 1.0f;
        if constexpr (V::kSoftmax) {
          wt = exp2_approx(mm[k * 16 + r] - base);
          zz += mz[k * 16 + r] * wt;
        }
        const float* const row = mo + (k * 16 + r) * kStride + col0;
        #pragma unroll
        for (int c = 0; c < kCols; ++c) {
          const float2 x = *reinterpret_cast<const float2*>(row + c * 8);
          acc[c][0] = fmaf(wt, x.x, acc[c][0]);
          acc[c][1] = fmaf(wt, x.y, acc[c][1]);
        }
      }
      if (w.qo_tile_start + r >= w.qo_tile_end) continue;
      const unsigned pr = packed(r);
      const unsigned i = pr / group, h = kv_head * group + pr % group;
      const Pos at{b, i, 0, h, kv_head, qo_len, kp.total, D};
      const auto end = finish_row<V>(p, mx, zz, at, !split);
      const float lse = end.lse();
      if (!split) {
        T* dst = out_row<T>(a, qo_begin + i, h);
        #pragma unroll
        for (int c = 0; c < kCols; ++c) {
          const unsigned d = col0 + c * 8;
          const float x0 = out_elem<V>(p, acc[c][0], end, d, at);
          const float x1 = out_elem<V>(p, acc[c][1], end, d + 1, at);
          *reinterpret_cast<unsigned*>(dst + d) = pack2<T>(x0, x1);
        }
        if (kv_warp == 0 && t4 == 0) write_lse(a, qo_begin + i, h, lse);
      } else {
        const unsigned long long prow = partial_row(w.partial, i);
        float* dst = partial_out<D>(a, prow, h);
        #pragma unroll
        for (int c = 0; c < kCols; ++c) store_partial<2>(dst + col0 + c * 8, acc[c], end);
        if (kv_warp == 0 && t4 == 0) write_partial_lse<V::kSoftmax>(a, prow, h, lse);
      }
    }
  } else {
    // Epilogue (epilogue.cuh): unsplit items add the sink, normalise, apply the output hook and
    // write o and lse; split items write their chunk's normalised partial and LSE for the merge.
    const bool split = w.partial >= 0;
    #pragma unroll
    for (int mq = 0; mq < kMmaQ; ++mq) {
      #pragma unroll
      for (int hf = 0; hf < 2; ++hf) {
        float zz = z[mq][hf];
        zz += __shfl_xor_sync(kFullMask, zz, 1);
        zz += __shfl_xor_sync(kFullMask, zz, 2);
        // Padding rows (which repeat the last real row) go through the shuffles of the store and
        // write nothing.
        const bool live = w.qo_tile_start + row0 + mq * 16 + g + 8 * hf < w.qo_tile_end;
        const unsigned pr = row_of(mq, hf);
        const unsigned i = pr / group, h = kv_head * group + pr % group;
        const Pos at{b, i, 0, h, kv_head, qo_len, kp.total, D};
        // One end for both branches, and the LSE taken ahead of them: so written, ptxas keeps the
        // 128-row tiles' registers and spills as they were before the shared epilogue.
        // Without a maximum (fixed_m) a row that saw no key has z = 0: its m is -inf as online.
        const float mh = fixed_m && zz == 0.0f ? -FI_INF : m[mq][hf];
        const auto end = finish_row<V>(p, mh, zz, at, !split);
        const float lse = end.lse();
        if (!split) {
          unsigned pairs[kMmaD];
          #pragma unroll
          for (int nd = 0; nd < kMmaD; ++nd) {
            const unsigned d = nd * 8 + 2 * t4;
            const float x0 = out_elem<V>(p, o[mq][nd][2 * hf], end, d, at);
            const float x1 = out_elem<V>(p, o[mq][nd][2 * hf + 1], end, d + 1, at);
            pairs[nd] = pack2<T>(x0, x1);
          }
          store_row_by_quad<T, D>(out_row<T>(a, qo_begin + i, h), pairs, t4, live);
          if (live && t4 == 0) write_lse(a, qo_begin + i, h, lse);
        } else if (live) {
          const unsigned long long prow = partial_row(w.partial, i);
          float* dst = partial_out<D>(a, prow, h);
          #pragma unroll
          for (int nd = 0; nd < kMmaD; ++nd) {
            const float pair[2] = {o[mq][nd][2 * hf], o[mq][nd][2 * hf + 1]};
            store_partial<2>(dst + nd * 8 + 2 * t4, pair, end);
          }
          if (t4 == 0) write_partial_lse<V::kSoftmax>(a, prow, h, lse);
        }
      }
    }
  }
}

}  // namespace fi
