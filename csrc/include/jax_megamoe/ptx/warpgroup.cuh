// Warpgroup-level controls of warp-specialized kernels (sm_90a).
#pragma once

#include <cstdint>

namespace jax_megamoe::ptx {

// Moves this warpgroup's register allocation to kRegs per thread. Takes effect only in a kernel
// with a register cap at entry (__launch_bounds__(threads, 1)); every thread of the warpgroup
// executes the same call.
template <int kRegs>
__device__ __forceinline__ void setmaxnreg_inc() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(kRegs));
}
template <int kRegs>
__device__ __forceinline__ void setmaxnreg_dec() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(kRegs));
}

// Hardware barrier kId (1..15; 0 is __syncthreads) over kThreads threads (a multiple of 32):
// synchronises a subset of the CTA's warps, e.g. the math warpgroups without the producer.
template <int kId, int kThreads>
__device__ __forceinline__ void named_barrier_sync() {
  static_assert(kId >= 1 && kId < 16 && kThreads % 32 == 0, "barrier 0 is __syncthreads");
  asm volatile("bar.sync %0, %1;\n" ::"n"(kId), "n"(kThreads) : "memory");
}

// The same with a barrier id known only at run time (e.g. one barrier per warpgroup).
template <int kThreads>
__device__ __forceinline__ void named_barrier_sync(int id) {
  static_assert(kThreads % 32 == 0, "barriers count whole warps");
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "n"(kThreads) : "memory");
}

}  // namespace jax_megamoe::ptx
