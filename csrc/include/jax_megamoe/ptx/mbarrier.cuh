// Shared-memory mbarriers and TMA tile loads (SM90), on CCCL's cuda::ptx wrappers (they ship with
// nvcc), plus a bounded wait: a barrier that never completes (a bad tensor map, a protocol bug)
// ends in a trap instead of a silent hang.
#pragma once

#include <cstdint>
#include <cuda/ptx>

#include "jax_megamoe/ptx/shared.cuh"

namespace jax_megamoe::ptx {

__device__ __forceinline__ void mbarrier_init(uint64_t* bar, uint32_t arrivals) {
  cuda::ptx::mbarrier_init(bar, arrivals);
}

// Makes initialised barriers visible to the async proxy (TMA completes on them) and to the other
// threads of the CTA; follow it with a CTA-wide barrier.
__device__ __forceinline__ void fence_barrier_init() {
  cuda::ptx::fence_mbarrier_init(cuda::ptx::sem_release, cuda::ptx::scope_cluster);
}

__device__ __forceinline__ void mbarrier_arrive(uint64_t* bar) { cuda::ptx::mbarrier_arrive(bar); }

// The barrier at 32-bit shared-memory address `bar` (ptx::smem_addr) as the generic pointer
// CCCL's wrappers take. Code that keeps its barriers as shared-window offsets (a generic pointer
// takes two registers) calls the forms below; the compiler folds this conversion and the
// wrappers' conversion back into one shared address (the SASS is as with inline PTX on `bar`).
__device__ __forceinline__ uint64_t* barrier_at(uint32_t bar) {
  return static_cast<uint64_t*>(smem_ptr(bar));
}

__device__ __forceinline__ void mbarrier_init(uint32_t bar, uint32_t arrivals) {
  mbarrier_init(barrier_at(bar), arrivals);
}
__device__ __forceinline__ void mbarrier_arrive(uint32_t bar) { mbarrier_arrive(barrier_at(bar)); }

// One arrival that also announces `bytes` of asynchronous (TMA) writes the phase must wait for.
__device__ __forceinline__ void mbarrier_arrive_expect_tx(uint64_t* bar, uint32_t bytes) {
  cuda::ptx::mbarrier_arrive_expect_tx(cuda::ptx::sem_release, cuda::ptx::scope_cta,
                                       cuda::ptx::space_shared, bar, bytes);
}

// One arrival, made when every cp.async this thread issued before it has landed.
__device__ __forceinline__ void cp_async_mbarrier_arrive(uint64_t* bar) {
  cuda::ptx::cp_async_mbarrier_arrive_noinc(bar);
}

// Bound of every spin_until (each mbarrier wait, the row-block waits). A GEMM stage completes
// within microseconds; past this the kernel traps (the launch fails with an error instead of
// hanging). No printf here: a call inside the math warpgroups' loop would make ptxas serialize
// their wgmma.
constexpr uint64_t kBarrierTimeoutNs = 10ull * 1000 * 1000 * 1000;

// Nanoseconds of a clock shared by all SMs of the device; unlike clock64 it is not per-SM and
// does not scale with the SM frequency.
__device__ __forceinline__ uint64_t globaltimer_ns() { return cuda::ptx::get_sreg_globaltimer(); }

// Polls done() until it holds, trapping past kBarrierTimeoutNs; the clock is read only once the
// first poll has failed.
template <class Done>
__device__ __forceinline__ void spin_until(Done done) {
  if (done()) return;
  const uint64_t start = globaltimer_ns();
  while (!done()) {
    if (globaltimer_ns() - start > kBarrierTimeoutNs) __trap();
  }
}

// Whether the phase with parity `parity` of the barrier at `bar` has completed; the hardware may
// suspend the thread a while before answering no.
__device__ __forceinline__ bool mbarrier_try_wait(uint32_t bar, uint32_t parity) {
  return cuda::ptx::mbarrier_try_wait_parity(barrier_at(bar), parity);
}

// The same, but the thread may sleep until the phase completes or about `suspend_ns` have passed
// (a hint): a waiter that should not take issue slots from the warps beside it.
__device__ __forceinline__ bool mbarrier_try_wait_sleep(uint32_t bar, uint32_t parity,
                                                        uint32_t suspend_ns) {
  return cuda::ptx::mbarrier_try_wait_parity(barrier_at(bar), parity, suspend_ns);
}

// Whether that phase has completed, without waiting.
__device__ __forceinline__ bool mbarrier_test_wait(uint32_t bar, uint32_t parity) {
  return cuda::ptx::mbarrier_test_wait_parity(barrier_at(bar), parity);
}

// Waits until that phase has completed.
__device__ __forceinline__ void mbarrier_wait(uint32_t bar, uint32_t parity) {
  spin_until([&] { return mbarrier_try_wait(bar, parity); });
}

// The same at a generic pointer into shared memory.
__device__ __forceinline__ void mbarrier_wait(uint64_t* bar, uint32_t parity) {
  mbarrier_wait(static_cast<uint32_t>(__cvta_generic_to_shared(bar)), parity);
}

// 2-D TMA tile load of the box at (inner, outer) of `tensor_map` into shared memory, completing
// `bytes` on `bar` (counted by the arrive_expect_tx of the stage).
__device__ __forceinline__ void tma_load_2d(void* smem_dst, const void* tensor_map, int inner,
                                            int outer, uint64_t* bar) {
  const int32_t coords[2] = {inner, outer};
  cuda::ptx::cp_async_bulk_tensor(cuda::ptx::space_cluster, cuda::ptx::space_global, smem_dst,
                                  tensor_map, coords, bar);
}

// The 3-D form: coordinates (inner, middle, outer).
__device__ __forceinline__ void tma_load_3d(void* smem_dst, const void* tensor_map, int inner,
                                            int middle, int outer, uint64_t* bar) {
  const int32_t coords[3] = {inner, middle, outer};
  cuda::ptx::cp_async_bulk_tensor(cuda::ptx::space_cluster, cuda::ptx::space_global, smem_dst,
                                  tensor_map, coords, bar);
}

// The 5-D form: coordinates from the innermost.
__device__ __forceinline__ void tma_load_5d(void* smem_dst, const void* tensor_map,
                                            const int32_t (&coords)[5], uint64_t* bar) {
  cuda::ptx::cp_async_bulk_tensor(cuda::ptx::space_cluster, cuda::ptx::space_global, smem_dst,
                                  tensor_map, coords, bar);
}

}  // namespace jax_megamoe::ptx
