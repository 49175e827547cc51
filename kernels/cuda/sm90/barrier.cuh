// Hopper's synchronisation for a warp-specialised pipeline (sm_90a): transaction-counting mbarriers
// in shared memory (a producer's TMA copies complete a stage; consumers wait on its phase), named
// barriers between warpgroups, and the proxy fence that orders ordinary shared-memory stores before
// the async proxy (TMA stores, wgmma operand reads) sees them. Addresses are shared-space
// (`smem_u32`).
#pragma once

namespace fi {

// A shared-space address for the PTX below.
__device__ __forceinline__ unsigned smem_u32(const void* p) {
  return static_cast<unsigned>(__cvta_generic_to_shared(p));
}

// One mbarrier (8 bytes, 8-aligned, in shared memory): it completes a phase when `count` arrivals
// have been made and every expected transaction byte has landed.
__device__ __forceinline__ void mbar_init(unsigned long long* bar, unsigned count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_u32(bar)), "r"(count)
               : "memory");
}

// Makes initialised barriers visible to the async proxy (TMA) before any copy names them; a
// __syncthreads() after this makes them visible to the other threads.
__device__ __forceinline__ void mbar_init_fence() {
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}

// The producer's arrival for a stage whose copies will bring `bytes` bytes.
__device__ __forceinline__ void mbar_arrive_expect_tx(unsigned long long* bar, unsigned bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_u32(bar)),
               "r"(bytes)
               : "memory");
}

// A plain arrival (a consumer releasing a stage back to the producer).
__device__ __forceinline__ void mbar_arrive(unsigned long long* bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(smem_u32(bar)) : "memory");
}

// `n` arrivals at once (one thread standing in for others that have nothing to signal).
__device__ __forceinline__ void mbar_arrive_n(unsigned long long* bar, unsigned n) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_u32(bar)), "r"(n)
               : "memory");
}

// An arrival made only where `pred` holds, as one predicated instruction: no branch, so a
// consumer's straight-line wgmma pipeline stays straight (ptxas serialises MMAs across branches).
__device__ __forceinline__ void mbar_arrive_if(unsigned long long* bar, bool pred) {
  asm volatile(
      "{\n"
      ".reg .pred p;\n"
      "setp.ne.u32 p, %1, 0;\n"
      "@p mbarrier.arrive.shared::cta.b64 _, [%0];\n"
      "}\n" ::"r"(smem_u32(bar)),
      "r"(static_cast<unsigned>(pred))
      : "memory");
}

// An arrival made for this thread once every cp.async it issued before has landed; the thread
// goes on at once (cp.async.mbarrier.arrive.noinc: the arrival counts toward the barrier's
// count like a plain one). A producer keeps every free stage in flight this way, where waiting
// for its own copies would hold it a tile behind.
__device__ __forceinline__ void mbar_arrive_on_copies(unsigned long long* bar) {
  asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(smem_u32(bar))
               : "memory");
}

// Waits until the barrier's phase of parity `phase` has completed (phases alternate 0, 1, 0, ...).
__device__ __forceinline__ void mbar_wait(unsigned long long* bar, unsigned phase) {
  asm volatile(
      "{\n"
      ".reg .pred done;\n"
      "wait_%=:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra wait_%=;\n"
      "}\n" ::"r"(smem_u32(bar)),
      "r"(phase)
      : "memory");
}

// Named barrier `id` (1..15; 0 is __syncthreads) over `threads` threads, a multiple of 32: `sync`
// waits for all of them, `arrive` signals without waiting (a warpgroup handing its turn to
// another).
__device__ __forceinline__ void named_sync(unsigned id, unsigned threads) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}
__device__ __forceinline__ void named_arrive(unsigned id, unsigned threads) {
  asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}

// Orders this thread's earlier generic-proxy stores to shared memory before later async-proxy
// accesses (a wgmma reading a tile that threads wrote, a TMA store of it).
__device__ __forceinline__ void fence_proxy_async() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}

}  // namespace fi
