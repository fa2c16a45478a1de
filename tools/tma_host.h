// Pieces shared by the TMA probes (tma_stream.cu, tma_row_gather.cu): exit on a CUDA error,
// cuTensorMapEncodeTiled from the driver through the runtime, as csrc/launch/gemm.cu gets it (no
// link-time libcuda), and the start of a ring of stages with one-arrival barriers.
#pragma once

#include <cuda.h>
#include <cudaTypedefs.h>
#include <cuda_runtime_api.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>

#include "jax_megamoe/ptx/mbarrier.cuh"

namespace tma_tools {

inline void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) {
    std::fprintf(stderr, "%s: %s\n", what, cudaGetErrorString(e));
    std::exit(1);
  }
}

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

}  // namespace tma_tools
