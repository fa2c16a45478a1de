// How fast can one CTA per SM stream expert weights from HBM with TMA, the way the grouped GEMMs
// do at small M, where the weight stream is the whole cost? No math: a producer thread fills a
// ring of 32 KB stages (two 128-row x 128-byte boxes: one K block of a 256-row weight tile, as L1
// loads its gate and up groups) and a consumer thread releases each stage once it has landed, so
// the kernel's time is the stream's alone. Each variant changes one thing:
//
//   layout  rows   the weights row-major [rows, K], each box 128 rows x 128 B at a row stride of
//                  K bytes (what the GEMMs read today: W1 with K = 7168, W2 with K = 2048)
//           tiled  the same bytes laid out so that each box is 16 KB contiguous (a weight layout
//                  transform_weights could produce)
//   stages  ring depth (bytes in flight per SM = stages x 32 KB)
//   pause   the consumer stops for this long after each tile, as the math warps do for an
//           epilogue: the producer can run only the ring ahead meanwhile
//   tiles   688 tiles of 256 rows x 7168 (the layer's L1 at M = 8: 5.21 rounds of 132 CTAs) or
//           whole rounds only
//
// Prints each variant's GB/s and its time against the bytes at the device-to-device copy rate
// measured first (read + write, as benchmarks/bench_gemm.py reports it).
//
// Build and run (benchmarks/device_run.sh `stream` mode):
//   nvcc -std=c++17 -O3 -gencode=arch=compute_90a,code=sm_90a --expt-relaxed-constexpr \
//     -I csrc/include tools/tma_stream.cu -o tma_stream && ./tma_stream
#include <cuda.h>
#include <cudaTypedefs.h>
#include <cuda_runtime_api.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>

#include "jax_megamoe/layout/sm90_gemm_tile.cuh"
#include "jax_megamoe/ptx/mbarrier.cuh"
#include "tma_host.h"

namespace {

using namespace jax_megamoe::sm90;
namespace ptx = jax_megamoe::ptx;
using tma_tools::best_ms;
using tma_tools::check;

constexpr int kBoxRows = 128;
constexpr int kBoxBytes = kBoxRows * kBlockK;  // 16 KB
constexpr int kTileRows = 2 * kBoxRows;        // one gate and one up group, as in L1
constexpr int kStageBytes = 2 * kBoxBytes;
constexpr int kMaxStages = 6;
constexpr int kSmemBytes = kMaxStages * kStageBytes + kSwizzleAtomBytes + 2 * kMaxStages * 8;

enum class Layout { kRows, kTiled };

struct StreamArgs {
  int tiles;
  int num_kb;  // K blocks of 128 bytes per weight row
  Layout layout;
  long long pause_ns;
};

__device__ void spin_ns(long long ns) {
  const uint64_t start = ptx::globaltimer_ns();
  while (static_cast<long long>(ptx::globaltimer_ns() - start) < ns) {
  }
}

// Thread 0 produces, thread 32 consumes; every CTA walks tiles blockIdx.x, +gridDim.x, ...
template <int kStages>
__global__ void __launch_bounds__(64, 1)
    stream(const __grid_constant__ CUtensorMap map, StreamArgs a, uint32_t* sink) {
  extern __shared__ uint8_t smem_raw[];
  uint8_t* ring = align_smem(smem_raw);
  uint64_t* full = reinterpret_cast<uint64_t*>(ring + kStages * kStageBytes);
  uint64_t* empty = full + kStages;
  tma_tools::init_ring(full, empty, kStages);
  const bool producer = threadIdx.x == 0, consumer = threadIdx.x == 32;
  if (!producer && !consumer) return;
  int slot = 0;
  uint32_t phase = 0, seen = 0;
  for (int tile = blockIdx.x; tile < a.tiles; tile += gridDim.x) {
    for (int kb = 0; kb < a.num_kb; ++kb) {
      if (producer) {
        ptx::mbarrier_wait(&empty[slot], phase ^ 1);
        ptx::mbarrier_arrive_expect_tx(&full[slot], kStageBytes);
        for (int g = 0; g < 2; ++g) {
          uint8_t* dst = ring + slot * kStageBytes + g * kBoxBytes;
          const int box = tile * 2 + g;  // the 128-row group
          if (a.layout == Layout::kRows)
            ptx::tma_load_2d(dst, &map, kb * kBlockK, box * kBoxRows, &full[slot]);
          else
            ptx::tma_load_2d(dst, &map, 0, (box * a.num_kb + kb) * kBoxRows, &full[slot]);
        }
      } else {
        seen ^= tma_tools::consume_stage(full, empty, ring + slot * kStageBytes, slot, phase);
      }
      tma_tools::next_stage(slot, phase, kStages);
    }
    if (consumer && a.pause_ns > 0) spin_ns(a.pause_ns);
  }
  if (consumer) sink[blockIdx.x] = seen;
}

// The weights as the variant reads them: [rows, K] in boxes of 128 rows x 128 B, or
// [rows * num_kb, 128] so that one box is 16 KB contiguous; 128B-swizzled like the GEMMs' maps.
CUtensorMap encode(void* base, size_t rows, int num_kb, Layout layout, bool promote_256) {
  const bool tiled = layout == Layout::kTiled;
  const cuuint64_t dims[2] = {tiled ? cuuint64_t(kBlockK) : cuuint64_t(num_kb) * kBlockK,
                              tiled ? rows * num_kb : rows};
  const cuuint64_t strides[1] = {tiled ? cuuint64_t(kBlockK) : cuuint64_t(num_kb) * kBlockK};
  const cuuint32_t box[2] = {kBlockK, kBoxRows};
  const cuuint32_t element_strides[2] = {1, 1};
  const PFN_cuTensorMapEncodeTiled_v12000 encode_tiled = tma_tools::encode_tiled();
  CUtensorMap map;
  const CUresult r = encode_tiled(
      &map, CU_TENSOR_MAP_DATA_TYPE_UINT8, 2, base, dims, strides, box, element_strides,
      CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
      promote_256 ? CU_TENSOR_MAP_L2_PROMOTION_L2_256B : CU_TENSOR_MAP_L2_PROMOTION_NONE,
      CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (r != CUDA_SUCCESS) {
    std::fprintf(stderr, "cuTensorMapEncodeTiled failed (%d)\n", static_cast<int>(r));
    std::exit(1);
  }
  return map;
}

struct Variant {
  const char* what;
  int stages;
  Layout layout;
  int k;      // bytes per weight row
  int tiles;  // of kTileRows rows; 0: the bytes of 688 tiles at K = 7168
  long long pause_ns;
  bool promote_256;
};

template <int kStages>
float time_variant(const CUtensorMap& map, const StreamArgs& a, int sms, uint32_t* sink) {
  auto kernel = stream<kStages>;
  check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes),
        "smem attribute");
  kernel<<<sms, 64, kSmemBytes>>>(map, a, sink);  // warm-up
  return best_ms(5, "stream kernel", [&] { kernel<<<sms, 64, kSmemBytes>>>(map, a, sink); });
}

}  // namespace

