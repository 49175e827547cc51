// Warpgroups (sm_90a): four consecutive warps that issue wgmma together, and the register budget
// a warp-specialised kernel moves between them (a producer warpgroup gives registers up, the
// consumers take them). setmaxnreg needs the kernel's __launch_bounds__(threads, 1) and every warp
// of a warpgroup executing the same call.
#pragma once

namespace fi {

constexpr unsigned kWarpgroupThreads = 128;

__device__ __forceinline__ unsigned warpgroup_id() { return threadIdx.x / kWarpgroupThreads; }
// This thread's index within its warpgroup.
__device__ __forceinline__ unsigned warpgroup_thread() { return threadIdx.x % kWarpgroupThreads; }

// Raise or lower this warp's register limit to REGS (a multiple of 8 in [24, 256]).
template <unsigned REGS>
__device__ __forceinline__ void regs_grow() {
  static_assert(REGS % 8 == 0 && REGS >= 24 && REGS <= 256, "setmaxnreg takes 24..256 in 8s");
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(REGS));
}
template <unsigned REGS>
__device__ __forceinline__ void regs_shrink() {
  static_assert(REGS % 8 == 0 && REGS >= 24 && REGS <= 256, "setmaxnreg takes 24..256 in 8s");
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(REGS));
}

}  // namespace fi
