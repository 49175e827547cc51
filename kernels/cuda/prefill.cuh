// Prefill and append, FlashAttention-2 style for sm_80+ (it also serves Hopper until an FA3 path
// exists). One CTA per work item of the plan: a tile of TILE_Q packed query rows (GQA heads packed
// into the rows, see plan.rs) of one request and KV head, over one KV chunk. Q stays in shared
// memory; K and V tiles of kTileKv keys stream through two stages with cp.async, so tile t + 1
// loads during all of tile t (one barrier per tile); key offsets come from a per-tile table. S, O
// live in registers as mma.sync m16n8k16 fragments (mma.cuh); the online softmax runs in base 2.
// Launch: grid num_items, block PrefillShape::kThreads, dynamic shared PrefillShape::kSmemBytes
// (kernels/src/prefill.rs mirrors these).
#pragma once
#include "abi.cuh"
#include "cp_async.cuh"
#include "dtype.cuh"
#include "hooks.cuh"
#include "kv.cuh"
#include "mma.cuh"
#include "work.cuh"
#include "smem.cuh"
#include "warp.cuh"

namespace fi {

// Warps of a 64-row tile; kernels/src/prefill.rs has the same number.
constexpr unsigned kPrefillWarps = 4;

template <int D, int TILE_Q>
struct PrefillShape {
  static_assert(TILE_Q == 16 || TILE_Q == 64 || TILE_Q == 128, "query tile of 16, 64 or 128 rows");
  // One warp per 16 rows, at most kPrefillWarps; at head dim 256 a warp cannot hold two 16-row
  // output blocks (256 f32 registers), so a 128-row tile gets 8 warps instead.
  static constexpr int kWarps =
      (D == 256 || TILE_Q / 16 < int(kPrefillWarps)) ? TILE_Q / 16 : int(kPrefillWarps);
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kMmaQ = TILE_Q / (16 * kWarps);  // 16-row blocks per warp
  // Keys per K/V tile (a multiple of 16, see plan.rs). Two 16-row blocks per warp at head dim
  // 128 hold 128 f32 outputs per thread; 32 keys keep S at 32 more, within 255 registers. Two
  // stages of 32 keys also keep hd >= 128 within the shared memory of an sm_80 SM.
  static constexpr int kTileKv = D >= 128 ? 32 : 64;
  static constexpr int kMmaKv = kTileKv / 8;  // 8-key blocks of S
  static constexpr int kMmaD = D / 8;  // 8-column blocks of O
  static constexpr int kChunks = D / 8;  // 16-byte chunks per row
  static constexpr int kStages = 2;  // K/V tiles in shared memory: this one and the next
  // Element offsets of the keys of two KV tiles, one per key.
  static constexpr int kTableBytes = 2 * kTileKv * 8;
  static constexpr int kSmemBytes = (TILE_Q + 2 * kStages * kTileKv) * D * 2 + kTableBytes;
};

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

template <class V, class P, class T, int D, int TILE_Q>
__device__ void prefill(const AttnArgs& a, const P& p) {
  using Sh = PrefillShape<D, TILE_Q>;
  constexpr int kTileKv = Sh::kTileKv, kMmaQ = Sh::kMmaQ, kMmaKv = Sh::kMmaKv;
  constexpr int kMmaD = Sh::kMmaD, kChunks = Sh::kChunks, kThreads = Sh::kThreads;

  const WorkItem w = work_item(a.work, blockIdx.x);
  if (!w.valid) return;  // the whole CTA: padding of the work list

  extern __shared__ __attribute__((aligned(16))) unsigned char prefill_smem[];
  const SmemTile<TILE_Q, D> sq{prefill_smem};
  // K/V tile t lives in stage t % 2: K stages, then V stages.
  constexpr int kKvBytes = SmemTile<kTileKv, D>::kBytes;
  unsigned char* const kv_smem = prefill_smem + SmemTile<TILE_Q, D>::kBytes;
  auto sk = [&](unsigned tile) { return SmemTile<kTileKv, D>{kv_smem + (tile % 2) * kKvBytes}; };
  auto sv = [&](unsigned tile) {
    return SmemTile<kTileKv, D>{kv_smem + (Sh::kStages + tile % 2) * kKvBytes};
  };
  // Tile t's key offsets live in slot t % 2: written one tile ahead, read when K(t), V(t) load.
  unsigned long long* const key_off =
      reinterpret_cast<unsigned long long*>(kv_smem + 2 * Sh::kStages * kKvBytes);

  const unsigned b = w.request, kv_head = w.kv_head;
  const unsigned qo_begin = static_cast<unsigned>(a.qo_indptr[b]);
  const unsigned qo_len = static_cast<unsigned>(a.qo_indptr[b + 1]) - qo_begin;
  const unsigned group = a.num_qo_heads / a.num_kv_heads;
  const KvSeq kv = kv_seq(a, b);
  const bool causal = a.causal != 0;
  // Key j is causally visible to query row i iff j <= i + shift.
  const long long shift = static_cast<long long>(kv.len) - qo_len;

  // Keys past the last row's diagonal are hidden from every row: those tiles are skipped.
  unsigned kv_stop = w.kv_end;
  if (causal) {
    const long long end = static_cast<long long>((w.qo_tile_end - 1) / group) + shift + 1;
    if (end < static_cast<long long>(kv_stop)) {
      kv_stop = end < static_cast<long long>(w.kv_start) ? w.kv_start : static_cast<unsigned>(end);
    }
  }
  // Tiles wholly at or below the first row's diagonal need no causal mask.
  const long long first_diag = static_cast<long long>(w.qo_tile_start / group) + shift;
  const unsigned num_tiles = (kv_stop - w.kv_start + kTileKv - 1) / kTileKv;

  // Padding rows of a partial tile repeat the last real row: every hook sees a real position, and
  // their results are never written.
  auto packed = [&](unsigned r) { return min(w.qo_tile_start + r, w.qo_tile_end - 1); };

  // Prologue: Q, then K and V of tile 0, two commit groups.
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

  const T* k = static_cast<const T*>(a.k);
  const T* v = static_cast<const T*>(a.v);
  // One page lookup per key and tile (not per 16-byte chunk): the block division and the index
  // load run once, and every chunk copy is a table read and an add. Keys at or past kv_stop get
  // offset 0 (a valid address, never read).
  // The addressing parameters wait in shared memory, not in registers, between the once-a-tile
  // table fills (the 128-row tile has none to spare).
  __shared__ KvSeq kv_shared;
  __shared__ unsigned kv_range[5];  // kv_start, kv_stop, kv_head, request, qo_len (key hook)
  if (threadIdx.x == 0) {
    kv_shared = kv;
    kv_range[0] = w.kv_start;
    kv_range[1] = kv_stop;
    kv_range[2] = kv_head;
    kv_range[3] = b;
    kv_range[4] = qo_len;
  }
  auto fill_offsets = [&](unsigned tile, const KvSeq& seq, unsigned start, unsigned stop,
                          unsigned head) {
    const unsigned j0 = start + tile * kTileKv;
    unsigned long long* const slot = key_off + (tile % 2) * kTileKv;
    for (unsigned r = threadIdx.x; r < kTileKv; r += kThreads) {
      const unsigned j = j0 + r;
      slot[r] = j < stop ? seq.offset(j, head) : 0ull;
    }
  };
  // Keys at or past kv_stop are zero-filled: P is 0 there, and 0 * V must not be NaN.
  auto load_kv = [&](unsigned tile) {
    const unsigned j0 = w.kv_start + tile * kTileKv;
    const unsigned long long* const slot = key_off + (tile % 2) * kTileKv;
    const SmemTile<kTileKv, D> dk = sk(tile), dv = sv(tile);
    #pragma unroll 1
    for (int it = 0; it < kTileKv * kChunks / kThreads; ++it) {
      const unsigned c = it * kThreads + threadIdx.x;
      const unsigned r = c / kChunks, ch = c % kChunks;
      const unsigned long long off = slot[r] + ch * 8;
      const bool live = j0 + r < kv_stop;
      cp_async_16(dk.addr(r, ch), k + off, live);
      cp_async_16(dv.addr(r, ch), v + off, live);
    }
  };
  if (num_tiles > 0) fill_offsets(0, kv, w.kv_start, kv_stop, kv_head);
  if (num_tiles > 1) fill_offsets(1, kv, w.kv_start, kv_stop, kv_head);
  __syncthreads();
  if (num_tiles > 0) load_kv(0);
  cp_async_commit();

  if constexpr (V::kHasQuery) {
    cp_async_wait<1>();
    __syncthreads();
    // Element d and its rotary partner d + D/2 are transformed together by one thread.
    for (unsigned c = threadIdx.x; c < TILE_Q * (D / 2); c += kThreads) {
      const unsigned r = c / (D / 2), d = c % (D / 2), pr = packed(r);
      const unsigned i = pr / group, h = kv_head * group + pr % group;
      const Pos at{b, i, 0, h, kv_head, qo_len, kv.len, D};
      unsigned short* x = sq.elem(r, d);
      unsigned short* y = sq.elem(r, d + D / 2);
      const float xv = load_elem<T>(x), yv = load_elem<T>(y);
      store_elem<T>(x, hook_query<V>(p, xv, yv, d, at));
      store_elem<T>(y, hook_query<V>(p, yv, xv, d + D / 2, at));
    }
  }

  const unsigned lane = lane_id(), warp = warp_id();
  const unsigned g = lane / 4, t4 = lane % 4;
  const unsigned row0 = warp * kMmaQ * 16;
  // This thread's rows: fragment rows g and g + 8 of each 16-row block.
  // Query row and head of fragment row (mq, hf), recomputed where needed rather than held in
  // registers across the KV loop (the hook-free kernel needs them only in the epilogue).
  auto row_of = [&](int mq, int hf) { return packed(row0 + mq * 16 + g + 8 * hf); };
  int row_diag[kMmaQ][2];  // last causally visible key (may be negative)
  #pragma unroll
  for (int mq = 0; mq < kMmaQ; ++mq) {
    #pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      row_diag[mq][hf] = static_cast<int>(row_of(mq, hf) / group + shift);
    }
  }

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
  // Without a logits hook, sm_scale and log2(e) fold into one multiply.
  const float qk_scale = (V::kHasLogits || !V::kSoftmax) ? a.sm_scale : a.sm_scale * kLog2e;

