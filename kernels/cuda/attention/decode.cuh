// Batch decode over the plan's work list (ferrinfer_runtime::attention::plan): one CTA per item =
// one request, one KV head, a range of packed rows (the group's query heads of its query rows) and
// one KV chunk. Each key and value of the chunk is read from memory once per item, whatever the
// group size, through a kDecodeStages-deep cp.async pipeline of shared-memory tiles.
//
// Thread layout: a worker is kLanes = D / 8 consecutive lanes, each holding 8 elements (16 bytes)
// of a row. With `rows` packed rows in a pass, worker w takes row w % rows and every `ways`-th key
// of each tile from w / rows on (ways = workers / rows); the ways merge in shared memory at the
// end. More rows than workers (groups above 2048 / D, or several query rows) take several passes.
// Launch: grid (num_items), block kDecodeThreads (kernels/src/decode.rs launch_dims); static
// shared memory.
#pragma once
#include "core/abi.cuh"
#include "core/grid_order.cuh"
#include "core/math.cuh"
#include "core/warp.cuh"
#include "sm80/cp_async.cuh"
#include "variant/hooks.cuh"
#include "attention/causal.cuh"
#include "attention/decode_vec.cuh"
#include "attention/epilogue.cuh"
#include "attention/kv.cuh"
#include "attention/work.cuh"

namespace fi {

constexpr unsigned kDecodeMaxWarps = 4;
// Query rows per worker: K and V are converted once for all of them.
constexpr unsigned kDecodeRows = 4;
constexpr unsigned kDecodeThreads = kDecodeMaxWarps * kWarpSize;
// CTAs per SM the plan counts on (runtime wrappers.rs ctas_per_sm), a __launch_bounds__ minimum.
constexpr unsigned kDecodeMinCtas = 4;  // 128 registers per thread
// Tiles in flight: three loading while one is computed, 8 KiB each (K and V).
constexpr unsigned kDecodeStages = 4;

template <int D>
struct DecodeShape {
  static constexpr unsigned kLanes = D / 8;  // lanes per row, 16 bytes each
  static constexpr unsigned kWorkers = kDecodeThreads / kLanes;
  // Keys per tile (4 KiB of K and of V): every thread copies kCopies 16-byte chunks of each.
  static constexpr unsigned kTile = 2048 / D;
  static constexpr unsigned kChunks = kTile * kLanes;
  static constexpr unsigned kCopies = kChunks / kDecodeThreads;
};

// Butterfly sums of two values over the L lanes of one worker (bitwise the same on each lane).
template <unsigned L>
__device__ __forceinline__ void worker_sum2(float& x, float& y, unsigned mask) {
  #pragma unroll
  for (unsigned o = L / 2; o > 0; o /= 2) {
    x += __shfl_xor_sync(mask, x, o);
    y += __shfl_xor_sync(mask, y, o);
  }
}

template <unsigned L>
__device__ __forceinline__ unsigned worker_mask() {
  if constexpr (L >= kWarpSize) {
    return kFullMask;
  } else {
    return ((1u << L) - 1) << (lane_id() / L * L);
  }
}

// Page-table lookups of one request: key j is slot `slot(j)` of block `blocks[page(j)]`.
struct DecodePager {
  const int* blocks;
  unsigned block_size;  // 0: ragged
  int shift;  // log2(block_size) when it is a power of two, else -1

