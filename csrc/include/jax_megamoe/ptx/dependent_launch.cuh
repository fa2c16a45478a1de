// Programmatic dependent launch and the row-block hand-off between two kernels that overlap
// through it (sm_90): the first signals that its dependents may start, and publishes per-block
// counters with release semantics; the dependent acquires them before it reads the blocks with
// TMA (the async proxy, hence the proxy fence after the acquire). The proxy fence is CCCL's;
// griddepcontrol and the release reduction / acquire load have no `cuda::ptx` wrapper (CUDA 13.0).
#pragma once

#include <cstdint>
#include <cuda/ptx>

namespace jax_megamoe::ptx {

// Lets the next kernel of the stream, if launched as a programmatic dependent, start once every
// CTA of this grid has executed this or exited. No effect on a normally launched next kernel.
__device__ __forceinline__ void launch_dependents() {
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
}

// counter += 1, ordered after this thread's earlier writes (and, after a barrier, its
// warpgroup's) for any thread of the GPU that acquires the counter.
__device__ __forceinline__ void red_release_gpu_add(int32_t* counter, int32_t v) {
  asm volatile("red.release.gpu.global.add.s32 [%0], %1;" ::"l"(counter), "r"(v) : "memory");
}

__device__ __forceinline__ int32_t ld_acquire_gpu(const int32_t* counter) {
  int32_t v;
  asm volatile("ld.acquire.gpu.global.s32 %0, [%1];" : "=r"(v) : "l"(counter) : "memory");
  return v;
}

// Orders this thread's generic-proxy view of global memory (what an acquire made visible)
// before its later async-proxy (TMA) reads.
__device__ __forceinline__ void fence_proxy_async_global() {
  cuda::ptx::fence_proxy_async(cuda::ptx::space_global);
}

}  // namespace jax_megamoe::ptx
