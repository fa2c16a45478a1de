// Host launchers of the grouped FP8 GEMM kernels (L1: GEMM1 + SwiGLU + requant, L2: GEMM2 +
// combine store) and their tile/stage table.
#include <algorithm>

#include "jax_megamoe/impls/sm90_fp8_mega_moe_l1.cuh"
#include "jax_megamoe/impls/sm90_fp8_mega_moe_l2.cuh"
#include "jax_megamoe/launch.h"

namespace jax_megamoe {
namespace {

// Opt-in dynamic shared memory per block on SM90.
constexpr int kSm90MaxSmemBytes = 227 * 1024;
// Beyond this, deeper rings stop helping one CTA of two warpgroups hide load latency.
constexpr int kMaxStages = 8;
// One CTA per SM: the ring takes most of shared memory and the accumulators most registers.
constexpr int kCtasPerSm = 1;

constexpr int stages_for(int stage_bytes, int reserved_bytes) {
  return std::min(kMaxStages, (kSm90MaxSmemBytes - reserved_bytes) / stage_bytes);
}

constexpr int kL1Stages = stages_for(sm90::TileShape<sm90::kL1WgN>::kStageBytes,
                                     sm90::kSmemAlignSlack + sm90::L1Epilogue::kSmemBytes);
// L2 tiles cover 256 hidden columns (two wgmma m64n128) where H allows (half the A re-reads),
// else 128 (two m64n64).
constexpr int kL2WideWgN = 128;
constexpr int kL2NarrowWgN = 64;
constexpr int kL2WideStages =
    stages_for(sm90::TileShape<kL2WideWgN>::kStageBytes, sm90::kSmemAlignSlack);
constexpr int kL2NarrowStages =
    stages_for(sm90::TileShape<kL2NarrowWgN>::kStageBytes, sm90::kSmemAlignSlack);

constexpr auto kL1Kernel = sm90::sm90_fp8_mega_moe_l1<kL1Stages>;
constexpr auto kL2WideKernel = sm90::sm90_fp8_mega_moe_l2<kL2WideWgN, kL2WideStages>;
constexpr auto kL2NarrowKernel = sm90::sm90_fp8_mega_moe_l2<kL2NarrowWgN, kL2NarrowStages>;
constexpr int kL1SmemBytes = sm90::l1_smem_bytes<kL1Stages>();
constexpr int kL2WideSmemBytes = sm90::l2_smem_bytes<kL2WideWgN, kL2WideStages>();
constexpr int kL2NarrowSmemBytes = sm90::l2_smem_bytes<kL2NarrowWgN, kL2NarrowStages>();
static_assert(kL1Stages >= 3 && kL2WideStages >= 3 && kL2NarrowStages >= 3,
              "shallower rings expose load latency");
static_assert(kL1SmemBytes <= kSm90MaxSmemBytes && kL2WideSmemBytes <= kSm90MaxSmemBytes &&
                  kL2NarrowSmemBytes <= kSm90MaxSmemBytes,
              "kernel exceeds SM90 shared memory");

bool l2_wide(int hidden) { return hidden % (sm90::kNumWarpGroups * kL2WideWgN) == 0; }

template <class Kernel>
cudaError_t prepare(Kernel kernel, int smem_bytes) {
  cudaError_t err =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes);
  if (err != cudaSuccess) return err;
  // Forces the module load now rather than at the first launch inside execute.
  cudaFuncAttributes attr;
  return cudaFuncGetAttributes(&attr, kernel);
}

}  // namespace

cudaError_t launch_l1(const L1Params& p, cudaStream_t stream) {
  if (p.num_ctas <= 0 || p.hidden % kQuantBlock != 0 || p.intermediate % kQuantBlock != 0)
    return cudaErrorInvalidValue;
  kL1Kernel<<<p.num_ctas, sm90::kNumThreads, kL1SmemBytes, stream>>>(p);
  return cudaGetLastError();
}

cudaError_t launch_l2(const L2Params& p, cudaStream_t stream) {
  if (p.num_ctas <= 0 || p.hidden % kQuantBlock != 0 || p.intermediate % kQuantBlock != 0)
    return cudaErrorInvalidValue;
  if (l2_wide(p.hidden))
    kL2WideKernel<<<p.num_ctas, sm90::kNumThreads, kL2WideSmemBytes, stream>>>(p);
  else
    kL2NarrowKernel<<<p.num_ctas, sm90::kNumThreads, kL2NarrowSmemBytes, stream>>>(p);
  return cudaGetLastError();
}

cudaError_t prepare_gemm_kernels() {
  cudaError_t err = prepare(kL1Kernel, kL1SmemBytes);
  if (err == cudaSuccess) err = prepare(kL2WideKernel, kL2WideSmemBytes);
  if (err == cudaSuccess) err = prepare(kL2NarrowKernel, kL2NarrowSmemBytes);
  return err;
}

int gemm_ctas_per_sm() { return kCtasPerSm; }

}  // namespace jax_megamoe
