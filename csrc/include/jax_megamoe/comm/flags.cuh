// Cross-rank epoch flags. A rank publishes "my data for epoch e is ready" by a system-scope
// release store of e into a u64 in the reader's workspace; the reader spins with system-scope
// acquire loads on its own memory until the value reaches e. Epochs only grow, so a flag that is
// already ahead (a skewed peer) still satisfies `>=`.
#pragma once

#include <cstdint>
#include <cstdio>

#include "jax_megamoe/ptx/mbarrier.cuh"

namespace jax_megamoe::comm {

__device__ __forceinline__ void st_release_sys(uint64_t* flag, uint64_t value) {
  asm volatile("st.release.sys.global.u64 [%0], %1;" ::"l"(flag), "l"(value) : "memory");
}

__device__ __forceinline__ uint64_t ld_acquire_sys(const uint64_t* flag) {
  uint64_t value;
  asm volatile("ld.acquire.sys.global.u64 %0, [%1];" : "=l"(value) : "l"(flag) : "memory");
  return value;
}

// A status word published beside a flag: stored before the flag's release (which orders it for
// the peer), loaded after the flag's acquire (which orders the load after it).
__device__ __forceinline__ void st_relaxed_sys(int32_t* word, int32_t value) {
  asm volatile("st.relaxed.sys.global.s32 [%0], %1;" ::"l"(word), "r"(value) : "memory");
}

__device__ __forceinline__ int32_t ld_relaxed_sys(const int32_t* word) {
  int32_t value;
  asm volatile("ld.relaxed.sys.global.s32 %0, [%1];" : "=r"(value) : "l"(word) : "memory");
  return value;
}

// Single-thread wait until flags[s] >= epoch for every rank s. Returns -1, or, past the timeout,
// the rank it was waiting for (its flag's value in *seen) after printing one line (device printf,
// which reaches the process's stdout): the caller records the error and aborts the call, so a
// protocol error is neither a silent hang nor a trap that would kill the process's CUDA context.
__device__ __forceinline__ int wait_all_ranks(const uint64_t* flags, int num_ranks, uint64_t epoch,
                                              uint64_t timeout_ns, int rank, const char* phase,
                                              uint64_t* seen) {
  const uint64_t start = ptx::globaltimer_ns();
  for (int s = 0; s < num_ranks; ++s) {
    while ((*seen = ld_acquire_sys(flags + s)) < epoch) {
      if (ptx::globaltimer_ns() - start > timeout_ns) {
        printf(
            "jax_megamoe: rank %d timed out after %.1f s in phase '%s' waiting for rank %d "
            "(epoch %llu, its flag holds %llu); the call's output is NaN and the buffer refuses "
            "every further call (SymmBuffer.check() raises the details). Every rank must issue "
            "the same sequence of fp8_mega_moe calls on a buffer; raise the timeout if a peer is "
            "only slow.\n",
            rank, double(timeout_ns) * 1e-9, phase, s, static_cast<unsigned long long>(epoch),
            static_cast<unsigned long long>(*seen));
        return s;
      }
      __nanosleep(128);
    }
  }
  return -1;
}

}  // namespace jax_megamoe::comm
