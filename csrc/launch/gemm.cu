// Host launchers of the grouped FP8 GEMM kernels (L1: GEMM1 + SwiGLU + requant, L2: GEMM2 +
// combine store), their tile/stage table, and their TMA tensor maps.
#include <cuda.h>
#include <cudaTypedefs.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <string>

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
// Room for the TMA main loop's control block: its full/empty/desc barriers, its tile slots
// (one per stage), its two tile counts and the order of its last pairs
// (GroupedFp8TmaMainloop::kControlBytes).
constexpr int kBarrierReserve = 384;

constexpr int stages_for(int stage_bytes, int reserved_bytes) {
  return std::min(kMaxStages, (kSm90MaxSmemBytes - reserved_bytes) / stage_bytes);
}

// L2 tiles cover 256 hidden columns (two B groups of n128) where H allows (half the A re-reads),
// else 128 (two of n64).
constexpr int kL2WideWgN = 128;
constexpr int kL2NarrowWgN = 64;
bool l2_wide(int hidden) { return hidden % sm90::TileShape<kL2WideWgN>::kBRows == 0; }

template <int kWgN, int kTailRows = 0>
constexpr int kStageBytes = sm90::kRingStageBytes<kWgN, kTailRows>;

// The tile/stage table: every kernel instance, its ring depth and its shared memory. L1's two
// instances (A from the pool, A gathered from the tokens) share one ring depth.
constexpr int kL1Stages =
    stages_for(kStageBytes<sm90::kL1WgN, sm90::kL1TailRows>,
               sm90::kSmemAlignSlack + sm90::L1Epilogue<true>::kSmemBytes + kBarrierReserve +
                   sm90::kTailAccBytes<sm90::kL1TailRows> + sm90::kGatherBytes<sm90::kL1TailRows>);
constexpr int kL2WideStages =
    stages_for(kStageBytes<kL2WideWgN>,
               sm90::kSmemAlignSlack + kBarrierReserve + sm90::L2Epilogue<kL2WideWgN>::kSmemBytes);
constexpr int kL2NarrowStages =
    stages_for(kStageBytes<kL2NarrowWgN>, sm90::kSmemAlignSlack + kBarrierReserve +
                                              sm90::L2Epilogue<kL2NarrowWgN>::kSmemBytes);

constexpr auto kL1Kernel = sm90::sm90_fp8_mega_moe_l1<kL1Stages, false>;
constexpr auto kL1GatherKernel = sm90::sm90_fp8_mega_moe_l1<kL1Stages, true>;
constexpr auto kL2WideKernel = sm90::sm90_fp8_mega_moe_l2<kL2WideWgN, kL2WideStages>;
constexpr auto kL2NarrowKernel = sm90::sm90_fp8_mega_moe_l2<kL2NarrowWgN, kL2NarrowStages>;
constexpr int kL1SmemBytes = sm90::l1_smem_bytes<kL1Stages, false>();
constexpr int kL1GatherSmemBytes = sm90::l1_smem_bytes<kL1Stages, true>();
// A change of shared-memory use that moves L1's ring depth must be measured first (a 3-stage
// ring was 2.5 % slower at M = 2048, design.md §4.3): then update this.
static_assert(kL1Stages == 4, "L1's ring was measured with 4 stages");
constexpr int kL2WideSmemBytes = sm90::l2_smem_bytes<kL2WideWgN, kL2WideStages>();
constexpr int kL2NarrowSmemBytes = sm90::l2_smem_bytes<kL2NarrowWgN, kL2NarrowStages>();

static_assert(kL1Stages >= 3 && kL2WideStages >= 3 && kL2NarrowStages >= 3,
              "shallower rings expose load latency");
static_assert(kL1SmemBytes <= kSm90MaxSmemBytes && kL1GatherSmemBytes <= kSm90MaxSmemBytes &&
                  kL2WideSmemBytes <= kSm90MaxSmemBytes && kL2NarrowSmemBytes <= kSm90MaxSmemBytes,
              "kernel exceeds SM90 shared memory");