  __device__ __forceinline__ unsigned page(unsigned j) const {
    if (block_size == 0) return 0;
    return shift >= 0 ? j >> shift : j / block_size;
  }
  __device__ __forceinline__ unsigned slot(unsigned j) const {
    if (block_size == 0) return j;
    return shift >= 0 ? j & (block_size - 1) : j % block_size;
  }
};

__device__ __forceinline__ DecodePager decode_pager(const KvSeq& kv) {
  const unsigned bs = kv.block_size;
  const int shift = bs != 0 && (bs & (bs - 1)) == 0 ? __ffs(bs) - 1 : -1;
  return DecodePager{kv.blocks, bs, shift};
}

// The natural logit as the accumulator wants it: log2 units with softmax (q carries sm_scale and
// log2e when there is no logits hook), or the plain weight without; `none` if invisible.
template <class V, class P>
__device__ __forceinline__ float decode_logit(const P& p, float s, bool visible, const Pos& at,
                                              float sm_scale) {
  const float none = V::kSoftmax ? -FI_INF : 0.0f;
  if (!visible) return none;
  if constexpr (V::kHasMask) {
    if (!hook_mask<V>(p, at)) return none;
  }
  if constexpr (V::kHasLogits) {
    const float l = hook_logits<V>(p, s * sm_scale, at);
    return V::kSoftmax ? l * kLog2e : l;
  } else {
    return s;
  }
}

// This lane's 8 elements of key `u` of a tile, key-transformed (the rotary partner chunk is in the
// same shared tile, so only variants with a key hook read it).
template <class V, class P, class T, int D>
__device__ __forceinline__ void decode_key(const P& p, const Vec8* ks, unsigned u, unsigned c,
                                           const Pos& at_k, float (&k)[8]) {
  constexpr unsigned L = DecodeShape<D>::kLanes;
  unpack8<T>(ks[u * L + c], k);
  if constexpr (V::kHasKey) {
    float partner[8];
    unpack8<T>(ks[u * L + (c + L / 2) % L], partner);
    #pragma unroll
    for (int e = 0; e < 8; ++e) k[e] = hook_key<V>(p, k[e], partner[e], c * 8 + e, at_k);
  }
}

// One worker's running state over its keys.
template <bool kSoftmax>
struct DecodeState {
  float m = -FI_INF;  // max logit (log2 units)
  float z = 0.0f;  // sum of 2^(l - m)
  float acc[8] = {};

  // Two keys with logits l0, l1 (log2 units, or weights without softmax) and values v0, v1.
  __device__ __forceinline__ void add2(float l0, const float (&v0)[8], float l1,
                                       const float (&v1)[8]) {
    if constexpr (kSoftmax) {
      const float mx = fmaxf(m, fmaxf(l0, l1));
      if (mx == -FI_INF) return;  // nothing with weight yet
      if (mx > m) {
        const float scale = exp2_approx(m - mx);
        z *= scale;
        #pragma unroll
        for (int e = 0; e < 8; ++e) acc[e] *= scale;
        m = mx;
      }
      const float w0 = exp2_approx(l0 - m), w1 = exp2_approx(l1 - m);
      z += w0 + w1;
      #pragma unroll
      for (int e = 0; e < 8; ++e) acc[e] += w0 * v0[e] + w1 * v1[e];
    } else {
      #pragma unroll
      for (int e = 0; e < 8; ++e) acc[e] += l0 * v0[e] + l1 * v1[e];
    }
  }

