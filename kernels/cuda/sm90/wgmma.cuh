// Warpgroup MMA (sm_90a): a 128-thread warpgroup multiplies a 64 x K tile of A by a K x N tile of
// B into f32 accumulators spread over its threads, asynchronously. A comes from shared memory (a
// matrix descriptor) or from registers; B always from shared memory. The calls are issued between
// wgmma_fence() (the accumulators' earlier register writes are ordered before the MMA reads them)
// and wgmma_commit(), and their results are read only after wgmma_wait<N>() has left at most N
// groups in flight. Three shapes: m64n128k16, the usual unit (at n64 an SS MMA reads as many
// shared-memory bytes a cycle as the SM delivers, at n128 A is read once for twice the columns),
// m64n64k16 where a tile is 64 wide (P V at head dim 64, Q K^T over 64-key tiles at head dim
// 256), and m64n176k16 for Q K^T over the 176-key tiles of long prompts at head dim 128. Accumulator layout (thread t of the warpgroup, w = t / 32, l = t % 32), for either width:
// d[i] is row 16 w + l / 4 + 8 ((i / 2) % 2), column 8 (i / 4) + 2 (l % 4) + i % 2. So a wider
// accumulator is the narrower ones side by side: elements [64 c, 64 c + 64) of a flat array are
// columns [128 c, 128 c + 128), the n128 accumulator `wgmma_cols<64 c, 64>` names.
#pragma once

namespace fi {

// A shared-memory matrix descriptor: the tile's start, the byte offsets between its 8-row core
// matrices along the leading and the strided dimension, and its swizzle (0 none, 1 128-byte,
// 2 64-byte, 3 32-byte), as the tile was written (by TMA with the same swizzle, or by threads).
__device__ __forceinline__ unsigned long long wgmma_desc(const void* tile, unsigned lead_bytes,
                                                         unsigned stride_bytes, unsigned swizzle) {
  const unsigned long long addr = static_cast<unsigned>(__cvta_generic_to_shared(tile));
  const unsigned long long lead = (lead_bytes & 0x3FFFFu) >> 4;
  const unsigned long long stride = (stride_bytes & 0x3FFFFu) >> 4;
  return ((addr & 0x3FFFFull) >> 4) | (lead << 16) | (stride << 32) |
         (static_cast<unsigned long long>(swizzle & 3u) << 62);
}

// The descriptor of the same layout `bytes` further on in shared memory. The start address is
// bits 0-13 in 16-byte units and shared addresses stay below 2^18, so adding to the low word
// never carries out of the field: one integer add a k-step instead of a new descriptor.
__device__ __forceinline__ unsigned long long wgmma_desc_at(unsigned long long desc,
                                                            unsigned bytes) {
  const unsigned lo = static_cast<unsigned>(desc) + (bytes >> 4);
  const unsigned hi = static_cast<unsigned>(desc >> 32);
  unsigned long long out;
  // Joined as two words, so the compiler does not carry a 64-bit add into the constant high word.
  asm("mov.b64 %0, {%1, %2};\n" : "=l"(out) : "r"(lo), "r"(hi));
  return out;
}

__device__ __forceinline__ void wgmma_fence() {
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
}
__device__ __forceinline__ void wgmma_commit() {
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}
template <int N>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
// Keeps the compiler from moving reads or writes of the accumulators across an async MMA.
template <int N>
__device__ __forceinline__ void wgmma_hold(float (&d)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(d[i])::"memory");
}
// The same for an A operand in registers: the MMA reads them after it is issued, so they must
// stay live (not reused) until a wgmma_wait has seen it complete: hold them after that wait.
template <int N>
__device__ __forceinline__ void wgmma_hold(unsigned (&a)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+r"(a[i])::"memory");
}
template <int N, int M>
__device__ __forceinline__ void wgmma_hold(unsigned (&a)[N][M]) {
#pragma unroll
  for (int i = 0; i < N; ++i) wgmma_hold(a[i]);
}

// The n-wide slice of a flat accumulator that starts at element `At` (a multiple of N): an MMA
// of width 2 N writes it (see the layout above), so O = P V at head dim 256 is two n128 MMAs
// into one 128-float array.
template <int At, int N, int M>
__device__ __forceinline__ float (&wgmma_cols(float (&d)[M]))[N] {
  static_assert(At % N == 0 && At + N <= M, "a whole accumulator inside the array");
  return *reinterpret_cast<float(*)[N]>(d + At);
}

