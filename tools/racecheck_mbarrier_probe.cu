// Does compute-sanitizer's racecheck see the ordering an mbarrier hand-off gives? The GEMM main
// loop reuses a ring slot after exactly such a hand-off: the consumers read the slot, then
// release it with an mbarrier arrival; the producer waits for that phase and only then writes
// the slot again. This program runs that pattern alone in one warp pair, four rounds:
//
//   mode 0  the producer rewrites the slot with cp.async (as the GEMM's scale copies do)
//   mode 1  the same with plain shared-memory stores
//   mode 2  control: after one round the producer stores into the slot without waiting, a
//           real race
//
// Modes 0 and 1 are race-free by the PTX memory model (the reads precede the release arrival,
// the writes follow the acquiring wait). On 2026-12-02 (H200, compute-sanitizer 2025.3.1)
// racecheck reported one hazard in each of the three modes alike, so its reports on the GEMM
// (tools/gemm_sanitize.cu) do not tell an ordered slot reuse from a race. Build and run it as
// benchmarks/device_run.sh's `sanitize` mode does:
//
//   nvcc -std=c++17 -gencode=arch=compute_90a,code=sm_90a -lineinfo -I csrc/include \
//     tools/racecheck_mbarrier_probe.cu -o probe
//   compute-sanitizer --tool racecheck ./probe 1
#include <cuda_runtime_api.h>

#include <cstdio>
#include <cstdlib>

#include "jax_megamoe/ptx/cp_async.cuh"
#include "jax_megamoe/ptx/mbarrier.cuh"
#include "jax_megamoe/ptx/shared.cuh"

namespace {

using namespace jax_megamoe::ptx;

__global__ void hand_off(const float* src, float* out, int mode) {
  __shared__ float slot[32];
  __shared__ uint64_t full, empty;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (threadIdx.x == 0) {
    mbarrier_init(&full, 32);
    mbarrier_init(&empty, 1);
    fence_barrier_init();
  }
  __syncthreads();
  float sum = 0.f;
  const int rounds = mode == 2 ? 1 : 4;
  for (int r = 0; r < rounds; ++r) {
    if (warp == 0) {  // producer
      if (r > 0) mbarrier_wait(&empty, (r - 1) & 1);
      if (mode == 1) {
        slot[lane] = src[r * 32 + lane];
        mbarrier_arrive(&full);
      } else {
        cp_async_4(smem_addr(&slot[lane]), src + r * 32 + lane);
        cp_async_mbarrier_arrive(&full);
      }
    } else {  // consumer
      mbarrier_wait(&full, r & 1);
      sum += slot[lane];
      __syncwarp();
      if (lane == 0) mbarrier_arrive(&empty);
    }
  }
  if (mode == 2 && warp == 0) slot[lane] = 0.f;  // unordered with the consumer's read
  if (warp == 1) out[lane] = sum;
}

}  // namespace

int main(int argc, char** argv) {
  const int mode = argc > 1 ? std::atoi(argv[1]) : 0;
  if (mode < 0 || mode > 2) {
    std::fprintf(stderr, "usage: %s [0|1|2]\n", argv[0]);
    return 2;
  }
  float *src = nullptr, *out = nullptr;
  cudaMalloc(&src, 4 * 32 * sizeof(float));
  cudaMalloc(&out, 32 * sizeof(float));
  cudaMemset(src, 0, 4 * 32 * sizeof(float));
  hand_off<<<1, 64>>>(src, out, mode);
  const cudaError_t err = cudaDeviceSynchronize();
  std::printf("racecheck_mbarrier_probe mode %d: %s\n", mode, cudaGetErrorString(err));
  cudaFree(src);
  cudaFree(out);
  return err == cudaSuccess ? 0 : 1;
}
