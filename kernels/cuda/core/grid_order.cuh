// Programmatic dependent launch (Hopper on): a kernel launched right after another with the
// programmatic-serialization attribute may start before that one ends, once every CTA of the
// first has called `let_next_grid_start` or exited; it must call `wait_for_prior_grid` before it
// reads what the first wrote. The attention kernels let their merge pass start at once, so the
// merge's index work (the row's request, merge list, key count) runs beside their last tiles.
// Before sm_90 both are no-ops and the launch is an ordinary one (runtime/src/device/gpu.rs).
#pragma once

namespace fi {

__device__ __forceinline__ void let_next_grid_start() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// Returns once every grid this one depends on has finished and its writes are visible here.
__device__ __forceinline__ void wait_for_prior_grid() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

}  // namespace fi