  for (unsigned tile = 0; tile < num_tiles; ++tile) {
    const unsigned j0 = w.kv_start + tile * kTileKv;
    const SmemTile<kTileKv, D> ks = sk(tile), vs = sv(tile);
    cp_async_wait<0>();  // this tile's K and V landed (issued one tile ago)
    // Every warp is past tile - 1: its K/V stage and offset slot are free for tile + 1 / + 2.
    __syncthreads();
    if (tile + 1 < num_tiles) load_kv(tile + 1);
    cp_async_commit();
    if (tile + 2 < num_tiles) {
      fill_offsets(tile + 2, kv_shared, kv_range[0], kv_range[1], kv_range[2]);
    }
    if constexpr (V::kHasKey) {
      const unsigned stop = kv_range[1], head = kv_range[2], req = kv_range[3];
      const unsigned rows = kv_range[4], len = kv_shared.len;
      for (unsigned c = threadIdx.x; c < kTileKv * (D / 2); c += kThreads) {
        const unsigned r = c / (D / 2), d = c % (D / 2), j = j0 + r;
        if (j >= stop) continue;
        const Pos at{req, 0, j, 0, head, rows, len, D};
        unsigned short* x = ks.elem(r, d);
        unsigned short* y = ks.elem(r, d + D / 2);
        const float xv = load_elem<T>(x), yv = load_elem<T>(y);
        store_elem<T>(x, hook_key<V>(p, xv, yv, d, at));
        store_elem<T>(y, hook_key<V>(p, yv, xv, d + D / 2, at));
      }
      __syncthreads();
    }

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
        ldmatrix_x4(qa[mq], sq.addr(row0 + mq * 16 + lane % 16, kk * 2 + lane / 16));
      }
      #pragma unroll
      for (int nbp = 0; nbp < kMmaKv / 2; ++nbp) {
        unsigned kb[4];
        ldmatrix_x4(kb, ks.addr(nbp * 16 + (lane / 16) * 8 + lane % 8, kk * 2 + (lane / 8) % 2));
        #pragma unroll
        for (int mq = 0; mq < kMmaQ; ++mq) {
          mma_16816<T>(s[mq][2 * nbp], qa[mq], kb[0], kb[1]);
          mma_16816<T>(s[mq][2 * nbp + 1], qa[mq], kb[2], kb[3]);
        }
      }
    }

    // Logits (base 2 with softmax) and masks. The causal mask and the chunk end are tested only
    // on boundary tiles; the variant's mask on every tile, and only for keys they keep.
    const bool boundary =
        j0 + kTileKv > kv_stop || (causal && static_cast<long long>(j0 + kTileKv - 1) > first_diag);
    // `fold`: without a logits hook the logits stay unscaled until the exponent, where
    // s * qk_scale - m is one FFMA (a masked -inf stays -inf). The row max commutes with the
    // scale only when it is positive; otherwise the logits are scaled first. Called with a
    // constant argument, so each call inlines to its own specialisation.
    auto logits_softmax = [&](const bool fold) {
      #pragma unroll
      for (int mq = 0; mq < kMmaQ; ++mq) {
        #pragma unroll
        for (int nb = 0; nb < kMmaKv; ++nb) {
          #pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int hf = e / 2;
            const unsigned j = j0 + nb * 8 + 2 * t4 + (e & 1);
            float x = fold ? s[mq][nb][e] : s[mq][nb][e] * qk_scale;
            bool keep = true;
            if (boundary) {
              keep = j < kv_stop && (!causal || static_cast<int>(j) <= row_diag[mq][hf]);
            }
            const unsigned pr = row_of(mq, hf);
            const unsigned h = kv_head * group + pr % group;
            const Pos at{b, pr / group, j, h, kv_head, qo_len, kv.len, D};
            if constexpr (V::kHasMask) keep = keep && hook_mask<V>(p, at);
            if constexpr (V::kHasLogits) {
              if (keep) {
                x = hook_logits<V>(p, x, at);
                if constexpr (V::kSoftmax) x *= kLog2e;
              }
            }
            s[mq][nb][e] = keep ? x : (V::kSoftmax ? -FI_INF : 0.0f);
          }
        }
      }

      if constexpr (V::kSoftmax) {
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
            if (fold) mx = fmaxf(m[mq][hf], mx * qk_scale);
            // While nothing is visible the max is -inf; 0 stands in so that no -inf - -inf appears.
            const float base = mx == -FI_INF ? 0.0f : mx;
            const float scale = exp2_approx(m[mq][hf] - base);
            m[mq][hf] = mx;
            float sum = 0.0f;
            #pragma unroll
            for (int nb = 0; nb < kMmaKv; ++nb) {
              #pragma unroll
              for (int e = 2 * hf; e < 2 * hf + 2; ++e) {
                s[mq][nb][e] = exp2_approx(fold ? fmaf(s[mq][nb][e], qk_scale, -base)
                                                 : s[mq][nb][e] - base);
                sum += s[mq][nb][e];
              }
            }
            // Each thread sums its own columns; the row's four threads add up at the end.
            z[mq][hf] = z[mq][hf] * scale + sum;
            #pragma unroll
            for (int nd = 0; nd < kMmaD; ++nd) {
              o[mq][nd][2 * hf] *= scale;
              o[mq][nd][2 * hf + 1] *= scale;
            }
          }
        }
      }
    };
    // Only the 128-row tile takes the second copy: it was measured there (+1-3%), and the
    // smaller tiles' 128-register allocations spill with both copies.
    if constexpr (!V::kHasLogits && V::kSoftmax && TILE_Q == 128) {
      if (qk_scale > 0.0f) {
        logits_softmax(true);
      } else {
        logits_softmax(false);
      }
    } else {
      logits_softmax(false);
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
        ldmatrix_x4_trans(vb, vs.addr(kk * 16 + ((lane / 8) % 2) * 8 + lane % 8, ndp * 2 + lane / 16));
        #pragma unroll
        for (int mq = 0; mq < kMmaQ; ++mq) {
          mma_16816<T>(o[mq][2 * ndp], pa[mq], vb[0], vb[1]);
          mma_16816<T>(o[mq][2 * ndp + 1], pa[mq], vb[2], vb[3]);
        }
      }
    }
  }
  cp_async_wait<0>();

  // Epilogue: unsplit items add the sink, normalise, apply the output hook and write o and lse;
  // split items write their chunk's normalised partial and LSE for the merge (no sink, no hook).
  const bool split = w.partial >= 0;
  #pragma unroll
  for (int mq = 0; mq < kMmaQ; ++mq) {
    #pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      float zz = z[mq][hf];
      zz += __shfl_xor_sync(kFullMask, zz, 1);
      zz += __shfl_xor_sync(kFullMask, zz, 2);
      if (w.qo_tile_start + row0 + mq * 16 + g + 8 * hf >= w.qo_tile_end) continue;
      const unsigned pr = row_of(mq, hf);
      const unsigned i = pr / group, h = kv_head * group + pr % group;
      const Pos at{b, i, 0, h, kv_head, qo_len, kv.len, D};
      float mm = m[mq][hf], scale = 1.0f;
      if constexpr (V::kSoftmax && V::kHasSink) {
        const float sink = hook_sink<V>(p, at) * kLog2e;
        if (!split && sink != -FI_INF) {
          const float mn = fmaxf(mm, sink);
          scale = exp2_approx(mm - mn);
          zz = zz * scale + exp2_approx(sink - mn);
          mm = mn;
        }
      }
      const bool empty = V::kSoftmax && mm == -FI_INF;
      const float norm = !V::kSoftmax ? 1.0f : empty ? 0.0f : scale / zz;
      const float lse = !V::kSoftmax ? __int_as_float(0x7fc00000)
                        : empty      ? -FI_INF
                                     : (mm + log2f(zz)) * kLn2;
      if (!split) {
        T* dst = static_cast<T*>(a.o) + (qo_begin + i) * a.o_stride_n + h * a.o_stride_h;
        #pragma unroll
        for (int nd = 0; nd < kMmaD; ++nd) {
          const unsigned d = nd * 8 + 2 * t4;
          const float x0 = hook_output<V>(p, o[mq][nd][2 * hf] * norm, d, at);
          const float x1 = hook_output<V>(p, o[mq][nd][2 * hf + 1] * norm, d + 1, at);
          *reinterpret_cast<unsigned*>(dst + d) = pack2<T>(x0, x1);
        }
        if (a.lse != nullptr && t4 == 0) {
          a.lse[static_cast<unsigned long long>(qo_begin + i) * a.num_qo_heads + h] = lse;
        }
      } else {
        const unsigned long long prow = static_cast<unsigned long long>(w.partial) + i;
        float* dst = a.partial_o + (prow * a.num_qo_heads + h) * D;
        #pragma unroll
        for (int nd = 0; nd < kMmaD; ++nd) {
          const unsigned d = nd * 8 + 2 * t4;
          dst[d] = o[mq][nd][2 * hf] * norm;
          dst[d + 1] = o[mq][nd][2 * hf + 1] * norm;
        }
        if (V::kSoftmax && t4 == 0) a.partial_lse[prow * a.num_qo_heads + h] = lse;
      }
    }
  }
}

}  // namespace fi