// The main loop's own layout of its control block (barriers, tile slots, tile counts) at the
// deepest ring the table may pick; it depends on the ring's depth only.
static_assert(sm90::GroupedFp8TmaMainloop<kL2WideWgN, kMaxStages>::kControlBytes <= kBarrierReserve,
              "barrier reserve too small");

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
// swizzled as wgmma's descriptors expect; with groups > 1, viewed as [rows / group_rows]
// [group_rows][k] and read in boxes of `groups` such row ranges, group_rows apart (the B groups
// of a tile in one load). Host-only: no sync, no allocation.
cudaError_t encode_rows(CUtensorMap* map, const void* base, size_t rows, int k, int box_rows,
                        int group_rows = 0, int groups = 1) {
  const auto encode = g_encode_tiled.load(std::memory_order_acquire);
  if (encode == nullptr) return cudaErrorInitializationError;  // prepare_gemm_kernels not run
  const bool grouped = groups > 1;
  if (grouped && (group_rows <= 0 || rows % group_rows != 0)) return cudaErrorInvalidValue;
  const cuuint64_t row_bytes = static_cast<cuuint64_t>(k);
  const cuuint64_t dims[3] = {row_bytes, grouped ? static_cast<cuuint64_t>(group_rows) : rows,
                              grouped ? rows / group_rows : 1};
  const cuuint64_t strides[2] = {row_bytes, row_bytes * (grouped ? group_rows : rows)};
  const cuuint32_t box[3] = {static_cast<cuuint32_t>(sm90::kBlockK),
                             static_cast<cuuint32_t>(box_rows), static_cast<cuuint32_t>(groups)};
  const cuuint32_t element_strides[3] = {1, 1, 1};
  const CUresult r = encode(map, CU_TENSOR_MAP_DATA_TYPE_UINT8, grouped ? 3 : 2,
                            const_cast<void*>(base), dims, strides, box, element_strides,
                            CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                            CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  return r == CUDA_SUCCESS ? cudaSuccess : cudaErrorInvalidValue;
}

// L1's weights [experts * 2I, H] e4m3 as the 5-D view [2 experts][I / 128][16][8][H]: dims 1 and 2
// split a 128-row block's row r = 16 m + j into j (stride H) and m (stride 16 H), and the box
// (2 x 1 x 16 x 8 x 128) visits m first, so shared-memory row c of a group holds weight row
// 16 (c % 8) + c / 8: BRowOrder::kLaneRuns. The gate and the up half of an expert (I rows
// apart) are the outermost dimension's two entries. Host-only: no sync, no allocation.
cudaError_t encode_l1_weights(CUtensorMap* map, const void* w1, int experts, int hidden,
                              int intermediate) {
  const auto encode = g_encode_tiled.load(std::memory_order_acquire);
  if (encode == nullptr) return cudaErrorInitializationError;  // prepare_gemm_kernels not run
  constexpr int kRuns = sm90::kLaneRuns, kRunRows = sm90::kLaneRunRows;  // m, j
  const cuuint64_t h = static_cast<cuuint64_t>(hidden);
  const cuuint64_t dims[5] = {h, kRuns, kRunRows,
                              static_cast<cuuint64_t>(intermediate / kQuantBlock),
                              2 * static_cast<cuuint64_t>(experts)};
  const cuuint64_t strides[4] = {kRunRows * h, h, kQuantBlock * h,
                                 static_cast<cuuint64_t>(intermediate) * h};
  const cuuint32_t box[5] = {static_cast<cuuint32_t>(sm90::kBlockK), kRuns, kRunRows, 1, 2};
  const cuuint32_t element_strides[5] = {1, 1, 1, 1, 1};
  const CUresult r =
      encode(map, CU_TENSOR_MAP_DATA_TYPE_UINT8, 5, const_cast<void*>(w1), dims, strides, box,
             element_strides, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
             CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  return r == CUDA_SUCCESS ? cudaSuccess : cudaErrorInvalidValue;
}

// Tile order: claimed from the caller's counter (scheduler/sm90_grouped_tiles.cuh) when it
// gives one. Against the static order on one H200 (benchmarks/RESULTS.md, 2026-12-02): L1 10 %
// and L2 7 % faster at M = 2048, L2 3 % at 8192, the rest within 1 %. The last kSortedEndPairs
// pairs are claimed most expensive first (TileScheduler, "The grid's end").
// JAX_MEGAMOE_GEMM_TILES=static forces the static order, =pool_order claims every pair in the
// pool's order, for A/B measurements in one build; read once.
constexpr int kSortedEndPairs = sm90::TileScheduler::kMaxSortedPairs;

enum class TileOrder { kClaimed, kPoolOrder, kStatic };
TileOrder tile_order() {
  static const TileOrder order = [] {
    const char* mode = std::getenv("JAX_MEGAMOE_GEMM_TILES");
    const std::string m = mode == nullptr ? "" : mode;
    return m == "static"       ? TileOrder::kStatic
           : m == "pool_order" ? TileOrder::kPoolOrder
                               : TileOrder::kClaimed;
  }();
  return order;
}
bool claim_tiles() { return tile_order() != TileOrder::kStatic; }
int sorted_end_pairs() { return tile_order() == TileOrder::kClaimed ? kSortedEndPairs : 0; }

// L1's swap-AB tail (impls/sm90_fp8_grouped_tma_mainloop.cuh): an expert's last row block of
// at most kL1TailRows rows rides along with its last full pair instead of running as a lone
// tile. JAX_MEGAMOE_L1_TAIL=lone runs every such block as a lone tile, for A/B measurements in
// one build; read once.
int l1_tail_rows() {
  static const int rows = [] {
    const char* mode = std::getenv("JAX_MEGAMOE_L1_TAIL");
    return mode != nullptr && std::string(mode) == "lone" ? 0 : sm90::kL1TailRows;
  }();
  return rows;
}

}  // namespace

bool poison_outputs() {
  static const bool on = [] {
    const char* value = std::getenv("JAX_MEGAMOE_POISON_OUTPUTS");
    return value != nullptr && std::string(value) == "1";
  }();
  return on;
}

cudaError_t poison(void* p, size_t bytes, cudaStream_t stream) {
  return poison_outputs() && bytes > 0 ? cudaMemsetAsync(p, 0xFF, bytes, stream) : cudaSuccess;
}

namespace {

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

cudaError_t encode_l1(const L1Params& p, GemmTensorMaps* maps) {
  if (p.num_ctas <= 0 || p.hidden % kQuantBlock != 0 || p.intermediate % kQuantBlock != 0)
    return cudaErrorInvalidValue;
  const bool gather = p.x != nullptr;  // then A's maps stay unused, and `a` may name no memory
  if (gather && (p.x_scale == nullptr || p.topk <= 0)) return cudaErrorInvalidValue;
  *maps = {};
  const size_t pool_rows = size_t(p.max_blocks) * kBlockM;
  cudaError_t err = encode_l1_weights(&maps->b, p.w1, p.num_experts, p.hidden, p.intermediate);
  if (err == cudaSuccess && !gather) err = encode_rows(&maps->a, p.a, pool_rows, p.hidden, kBlockM);
  if (err == cudaSuccess && !gather)
    err = encode_rows(&maps->a_pair, p.a, pool_rows, p.hidden, sm90::kTileM);
  if (err == cudaSuccess && !gather)
    err = encode_rows(&maps->tail, p.a, pool_rows, p.hidden, sm90::kL1TailRows);
  return err;
}

cudaError_t launch_l1(const L1Params& p, const GemmTensorMaps& maps, cudaStream_t stream) {
  sm90::L1KernelParams k{};
  k.p = p;
  if (!claim_tiles()) k.p.tile_claims = nullptr;
  k.maps = maps;
  k.tail_rows = l1_tail_rows();
  k.sorted_pairs = sorted_end_pairs();
  if (p.x != nullptr) {
    kL1GatherKernel<<<p.num_ctas, sm90::kNumThreads, kL1GatherSmemBytes, stream>>>(k);
  } else {
    kL1Kernel<<<p.num_ctas, sm90::kNumThreads, kL1SmemBytes, stream>>>(k);
  }
  return cudaGetLastError();
}

namespace {

template <int kWgN>
cudaError_t encode_l2_as(const L2Params& p, GemmTensorMaps* maps) {
  *maps = {};
  const size_t pool_rows = size_t(p.max_blocks) * kBlockM;
  const size_t w_rows = size_t(p.num_experts) * p.hidden;
  cudaError_t err = encode_rows(&maps->a, p.act, pool_rows, p.intermediate, kBlockM);
  if (err == cudaSuccess)
    err = encode_rows(&maps->a_pair, p.act, pool_rows, p.intermediate, sm90::kTileM);
  if (err == cudaSuccess)  // a tile's two groups of kWgN hidden rows, adjacent
    err = encode_rows(&maps->b, p.w2, w_rows, p.intermediate, kWgN, kWgN, 2);
  return err;
}

template <class Kernel>
cudaError_t launch_l2_as(Kernel kernel, int smem_bytes, const L2Params& p,
                         const GemmTensorMaps& maps, cudaStream_t stream) {
  sm90::L2KernelParams k{};
  k.p = p;
  if (!claim_tiles()) k.p.tile_claims = nullptr;
  k.maps = maps;
  k.sorted_pairs = sorted_end_pairs();
  if (p.block_stored == nullptr) {
    kernel<<<p.num_ctas, sm90::kNumThreads, smem_bytes, stream>>>(k);
    return cudaGetLastError();
  }
  // A programmatic dependent of L1 (the kernel before it): its CTAs may start on the SMs that
  // L1's finished CTAs leave, and wait for the row blocks they read (L2Params::block_stored).
  cudaLaunchAttribute overlap{};
  overlap.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  overlap.val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t config{};
  config.gridDim = dim3(p.num_ctas);
  config.blockDim = dim3(sm90::kNumThreads);
  config.dynamicSmemBytes = smem_bytes;
  config.stream = stream;
  config.attrs = &overlap;
  config.numAttrs = 1;
  return cudaLaunchKernelEx(&config, kernel, k);
}

}  // namespace

cudaError_t encode_l2(const L2Params& p, GemmTensorMaps* maps) {
  if (p.num_ctas <= 0 || p.hidden % kQuantBlock != 0 || p.intermediate % kQuantBlock != 0)
    return cudaErrorInvalidValue;
  return l2_wide(p.hidden) ? encode_l2_as<kL2WideWgN>(p, maps)
                           : encode_l2_as<kL2NarrowWgN>(p, maps);
}

cudaError_t launch_l2(const L2Params& p, const GemmTensorMaps& maps, cudaStream_t stream) {
  return l2_wide(p.hidden) ? launch_l2_as(kL2WideKernel, kL2WideSmemBytes, p, maps, stream)
                           : launch_l2_as(kL2NarrowKernel, kL2NarrowSmemBytes, p, maps, stream);
}

cudaError_t launch_l1(const L1Params& p, cudaStream_t stream) {
  GemmTensorMaps maps;
  const cudaError_t err = encode_l1(p, &maps);
  return err == cudaSuccess ? launch_l1(p, maps, stream) : err;
}

cudaError_t launch_l2(const L2Params& p, cudaStream_t stream) {
  GemmTensorMaps maps;
  const cudaError_t err = encode_l2(p, &maps);
  return err == cudaSuccess ? launch_l2(p, maps, stream) : err;
}

cudaError_t prepare_gemm_kernels() {
  // The launchers' environment settings are read once; read them here, at setup, rather than
  // first inside execute on XLA's threads, where getenv could race a setenv elsewhere.
  (void)claim_tiles();
  (void)l1_tail_rows();
  (void)poison_outputs();
  cudaError_t err = load_encode_tiled();
  if (err == cudaSuccess) err = prepare(kL1Kernel, kL1SmemBytes);
  if (err == cudaSuccess) err = prepare(kL1GatherKernel, kL1GatherSmemBytes);
  if (err == cudaSuccess) err = prepare(kL2WideKernel, kL2WideSmemBytes);
  if (err == cudaSuccess) err = prepare(kL2NarrowKernel, kL2NarrowSmemBytes);
  return err;
}

int gemm_ctas_per_sm() { return kCtasPerSm; }

namespace {
template <bool kGatherA>
void add_l1_private_smem(std::vector<SmemRange>& ranges) {
  using Mainloop = sm90::L1Mainloop<kL1Stages, kGatherA>;
  const std::string l1 = "jax_megamoe::sm90::sm90_fp8_mega_moe_l1<" + std::to_string(kL1Stages) +
                         (kGatherA ? ", true>" : ", false>");
  using Epilogue = sm90::L1EpilogueFor<kGatherA>;
  // The epilogue's shared memory follows the main loop's: its lone-block row maxima first, each
  // math thread's prefetched rows last.
  ranges.push_back({l1, "lone-block row maxima", Mainloop::kSmemBytes,
                    Mainloop::kSmemBytes + Epilogue::kAmaxBytes});
  ranges.push_back({l1, "prefetched rows", Mainloop::kSmemBytes + Epilogue::kRowsOffset,
                    Mainloop::kSmemBytes + Epilogue::kSmemBytes});
  ranges.push_back({l1, "tail accumulators", Mainloop::kTailAccOffset,
                    Mainloop::kTailAccOffset + sm90::kTailAccBytes<sm90::kL1TailRows>});
  if constexpr (kGatherA)
    ranges.push_back({l1, "gather tokens", Mainloop::kGatherTokensOffset, Mainloop::kSmemBytes});
}
}  // namespace

std::vector<SmemRange> gemm_private_smem() {
  std::vector<SmemRange> ranges;
  add_l1_private_smem<false>(ranges);
  add_l1_private_smem<true>(ranges);
  return ranges;
}

}  // namespace jax_megamoe
