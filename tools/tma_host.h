// Pieces shared by the TMA probes (tma_stream.cu, tma_row_gather.cu): exit on a CUDA error,
// cuTensorMapEncodeTiled from the driver through the runtime, as csrc/launch/gemm.cu gets it (no
// link-time libcuda), the best time of repeated launches, and a ring of stages with one-arrival
// barriers: its start, the consumer's turn on a stage, the step to the next.
#pragma once

#include <cuda.h>
#include <cudaTypedefs.h>
#include <cuda_runtime_api.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>

#include "cuda_check.h"
#include "jax_megamoe/ptx/mbarrier.cuh"

namespace tma_tools {

using cuda_check::check;

// The driver's cuTensorMapEncodeTiled, looked up once.
inline PFN_cuTensorMapEncodeTiled_v12000 encode_tiled() {
  static const PFN_cuTensorMapEncodeTiled_v12000 fn = [] {
    void* found_fn = nullptr;
    cudaDriverEntryPointQueryResult found{};
    check(cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &found_fn, 12000,
                                           cudaEnableDefault, &found),
          "cuTensorMapEncodeTiled lookup");
    if (found != cudaDriverEntryPointSuccess || found_fn == nullptr) {
      std::fprintf(stderr, "cuTensorMapEncodeTiled not found\n");
      std::exit(1);
    }
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(found_fn);
  }();
  return fn;
}

// The fastest of `reps` runs of launch(), in ms, by CUDA events.
template <class Launch>
float best_ms(int reps, const char* what, Launch&& launch) {
  cudaEvent_t e0, e1;
  cudaEventCreate(&e0);
  cudaEventCreate(&e1);
  float best = 1e30f;
  for (int rep = 0; rep < reps; ++rep) {
    cudaEventRecord(e0);
    launch();
    cudaEventRecord(e1);
    check(cudaEventSynchronize(e1), what);
    float ms = 0.f;
    cudaEventElapsedTime(&ms, e0, e1);
    best = ms < best ? ms : best;
  }
  return best;
}

// Thread 0 sets up `stages` full and empty barriers of one arrival each; then the CTA syncs.
__device__ inline void init_ring(uint64_t* full, uint64_t* empty, int stages) {
  if (threadIdx.x == 0) {
    for (int s = 0; s < stages; ++s) {
      jax_megamoe::ptx::mbarrier_init(&full[s], 1);
      jax_megamoe::ptx::mbarrier_init(&empty[s], 1);
    }
    jax_megamoe::ptx::fence_barrier_init();
  }
  __syncthreads();
}

// The consumer's turn on stage `slot` (at `stage`): waits for it to land, reads its first word
// (returned, so that the load is not dropped) and releases it to the producer.
__device__ inline uint32_t consume_stage(uint64_t* full, uint64_t* empty, const uint8_t* stage,
                                         int slot, uint32_t phase) {
  jax_megamoe::ptx::mbarrier_wait(&full[slot], phase);
  const uint32_t word = *reinterpret_cast<const volatile uint32_t*>(stage);
  jax_megamoe::ptx::mbarrier_arrive(&empty[slot]);
  return word;
}

// The ring's next stage: the phase flips at each wrap.
__device__ inline void next_stage(int& slot, uint32_t& phase, int stages) {
  if (++slot == stages) {
    slot = 0;
    phase ^= 1;
  }
}

}  // namespace tma_tools
