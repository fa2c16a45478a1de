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

}  // namespace jax_megamoe::ptx
