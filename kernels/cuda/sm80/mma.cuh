// Tensor-core MMA for sm_80+: the m16n8k16 mma.sync (f16/bf16 in, f32 accumulate); f32 pairs go
// into the b16x2 registers of an A fragment with pack2 (core/dtype.cuh). Fragment layouts (g =
// lane / 4, t = lane % 4): an A fragment (16x16, row-major) is four b16x2 registers {(g, 2t),
// (g + 8, 2t), (g, 2t + 8), (g + 8, 2t + 8)}; a B fragment (16x8, k-major) is two, {(k 2t, n g),
// (k 2t + 8, n g)}; a C fragment (16x8 f32) is {(g, 2t), (g, 2t + 1), (g + 8, 2t), (g + 8,
// 2t + 1)}. ldmatrix.cuh loads A and B fragments from shared memory.
#pragma once
#include "core/dtype.cuh"

namespace fi {

// c += a * b for one 16x8 output tile.
template <class T>
__device__ __forceinline__ void mma_16816(float (&c)[4], const unsigned (&a)[4], unsigned b0,
                                          unsigned b1) {
  if constexpr (kIsBf16<T>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

}  // namespace fi
