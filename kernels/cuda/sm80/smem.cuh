// Shared-memory tiles of b16 rows, stored as 16-byte chunks with an XOR swizzle: chunk c of row r
// lives at chunk c ^ (r % 8) of the row. Eight consecutive rows of one logical chunk (what an
// ldmatrix reads) then fall on eight different 16-byte bank groups, so neither the cp.async
// writes nor the ldmatrix reads conflict, with no padding.
#pragma once
#include "core/dtype.cuh"

namespace fi {

template <int ROWS, int D>
struct SmemTile {
  static_assert(D % 64 == 0, "rows of at least 8 chunks, so the swizzle stays inside the row");
  static constexpr int kChunks = D / 8;  // 16-byte chunks per row
  static constexpr int kBytes = ROWS * D * 2;

  unsigned char* base;

  __device__ __forceinline__ static unsigned chunk_offset(unsigned row, unsigned chunk) {
    return (row * kChunks + (chunk ^ (row % 8))) * 16;
  }
  // Element d of a row, as 16-bit storage.
  __device__ __forceinline__ unsigned short* elem(unsigned row, unsigned d) const {
    return reinterpret_cast<unsigned short*>(base + chunk_offset(row, d / 8)) + d % 8;
  }
  __device__ __forceinline__ unsigned addr(unsigned row, unsigned chunk) const {
    return smem_base() + chunk_offset(row, chunk);
  }
  __device__ __forceinline__ unsigned smem_base() const {
    return static_cast<unsigned>(__cvta_generic_to_shared(base));
  }
};

// Reads and writes one element of a tile as f32 (the storage type decides the conversion).
template <class T>
__device__ __forceinline__ float load_elem(const unsigned short* s) {
  return to_f32(T{*s});
}
template <class T>
__device__ __forceinline__ void store_elem(unsigned short* s, float x) {
  *s = from_f32<T>(x).bits;
}

}  // namespace fi