int main() {
  int sms = 0;
  check(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0), "device");
  constexpr int kLayerTiles = 688;  // the layer's L1 at M = 8 (43 experts x 16 N tiles)
  const size_t bytes = size_t(kLayerTiles) * kTileRows * 7168;
  void* weights;
  void* copy;
  uint32_t* sink;
  check(cudaMalloc(&weights, bytes), "malloc");
  check(cudaMalloc(&copy, bytes), "malloc");
  check(cudaMalloc(&sink, sms * sizeof(uint32_t)), "malloc");
  check(cudaMemset(weights, 0x3c, bytes), "memset");

  // The copy rate, as bench_gemm.py measures it: bytes read + written per second.
  const float copy_ms =
      best_ms(4, "copy", [&] { cudaMemcpyAsync(copy, weights, bytes, cudaMemcpyDeviceToDevice); });
  const double copy_rate = 2.0 * bytes / (copy_ms * 1e-3);
  std::printf("%d SMs, one CTA each; HBM copy rate %.2f TB/s (read + write)\n", sms,
              copy_rate / 1e12);

  const int whole = (kLayerTiles / sms) * sms;
  const Variant variants[] = {
      {"rows K=7168, 4 stages (L1 today)", 4, Layout::kRows, 7168, 0, 0, true},
      {"rows K=7168, 4 stages, whole rounds", 4, Layout::kRows, 7168, whole, 0, true},
      {"rows K=7168, 4 stages, no L2 promotion", 4, Layout::kRows, 7168, 0, 0, false},
      {"rows K=2048, 4 stages (L2's rows)", 4, Layout::kRows, 2048, 0, 0, true},
      {"tiled, 4 stages", 4, Layout::kTiled, 7168, 0, 0, true},
      {"rows K=7168, 5 stages", 5, Layout::kRows, 7168, 0, 0, true},
      {"rows K=7168, 6 stages", 6, Layout::kRows, 7168, 0, 0, true},
      {"tiled, 6 stages", 6, Layout::kTiled, 7168, 0, 0, true},
      {"rows K=7168, 4 stages, 5 us pause per tile", 4, Layout::kRows, 7168, 0, 5000, true},
      {"rows K=7168, 6 stages, 5 us pause per tile", 6, Layout::kRows, 7168, 0, 5000, true},
  };
  for (const Variant& v : variants) {
    const int num_kb = v.k / kBlockK;
    const size_t rows = bytes / v.k;  // every variant but "whole rounds" streams all the bytes
    const int tiles = v.tiles > 0 ? v.tiles : static_cast<int>(rows / kTileRows);
    const CUtensorMap map = encode(weights, rows, num_kb, v.layout, v.promote_256);
    const StreamArgs a{tiles, num_kb, v.layout, v.pause_ns};
    float ms = 0.f;
    switch (v.stages) {
      case 4:
        ms = time_variant<4>(map, a, sms, sink);
        break;
      case 5:
        ms = time_variant<5>(map, a, sms, sink);
        break;
      default:
        ms = time_variant<6>(map, a, sms, sink);
        break;
    }
    const double streamed = double(tiles) * kTileRows * v.k;
    std::printf("%-46s %5d tiles %8.1f us %7.0f GB/s  %.2fx the copy-rate time\n", v.what, tiles,
                ms * 1e3, streamed / (ms * 1e-3) / 1e9, ms * 1e-3 / (streamed / copy_rate));
  }
  return 0;
}
