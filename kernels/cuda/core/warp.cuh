// Warp vocabulary: lane and warp ids, and the one reduction the kernels need.
#pragma once

namespace fi {

constexpr unsigned kWarpSize = 32;
constexpr unsigned kFullMask = 0xffffffffu;

__device__ __forceinline__ unsigned lane_id() { return threadIdx.x % kWarpSize; }
__device__ __forceinline__ unsigned warp_id() { return threadIdx.x / kWarpSize; }
__device__ __forceinline__ unsigned warps_per_block() { return blockDim.x / kWarpSize; }

// Butterfly sum. Each step adds the same two values on both lanes of a pair (a + b == b + a exactly
// in IEEE), so every lane ends with the bitwise same total: warp-uniform branches on it are safe.
__device__ __forceinline__ float warp_sum(float x) {
  for (unsigned offset = kWarpSize / 2; offset > 0; offset /= 2) {
    x += __shfl_xor_sync(kFullMask, x, offset);
  }
  return x;
}

}  // namespace fi