  // Folds in another worker's state of the same row.
  __device__ __forceinline__ void merge(float m2, float z2, const float* acc2) {
    if constexpr (kSoftmax) {
      const float mx = fmaxf(m, m2);
      if (mx == -FI_INF) return;
      const float s1 = exp2_approx(m - mx), s2 = exp2_approx(m2 - mx);
      z = z * s1 + z2 * s2;
      #pragma unroll
      for (int e = 0; e < 8; ++e) acc[e] = acc[e] * s1 + acc2[e] * s2;
      m = mx;
    } else {
      #pragma unroll
      for (int e = 0; e < 8; ++e) acc[e] += acc2[e];
    }
  }
};

template <int D>
struct DecodeSmem {
  Vec8 kv[kDecodeStages][2][DecodeShape<D>::kChunks];  // [stage][K, V][key * kLanes + lane]
};

// The result of one row (epilogue.cuh): split items write the chunk's normalised output and LSE
// (no sink, no output hook: merge.cuh adds those); unsplit items finish the row, write o and lse.
// The state comes by value: by reference, ptxas took a register more in some instances.
template <class V, class P, class T, int D>
__device__ __forceinline__ void decode_write(const AttnArgs& a, const P& p, const WorkItem& it,
                                             unsigned qo_begin, unsigned c, const Pos& at,
                                             DecodeState<V::kSoftmax> st) {
  const unsigned i = at.qo_pos, h = at.qo_head;
  if (it.partial >= 0) {
    const auto end = finish_partial<V::kSoftmax>(st.m, st.z);
    const unsigned long long prow = partial_row(it.partial, i);
    store_partial<8>(partial_out<D>(a, prow, h) + c * 8, st.acc, end);
    if (c == 0) write_partial_lse<V::kSoftmax>(a, prow, h, end.lse());
    return;
  }
  const auto end = finish_row<V>(p, st.m, st.z, at);
  float out[8];
  #pragma unroll
  for (int e = 0; e < 8; ++e) out[e] = out_elem<V>(p, st.acc[e], end, c * 8 + e, at);
  const unsigned long long row = qo_begin + i;
  const bool vec = aligned16(a.o) && aligned8(a.o_stride_n) && aligned8(a.o_stride_h);
  store8(out_row<T>(a, row, h) + c * 8, pack8<T>(out), vec);
  if (c == 0) write_lse(a, row, h, end.lse());
}

// Rows of a decode_tile instance rounded up to a power of two, so that 2 * it values (rows x two
// keys) halve evenly in the reduce-scatter.
template <int NR>
constexpr unsigned kDecodePow2Rows = NR <= 1 ? 1 : NR <= 2 ? 2 : 4;

// Which of N scattered sums lane c of an L-lane worker ends up with (decode_scatter): the bits of
// the first log2(N) butterfly offsets, most significant first.
template <unsigned N, unsigned L>
__device__ __forceinline__ unsigned decode_scatter_index(unsigned c) {
  unsigned idx = 0;
  #pragma unroll
  for (unsigned n = N, o = L / 2; n > 1; n /= 2, o /= 2) idx += (c & o) ? n / 2 : 0;
  return idx;
}

// The lane (within the worker) that holds scattered sum `idx`; inverse of decode_scatter_index.
template <unsigned N, unsigned L>
__device__ __forceinline__ constexpr unsigned decode_scatter_lane(unsigned idx) {
  unsigned lane = 0;
  for (unsigned n = N, o = L / 2; n > 1; n /= 2, o /= 2) lane += (idx & (n / 2)) ? o : 0;
  return lane;
}

// Reduce-scatter of N per-lane partial sums over the L lanes of a worker: each butterfly step
// sends half of the values still held and keeps the other half, so the N full sums cost
// N - 1 + log2(L / N) shuffles instead of N log2(L); lane c returns sum decode_scatter_index(c).
template <unsigned N, unsigned L>
__device__ __forceinline__ float decode_scatter(float (&x)[N], unsigned c, unsigned mask) {
  static_assert(N <= L, "a worker scatters at most one sum per lane");
  unsigned o = L / 2;
  #pragma unroll
  for (unsigned n = N; n > 1; n /= 2, o /= 2) {
    const bool upper = (c & o) != 0;
    #pragma unroll
    for (unsigned k = 0; k < n / 2; ++k) {
      const float send = upper ? x[k] : x[k + n / 2];
      const float keep = upper ? x[k + n / 2] : x[k];
      x[k] = keep + __shfl_xor_sync(mask, send, o);
    }
  }
  float s = x[0];
  #pragma unroll
  for (; o > 0; o /= 2) s += __shfl_xor_sync(mask, s, o);
  return s;
}

// One worker's share of a tile: keys u = way, way + ways, ... (two at a time for ILP) against
// its NR rows. K and V chunks are loaded and converted once for all NR rows. The 2 x NR dot
// products are reduce-scattered so that each lane turns one (row, key) sum into a logit (mask
// and logits hooks run once per pair of lanes, not on every lane), then the logits are
// broadcast back for the accumulation.
template <int NR, class V, class P, class T, int D>
__device__ __forceinline__ void decode_tile(const P& p, const Vec8* ks, const Vec8* vs,
                                            unsigned n, unsigned way, unsigned ways, unsigned c,
                                            unsigned j0, unsigned kv_off,
                                            const float (&q)[kDecodeRows][8],
                                            const unsigned (&row_end)[kDecodeRows],
                                            const Pos (&at)[kDecodeRows], const Pos& at_k,
                                            float sm_scale, unsigned mask,
                                            DecodeState<V::kSoftmax> (&st)[kDecodeRows]) {
  constexpr unsigned L = DecodeShape<D>::kLanes;
  constexpr unsigned NP = kDecodePow2Rows<NR>;
  constexpr unsigned N = 2 * NP;  // sum k * NP + r: key k of the pair, row r
  // The (row, key) this lane turns into a logit, fixed for the tile; rows past NR are padding.
  const unsigned mine = decode_scatter_index<N, L>(c);
  const unsigned r_mine = mine % NP;
  const bool second = mine >= NP;
  Pos at_mine = at[0];
  unsigned end_mine = row_end[0];
  #pragma unroll
  for (unsigned r = 1; r < NP; ++r) {
    if (r_mine == r) {
      at_mine = at[r];
      end_mine = row_end[r];
    }
  }
  for (unsigned u = way; u < n; u += 2 * ways) {
    const unsigned u1 = u + ways;
    const bool two = u1 < n;
    Pos at_k0 = at_k, at_k1 = at_k;
    at_k0.kv_pos = kv_off + j0 + u;
    at_k1.kv_pos = kv_off + j0 + u1;
    float k0[8], k1[8];
    decode_key<V, P, T, D>(p, ks, u, c, at_k0, k0);
    decode_key<V, P, T, D>(p, ks, two ? u1 : u, c, at_k1, k1);
    float s[N];
    #pragma unroll
    for (unsigned r = 0; r < NP; ++r) {
      s[r] = 0.0f;
      s[NP + r] = 0.0f;
      if (r < static_cast<unsigned>(NR)) {
        #pragma unroll
        for (int e = 0; e < 8; ++e) {
          s[r] += q[r][e] * k0[e];
          s[NP + r] += q[r][e] * k1[e];
        }
      }
    }
    const float sum = decode_scatter<N, L>(s, c, mask);
    float v0[8], v1[8] = {};
    unpack8<T>(vs[u * L + c], v0);
    if (two) unpack8<T>(vs[u1 * L + c], v1);
    const unsigned j = j0 + (second ? u1 : u);
    at_mine.kv_pos = kv_off + j;
    const bool visible = (!second || two) && j < end_mine;
    const float logit = decode_logit<V>(p, sum, visible, at_mine, sm_scale);
    #pragma unroll
    for (unsigned r = 0; r < static_cast<unsigned>(NR); ++r) {
      const float l0 = __shfl_sync(mask, logit, decode_scatter_lane<N, L>(r), L);
      const float l1 = __shfl_sync(mask, logit, decode_scatter_lane<N, L>(NP + r), L);
      st[r].add2(l0, v0, l1, v1);
    }
  }
}

// One pass over the chunk for packed rows p0 .. p0 + rows (rows <= kWorkers * kDecodeRows).
template <class V, class P, class T, int D>
__device__ __forceinline__ void decode_pass(const AttnArgs& a, const P& p, const WorkItem& it,
                                            const KvSeq& kv, unsigned qo_begin, unsigned qo_len,
                                            unsigned p0, unsigned rows, DecodeSmem<D>& sm) {
  using S = DecodeShape<D>;
  constexpr unsigned L = S::kLanes;
  const unsigned group = a.num_qo_heads / a.num_kv_heads;
  const unsigned b = it.request, kv_head = it.kv_head;
  const unsigned tid = threadIdx.x, c = tid % L, w = tid / L;
  // Workers take rows kDecodeRows at a time; the row groups split the workers, the rest of the
  // parallelism goes to the keys.
  const unsigned row_groups = (rows + kDecodeRows - 1) / kDecodeRows;
  const unsigned ways = S::kWorkers / row_groups;
  const unsigned rg = w % row_groups, way = w / row_groups;
  const bool active = way < ways;  // idle workers still copy and meet every barrier
  const unsigned r0 = rg * kDecodeRows;
  const unsigned nr = active ? min(kDecodeRows, rows - r0) : 0;
  const bool causal = a.causal != 0;
  // Hooks see positions in the whole request; the diagonal follows them (work.cuh).
  const KeyPositions kp = key_positions(a.work, b, kv.len);
  const long long shift = kp.causal_shift(qo_len);

  // Keys of the chunk that some row of this pass can see.
  const unsigned i_last = (p0 + rows - 1) / group;
  const unsigned lo = it.kv_start;
  const unsigned hi = min(it.kv_end, keys_end(causal, i_last, shift, kv.len));
  const unsigned tiles = hi > lo ? (hi - lo + S::kTile - 1) / S::kTile : 0;

  // Query rows, transformed and scaled so that q . k is the logit the accumulator wants.
  float q[kDecodeRows][8];
  Pos at[kDecodeRows];
  unsigned row_end[kDecodeRows];
  const bool vec_q = aligned16(a.q) && aligned8(a.q_stride_n) && aligned8(a.q_stride_h);
  float scale = 1.0f;
  if constexpr (!V::kHasLogits) scale = V::kSoftmax ? a.sm_scale * kLog2e : a.sm_scale;
  #pragma unroll
  for (unsigned r = 0; r < kDecodeRows; ++r) {
    const unsigned pr = p0 + r0 + (r < nr ? r : 0);
    const unsigned i = pr / group, h = kv_head * group + pr % group;
    at[r] = Pos{b, i, 0, h, kv_head, qo_len, kp.total, D};
    row_end[r] = keys_end(causal, i, shift, kv.len);
    #pragma unroll
    for (int e = 0; e < 8; ++e) q[r][e] = 0.0f;
    if (r < nr) {
      const T* src =
          static_cast<const T*>(a.q) + (qo_begin + i) * a.q_stride_n + h * a.q_stride_h;
      unpack8<T>(load8(src + c * 8, vec_q), q[r]);
      if constexpr (V::kHasQuery) {
        float partner[8];
        unpack8<T>(load8(src + (c + L / 2) % L * 8, vec_q), partner);
        #pragma unroll
        for (int e = 0; e < 8; ++e) {
          q[r][e] = hook_query<V>(p, q[r][e], partner[e], c * 8 + e, at[r]);
        }
      }
      #pragma unroll
      for (int e = 0; e < 8; ++e) q[r][e] *= scale;
    }
  }
  const Pos at_k{b, 0, 0, 0, kv_head, qo_len, kp.total, D};

  // Copy side: thread tid copies chunk c of keys tid / L + x * kWorkers of every tile, K and V.
  const DecodePager pager = decode_pager(kv);
  const T* k_base = static_cast<const T*>(a.k);
  const T* v_base = static_cast<const T*>(a.v);
  const bool vec_kv = aligned16(a.k) && aligned16(a.v) && aligned8(a.kv_stride_block) &&
                      aligned8(a.kv_stride_n) && aligned8(a.kv_stride_h);
  auto page_id = [&](unsigned tile, unsigned x) -> int {
    const unsigned j = lo + tile * S::kTile + w + x * S::kWorkers;
    return tile < tiles && j < hi ? kv.blocks[pager.page(j)] : 0;
  };
  auto issue = [&](unsigned tile, const int (&id)[S::kCopies]) {
    #pragma unroll
    for (unsigned x = 0; x < S::kCopies; ++x) {
      const unsigned kr = w + x * S::kWorkers;
      const unsigned j = lo + tile * S::kTile + kr;
      if (tile < tiles && j < hi) {
        const unsigned long long off =
            static_cast<unsigned long long>(static_cast<unsigned>(id[x])) * a.kv_stride_block +
            pager.slot(j) * a.kv_stride_n + kv_head * a.kv_stride_h + c * 8;
        Vec8* kd = &sm.kv[tile % kDecodeStages][0][kr * L + c];
        Vec8* vd = &sm.kv[tile % kDecodeStages][1][kr * L + c];
        if (vec_kv) {
          cp_async_16(static_cast<unsigned>(__cvta_generic_to_shared(kd)), k_base + off, true);
          cp_async_16(static_cast<unsigned>(__cvta_generic_to_shared(vd)), v_base + off, true);
        } else {
          *kd = load8(k_base + off, false);
          *vd = load8(v_base + off, false);
        }
      }
    }
    cp_async_commit();  // empty groups too: the wait counts stay uniform
  };

  int ids[kDecodeStages - 1][S::kCopies];
  #pragma unroll
  for (unsigned s = 0; s + 1 < kDecodeStages; ++s) {
    #pragma unroll
    for (unsigned x = 0; x < S::kCopies; ++x) ids[s][x] = page_id(s, x);
  }
  #pragma unroll
  for (unsigned s = 0; s + 1 < kDecodeStages; ++s) issue(s, ids[s]);
  int id_next[S::kCopies];
  #pragma unroll
  for (unsigned x = 0; x < S::kCopies; ++x) id_next[x] = page_id(kDecodeStages - 1, x);

  DecodeState<V::kSoftmax> st[kDecodeRows];
  const unsigned mask = worker_mask<L>();
  for (unsigned t = 0; t < tiles; ++t) {
    cp_async_wait<kDecodeStages - 2>();
    __syncthreads();  // tile t landed for everyone; tile t - 1 is read by everyone
    issue(t + kDecodeStages - 1, id_next);
    #pragma unroll
    for (unsigned x = 0; x < S::kCopies; ++x) {
      id_next[x] = page_id(t + kDecodeStages, x);  // a whole tile of compute hides the lookup
    }
    const Vec8* ks = sm.kv[t % kDecodeStages][0];
    const Vec8* vs = sm.kv[t % kDecodeStages][1];
    const unsigned j0 = lo + t * S::kTile;
    const unsigned n = min(S::kTile, hi - j0);
    // nr is the same on all lanes of a worker, so each worker runs one instance.
    switch (nr) {
      case 1:
        decode_tile<1, V, P, T, D>(p, ks, vs, n, way, ways, c, j0, kp.offset, q, row_end, at, at_k,
                                   a.sm_scale, mask, st);
        break;
      case 2:
        decode_tile<2, V, P, T, D>(p, ks, vs, n, way, ways, c, j0, kp.offset, q, row_end, at, at_k,
                                   a.sm_scale, mask, st);
        break;
      case 3:
        decode_tile<3, V, P, T, D>(p, ks, vs, n, way, ways, c, j0, kp.offset, q, row_end, at, at_k,
                                   a.sm_scale, mask, st);
        break;
      case 4:
        decode_tile<4, V, P, T, D>(p, ks, vs, n, way, ways, c, j0, kp.offset, q, row_end, at, at_k,
                                   a.sm_scale, mask, st);
        break;
      default:
        break;  // idle worker
    }
  }
  cp_async_wait<0>();
  __syncthreads();  // every tile is read: the shared memory is free for the merge of the ways

  if (ways > 1) {
    float* red_acc = reinterpret_cast<float*>(&sm.kv[0][0][0]);  // [kWorkers][rows][D]
    float* red_m = red_acc + S::kWorkers * kDecodeRows * D;  // [kWorkers][rows]
    float* red_z = red_m + S::kWorkers * kDecodeRows;
    if (active && way > 0) {
      #pragma unroll
      for (unsigned r = 0; r < kDecodeRows; ++r) {
        if (r >= nr) break;
        #pragma unroll
        for (int e = 0; e < 8; ++e) red_acc[(w * kDecodeRows + r) * D + c * 8 + e] = st[r].acc[e];
        if (c == 0) {
          red_m[w * kDecodeRows + r] = st[r].m;
          red_z[w * kDecodeRows + r] = st[r].z;
        }
      }
    }
    __syncthreads();
    if (way == 0) {
      for (unsigned k = 1; k < ways; ++k) {
        const unsigned w2 = rg + k * row_groups;
        #pragma unroll
        for (unsigned r = 0; r < kDecodeRows; ++r) {
          if (r >= nr) break;
          const unsigned x = w2 * kDecodeRows + r;
          st[r].merge(red_m[x], red_z[x], red_acc + x * D + c * 8);
        }
      }
    }
  }

  if (way == 0) {
    #pragma unroll
    for (unsigned r = 0; r < kDecodeRows; ++r) {
      if (r >= nr) break;
      decode_write<V, P, T, D>(a, p, it, qo_begin, c, at[r], st[r]);
    }
  }
  __syncthreads();  // the next pass refills the shared memory
}

template <class V, class P, class T, int D>
__device__ void decode(const AttnArgs& a, const P& p) {
  __shared__ DecodeSmem<D> sm;
  let_next_grid_start();  // the merge pass waits for this grid's end (core/grid_order.cuh)
  const WorkItem it = work_item(a.work, blockIdx.x);
  if (!it.valid) return;  // padding; block-uniform, before any barrier
  const KvSeq kv = kv_seq(a, it.request);
  const unsigned qo_begin = static_cast<unsigned>(a.qo_indptr[it.request]);
  const unsigned qo_len = static_cast<unsigned>(a.qo_indptr[it.request + 1]) - qo_begin;
  constexpr unsigned W = DecodeShape<D>::kWorkers * kDecodeRows;
  for (unsigned p0 = it.qo_tile_start; p0 < it.qo_tile_end; p0 += W) {
    const unsigned rows = min(W, it.qo_tile_end - p0);
    decode_pass<V, P, T, D>(a, p, it, kv, qo_begin, qo_len, p0, rows, sm);
  }
}

}  // namespace fi
