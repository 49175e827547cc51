// Asynchronous global-to-shared copies (sm_80+), 16 (or 4) bytes at a time, grouped into commit groups
// that a pipeline waits on in order.
#pragma once

namespace fi {

// Copies 16 bytes from `src` to shared address `dst`, or writes 16 zero bytes when `!valid` (the
// source is then not read, so it may be any address).
__device__ __forceinline__ void cp_async_16(unsigned dst, const void* src, bool valid) {
  const unsigned bytes = valid ? 16u : 0u;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(bytes)
               : "memory");
}

// The same for 4 bytes (through L1: small, reused reads such as page ids).
__device__ __forceinline__ void cp_async_4(unsigned dst, const void* src, bool valid) {
  const unsigned bytes = valid ? 4u : 0u;
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(dst), "l"(src), "r"(bytes)
               : "memory");
}

// Closes the current group of copies (an empty group is fine and keeps the counting uniform).
__device__ __forceinline__ void cp_async_commit() {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}

// Waits until at most `N` of this thread's groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

}  // namespace fi