#define FI_WGMMA_D64 "{" \
  "%0, %1, %2, %3, %4, %5, %6, %7, "\
  "%8, %9, %10, %11, %12, %13, %14, %15, "\
  "%16, %17, %18, %19, %20, %21, %22, %23, "\
  "%24, %25, %26, %27, %28, %29, %30, %31}"
#define FI_WGMMA_D64_ARGS \
  "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), \
  "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), \
  "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), \
  "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), \
  "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), \
  "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), \
  "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), \
  "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])

// d (+)= A B for A a 64 x 16 shared tile (descriptor a) and B a 16 x 64 shared tile (descriptor
// b), as wgmma_ss_64x128x16 at half the width.
template <bool BF16, int TRANS_B>
__device__ __forceinline__ void wgmma_ss_64x64x16(float (&d)[32], unsigned long long a,
                                                   unsigned long long b, bool accumulate) {
  if constexpr (BF16) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 " FI_WGMMA_D64
        ", %32, %33, p, 1, 1, 0, %35;\n}\n"
        : FI_WGMMA_D64_ARGS
        : "l"(a), "l"(b), "r"(static_cast<unsigned>(accumulate)), "n"(TRANS_B));
  } else {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16 " FI_WGMMA_D64
        ", %32, %33, p, 1, 1, 0, %35;\n}\n"
        : FI_WGMMA_D64_ARGS
        : "l"(a), "l"(b), "r"(static_cast<unsigned>(accumulate)), "n"(TRANS_B));
  }
}

// The same with A from registers (as wgmma_rs_64x128x16 at half the width).
template <bool BF16, int TRANS_B>
__device__ __forceinline__ void wgmma_rs_64x64x16(float (&d)[32], const unsigned (&a)[4],
                                                   unsigned long long b, bool accumulate) {
  if constexpr (BF16) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 " FI_WGMMA_D64
        ", {%32, %33, %34, %35}, %36, p, 1, 1, %38;\n}\n"
        : FI_WGMMA_D64_ARGS
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b),
          "r"(static_cast<unsigned>(accumulate)), "n"(TRANS_B));
  } else {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16 " FI_WGMMA_D64
        ", {%32, %33, %34, %35}, %36, p, 1, 1, %38;\n}\n"
        : FI_WGMMA_D64_ARGS
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b),
          "r"(static_cast<unsigned>(accumulate)), "n"(TRANS_B));
  }
}

#define FI_WGMMA_D128 "{" \
  "%0, %1, %2, %3, %4, %5, %6, %7, "\
  "%8, %9, %10, %11, %12, %13, %14, %15, "\
  "%16, %17, %18, %19, %20, %21, %22, %23, "\
  "%24, %25, %26, %27, %28, %29, %30, %31, "\
  "%32, %33, %34, %35, %36, %37, %38, %39, "\
  "%40, %41, %42, %43, %44, %45, %46, %47, "\
  "%48, %49, %50, %51, %52, %53, %54, %55, "\
  "%56, %57, %58, %59, %60, %61, %62, %63"\
  "}"
#define FI_WGMMA_D128_ARGS \
  "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), \
  "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), \
  "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), \
  "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), \
  "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), \
  "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), \
  "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), \
  "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), \
  "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), \
  "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), \
  "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), \
  "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), \
  "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), \
  "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), \
  "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), \
  "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])

// d (+)= A B for A a 64 x 16 shared tile (descriptor a) and B a 16 x 128 shared tile (descriptor
// b); d is overwritten when `accumulate` is false. TRANS_B: B is stored N-major (V of P V) rather
// than K-major (K of Q K^T). BF16 picks bf16 inputs, else f16.
template <bool BF16, int TRANS_B>
__device__ __forceinline__ void wgmma_ss_64x128x16(float (&d)[64], unsigned long long a,
                                                    unsigned long long b, bool accumulate) {
  if constexpr (BF16) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 " FI_WGMMA_D128
        ", %64, %65, p, 1, 1, 0, %67;\n}\n"
        : FI_WGMMA_D128_ARGS
        : "l"(a), "l"(b), "r"(static_cast<unsigned>(accumulate)), "n"(TRANS_B));
  } else {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.f16.f16 " FI_WGMMA_D128
        ", %64, %65, p, 1, 1, 0, %67;\n}\n"
        : FI_WGMMA_D128_ARGS
        : "l"(a), "l"(b), "r"(static_cast<unsigned>(accumulate)), "n"(TRANS_B));
  }
}

