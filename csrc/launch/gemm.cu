// Host launchers of the grouped FP8 GEMM kernels (L1: GEMM1 + SwiGLU + requant, L2: GEMM2 +
// combine store), their tile/stage table, and the TMA tensor maps of the TMA main loop.
#include <cuda.h>
#include <cudaTypedefs.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>

#include "jax_megamoe/impls/sm90_fp8_mega_moe_l1.cuh"
#include "jax_megamoe/impls/sm90_fp8_mega_moe_l2.cuh"
#include "jax_megamoe/launch.h"

namespace jax_megamoe {
namespace {

// Opt-in dynamic shared memory per block on SM90.
constexpr int kSm90MaxSmemBytes = 227 * 1024;
// Beyond this, deeper rings stop helping hide load latency.
constexpr int kMaxStages = 8;
// One CTA per SM: the ring takes most of shared memory and the accumulators most registers.
constexpr int kCtasPerSm = 1;
// Room for the TMA main loop's full/empty barriers (2 x kMaxStages x 8 bytes).
constexpr int kBarrierReserve = 128;

constexpr int stages_for(int stage_bytes, int reserved_bytes) {
  return std::min(kMaxStages, (kSm90MaxSmemBytes - reserved_bytes) / stage_bytes);
}

// L2 tiles cover 256 hidden columns (two wgmma m64n128) where H allows (half the A re-reads),
// else 128 (two m64n64).
constexpr int kL2WideWgN = 128;
constexpr int kL2NarrowWgN = 64;
bool l2_wide(int hidden) { return hidden % (sm90::kNumMathWarpGroups * kL2WideWgN) == 0; }

template <int kWgN>
constexpr int kStageBytes = sm90::TileShape<kWgN>::kStageBytes;

// The tile/stage table: every kernel instance, its ring depth and its shared memory.
constexpr int kL1Stages =
    stages_for(kStageBytes<sm90::kL1WgN>, sm90::kSmemAlignSlack + sm90::L1Epilogue::kSmemBytes);
constexpr int kL1TmaStages =
    stages_for(kStageBytes<sm90::kL1WgN>,
               sm90::kSmemAlignSlack + sm90::L1Epilogue::kSmemBytes + kBarrierReserve);
constexpr int kL2WideStages = stages_for(kStageBytes<kL2WideWgN>, sm90::kSmemAlignSlack);
constexpr int kL2NarrowStages = stages_for(kStageBytes<kL2NarrowWgN>, sm90::kSmemAlignSlack);
constexpr int kL2WideTmaStages =
    stages_for(kStageBytes<kL2WideWgN>, sm90::kSmemAlignSlack + kBarrierReserve);
constexpr int kL2NarrowTmaStages =
    stages_for(kStageBytes<kL2NarrowWgN>, sm90::kSmemAlignSlack + kBarrierReserve);

using L1Sync = sm90::GroupedFp8Mainloop<sm90::kL1WgN, kL1Stages>;
using L1Tma = sm90::GroupedFp8TmaMainloop<sm90::kL1WgN, kL1TmaStages>;
using L2WideSync = sm90::GroupedFp8Mainloop<kL2WideWgN, kL2WideStages>;
using L2NarrowSync = sm90::GroupedFp8Mainloop<kL2NarrowWgN, kL2NarrowStages>;
using L2WideTma = sm90::GroupedFp8TmaMainloop<kL2WideWgN, kL2WideTmaStages>;
using L2NarrowTma = sm90::GroupedFp8TmaMainloop<kL2NarrowWgN, kL2NarrowTmaStages>;

constexpr auto kL1Kernel = sm90::sm90_fp8_mega_moe_l1<kL1Stages>;
constexpr auto kL1TmaKernel = sm90::sm90_fp8_mega_moe_l1_tma<kL1TmaStages>;
constexpr auto kL2WideKernel = sm90::sm90_fp8_mega_moe_l2<kL2WideWgN, kL2WideStages>;
constexpr auto kL2NarrowKernel = sm90::sm90_fp8_mega_moe_l2<kL2NarrowWgN, kL2NarrowStages>;
constexpr auto kL2WideTmaKernel = sm90::sm90_fp8_mega_moe_l2_tma<kL2WideWgN, kL2WideTmaStages>;
constexpr auto kL2NarrowTmaKernel =
    sm90::sm90_fp8_mega_moe_l2_tma<kL2NarrowWgN, kL2NarrowTmaStages>;

constexpr int kL1SmemBytes = sm90::l1_smem_bytes<L1Sync>();
constexpr int kL1TmaSmemBytes = sm90::l1_smem_bytes<L1Tma>();
constexpr int kL2WideSmemBytes = sm90::l2_smem_bytes<L2WideSync>();
constexpr int kL2NarrowSmemBytes = sm90::l2_smem_bytes<L2NarrowSync>();
constexpr int kL2WideTmaSmemBytes = sm90::l2_smem_bytes<L2WideTma>();
constexpr int kL2NarrowTmaSmemBytes = sm90::l2_smem_bytes<L2NarrowTma>();

static_assert(kL1Stages >= 3 && kL1TmaStages >= 3 && kL2WideStages >= 3 && kL2NarrowStages >= 3 &&
                  kL2WideTmaStages >= 3 && kL2NarrowTmaStages >= 3,
              "shallower rings expose load latency");
static_assert(std::max({kL1SmemBytes, kL1TmaSmemBytes, kL2WideSmemBytes, kL2NarrowSmemBytes,
                        kL2WideTmaSmemBytes, kL2NarrowTmaSmemBytes}) <= kSm90MaxSmemBytes,
              "kernel exceeds SM90 shared memory");
static_assert(2 * kMaxStages * 8 <= kBarrierReserve, "barrier reserve too small");

// --- Main loop choice -------------------------------------------------------------------------

GemmMainloop mainloop_from_env() {
  const char* v = std::getenv("JAX_MEGAMOE_MAINLOOP");
  if (v != nullptr && std::strcmp(v, "cp_async") == 0) return GemmMainloop::kCpAsync;
  return GemmMainloop::kTma;
}

bool use_tma(GemmMainloop m) {
  static const GemmMainloop from_env = mainloop_from_env();
  return (m == GemmMainloop::kDefault ? from_env : m) == GemmMainloop::kTma;
}

// --- TMA tensor maps --------------------------------------------------------------------------

// cuTensorMapEncodeTiled, from the driver through the runtime (no link-time libcuda dependency);
// looked up in prepare_gemm_kernels, at setup.
std::atomic<PFN_cuTensorMapEncodeTiled_v12000> g_encode_tiled{nullptr};

cudaError_t load_encode_tiled() {
  if (g_encode_tiled.load(std::memory_order_acquire) != nullptr) return cudaSuccess;
  void* fn = nullptr;
  cudaDriverEntryPointQueryResult found{};
  cudaError_t err = cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000,
                                                     cudaEnableDefault, &found);
  if (err != cudaSuccess) return err;
  if (found != cudaDriverEntryPointSuccess || fn == nullptr) return cudaErrorSymbolNotFound;
  g_encode_tiled.store(reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(fn),
                       std::memory_order_release);
  return cudaSuccess;
}

// A row-major [rows, k] e4m3 matrix read in boxes of box_rows x 128 (one K block), 128-byte
// swizzled as wgmma's descriptors expect. Host-only: no sync, no allocation.
cudaError_t encode_rows(CUtensorMap* map, const void* base, size_t rows, int k, int box_rows) {
  const auto encode = g_encode_tiled.load(std::memory_order_acquire);
  if (encode == nullptr) return cudaErrorInitializationError;  // prepare_gemm_kernels not run
  const cuuint64_t dims[2] = {static_cast<cuuint64_t>(k), static_cast<cuuint64_t>(rows)};
  const cuuint64_t strides[1] = {static_cast<cuuint64_t>(k)};
  const cuuint32_t box[2] = {static_cast<cuuint32_t>(sm90::kBlockK),
                             static_cast<cuuint32_t>(box_rows)};
  const cuuint32_t element_strides[2] = {1, 1};
  const CUresult r =
      encode(map, CU_TENSOR_MAP_DATA_TYPE_UINT8, 2, const_cast<void*>(base), dims, strides, box,
             element_strides, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
             CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  return r == CUDA_SUCCESS ? cudaSuccess : cudaErrorInvalidValue;
}

template <class Kernel>
cudaError_t prepare(Kernel kernel, int smem_bytes) {
  cudaError_t err =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes);
  if (err != cudaSuccess) return err;
  // Forces the module load now rather than at the first launch inside execute.
  cudaFuncAttributes attr;
  return cudaFuncGetAttributes(&attr, kernel);
}

cudaError_t launch_l1_tma(const L1Params& p, cudaStream_t stream) {
  sm90::L1TmaParams k{};
  k.p = p;
  const size_t pool_rows = size_t(p.max_blocks) * kBlockM;
  const size_t w_rows = size_t(p.num_experts) * 2 * p.intermediate;
  cudaError_t err = encode_rows(&k.a, p.a, pool_rows, p.hidden, kBlockM);
  if (err == cudaSuccess) err = encode_rows(&k.b, p.w1, w_rows, p.hidden, sm90::kL1WgN);
  if (err != cudaSuccess) return err;
  kL1TmaKernel<<<p.num_ctas, sm90::kTmaNumThreads, kL1TmaSmemBytes, stream>>>(k);
  return cudaGetLastError();
}

template <int kWgN, class Kernel>
cudaError_t launch_l2_tma(Kernel kernel, int smem_bytes, const L2Params& p, cudaStream_t stream) {
  sm90::L2TmaParams k{};
  k.p = p;
  const size_t pool_rows = size_t(p.max_blocks) * kBlockM;
  const size_t w_rows = size_t(p.num_experts) * p.hidden;
  cudaError_t err = encode_rows(&k.a, p.act, pool_rows, p.intermediate, kBlockM);
  if (err == cudaSuccess) err = encode_rows(&k.b, p.w2, w_rows, p.intermediate, kWgN);
  if (err != cudaSuccess) return err;
  kernel<<<p.num_ctas, sm90::kTmaNumThreads, smem_bytes, stream>>>(k);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_l1(const L1Params& p, cudaStream_t stream) {
  if (p.num_ctas <= 0 || p.hidden % kQuantBlock != 0 || p.intermediate % kQuantBlock != 0)
    return cudaErrorInvalidValue;
  if (use_tma(p.mainloop)) return launch_l1_tma(p, stream);
  kL1Kernel<<<p.num_ctas, sm90::kNumThreads, kL1SmemBytes, stream>>>(p);
  return cudaGetLastError();
}

cudaError_t launch_l2(const L2Params& p, cudaStream_t stream) {
  if (p.num_ctas <= 0 || p.hidden % kQuantBlock != 0 || p.intermediate % kQuantBlock != 0)
    return cudaErrorInvalidValue;
  const bool wide = l2_wide(p.hidden);
  if (use_tma(p.mainloop)) {
    return wide ? launch_l2_tma<kL2WideWgN>(kL2WideTmaKernel, kL2WideTmaSmemBytes, p, stream)
                : launch_l2_tma<kL2NarrowWgN>(kL2NarrowTmaKernel, kL2NarrowTmaSmemBytes, p, stream);
  }
  if (wide)
    kL2WideKernel<<<p.num_ctas, sm90::kNumThreads, kL2WideSmemBytes, stream>>>(p);
  else
    kL2NarrowKernel<<<p.num_ctas, sm90::kNumThreads, kL2NarrowSmemBytes, stream>>>(p);
  return cudaGetLastError();
}

cudaError_t prepare_gemm_kernels() {
  cudaError_t err = load_encode_tiled();
  if (err == cudaSuccess) err = prepare(kL1Kernel, kL1SmemBytes);
  if (err == cudaSuccess) err = prepare(kL1TmaKernel, kL1TmaSmemBytes);
  if (err == cudaSuccess) err = prepare(kL2WideKernel, kL2WideSmemBytes);
  if (err == cudaSuccess) err = prepare(kL2NarrowKernel, kL2NarrowSmemBytes);
  if (err == cudaSuccess) err = prepare(kL2WideTmaKernel, kL2WideTmaSmemBytes);
  if (err == cudaSuccess) err = prepare(kL2NarrowTmaKernel, kL2NarrowTmaSmemBytes);
  return err;
}

int gemm_ctas_per_sm() { return kCtasPerSm; }

}  // namespace jax_megamoe
