// Block-sparse-row addressing of the KV cache (paged or ragged), as AttnArgs describes it and
// ferrinfer_runtime::attention::batch::KvIndex::offset computes it on the host.
#pragma once
#include "core/abi.cuh"

namespace fi {

// The keys of one request.
struct KvSeq {
  const int* blocks;  // this request's block ids
  unsigned block_size;  // 0: ragged, one unbounded block whose id is the first token
  unsigned len;  // tokens
  unsigned long long stride_block, stride_n, stride_h;

  // Index into `blocks` of the block holding key `j`.
  __device__ __forceinline__ unsigned block_of(unsigned j) const {
    return block_size != 0 ? j / block_size : 0;
  }
  // Element offset of element 0 of key `j` in head `kv_head`, given the id of its block (a kernel
  // that prefetches `blocks[block_of(j)]` calls this instead of `offset`).
  __device__ __forceinline__ unsigned long long offset_in(int id, unsigned j,
                                                          unsigned kv_head) const {
    const unsigned slot = block_size != 0 ? j - block_of(j) * block_size : j;
    // Block ids are validated non-negative on the host.
    return static_cast<unsigned long long>(static_cast<unsigned>(id)) * stride_block +
           slot * stride_n + kv_head * stride_h;
  }
  // Element offset of element 0 of key `j` (0..len) in head `kv_head`.
  __device__ __forceinline__ unsigned long long offset(unsigned j, unsigned kv_head) const {
    return offset_in(blocks[block_of(j)], j, kv_head);
  }
};

__device__ __forceinline__ KvSeq kv_seq(const AttnArgs& a, unsigned b) {
  const int begin = a.kv_indptr[b];
  const unsigned num_blocks = static_cast<unsigned>(a.kv_indptr[b + 1] - begin);
  const unsigned last = static_cast<unsigned>(a.kv_last_len[b]);
  unsigned len = 0;
  if (num_blocks > 0) len = a.block_size == 0 ? last : (num_blocks - 1) * a.block_size + last;
  return KvSeq{a.kv_indices + begin, a.block_size, len, a.kv_stride_block, a.kv_stride_n,
               a.kv_stride_h};
}

}  // namespace fi