// The same with A from registers: four b16x2 registers a thread, the 64 x 16 tile laid out as an
// accumulator's rows (so P, converted from S's accumulators, feeds P V without shared memory).
template <bool BF16, int TRANS_B>
__device__ __forceinline__ void wgmma_rs_64x128x16(float (&d)[64], const unsigned (&a)[4],
                                                    unsigned long long b, bool accumulate) {
  if constexpr (BF16) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 " FI_WGMMA_D128
        ", {%64, %65, %66, %67}, %68, p, 1, 1, %70;\n}\n"
        : FI_WGMMA_D128_ARGS
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b),
          "r"(static_cast<unsigned>(accumulate)), "n"(TRANS_B));
  } else {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.f16.f16 " FI_WGMMA_D128
        ", {%64, %65, %66, %67}, %68, p, 1, 1, %70;\n}\n"
        : FI_WGMMA_D128_ARGS
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b),
          "r"(static_cast<unsigned>(accumulate)), "n"(TRANS_B));
  }
}

#define FI_WGMMA_D176 "{" \
  "%0, %1, %2, %3, %4, %5, %6, %7, "\
  "%8, %9, %10, %11, %12, %13, %14, %15, "\
  "%16, %17, %18, %19, %20, %21, %22, %23, "\
  "%24, %25, %26, %27, %28, %29, %30, %31, "\
  "%32, %33, %34, %35, %36, %37, %38, %39, "\
  "%40, %41, %42, %43, %44, %45, %46, %47, "\
  "%48, %49, %50, %51, %52, %53, %54, %55, "\
  "%56, %57, %58, %59, %60, %61, %62, %63, "\
  "%64, %65, %66, %67, %68, %69, %70, %71, "\
  "%72, %73, %74, %75, %76, %77, %78, %79, "\
  "%80, %81, %82, %83, %84, %85, %86, %87"\
  "}"
#define FI_WGMMA_D176_ARGS \
  "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), \
  "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), \
  "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), \
  "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), \
  "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), \
  "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), \
  "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), \
  "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), \
  "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), \
  "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), \
  "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), \
  "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), \
  "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), \
  "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), \
  "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), \
  "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]), \
  "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), \
  "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]), \
  "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), \
  "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]), \
  "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), \
  "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87])

// d (+)= A B for A a 64 x 16 shared tile and B a 16 x 176 one (K-major): S over the 176-key
// tile (kernels/cuda/attention/prefill_sm90.cuh), as wgmma_ss_64x128x16 at 11/8 the width.
template <bool BF16, int TRANS_B>
__device__ __forceinline__ void wgmma_ss_64x176x16(float (&d)[88], unsigned long long a,
                                                    unsigned long long b, bool accumulate) {
  if constexpr (BF16) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %90, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n176k16.f32.bf16.bf16 " FI_WGMMA_D176
        ", %88, %89, p, 1, 1, 0, %91;\n}\n"
        : FI_WGMMA_D176_ARGS
        : "l"(a), "l"(b), "r"(static_cast<unsigned>(accumulate)), "n"(TRANS_B));
  } else {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %90, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n176k16.f32.f16.f16 " FI_WGMMA_D176
        ", %88, %89, p, 1, 1, 0, %91;\n}\n"
        : FI_WGMMA_D176_ARGS
        : "l"(a), "l"(b), "r"(static_cast<unsigned>(accumulate)), "n"(TRANS_B));
  }
}

#undef FI_WGMMA_D64
#undef FI_WGMMA_D64_ARGS
#undef FI_WGMMA_D128
#undef FI_WGMMA_D128_ARGS
#undef FI_WGMMA_D176
#undef FI_WGMMA_D176_ARGS

}  // namespace fi
