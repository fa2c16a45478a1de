// Can L1 gather A's rows with TMA, one row per copy, instead of with cp.async on its producer
// warps (benchmarks/RESULTS.md, "L1 reading A from the tokens' rows")? A TMA box cannot name
// scattered rows, but a box of one row can: a [tokens, K] e4m3 tensor map with a box of 128 B x
// 1 row, 128-byte swizzled, issued once per row into its place in the stage. Two questions, each
// answered on the device:
//
//   placement   Does a one-row box land where wgmma expects row p of a 128B-swizzled tile, its
//               16-byte chunk c at chunk c ^ (p % 8) of the row's 128 bytes? That holds if the
//               TMA unit swizzles by the shared-memory address (bits 7-9), not by the row's
//               place in its box. Checked for a tile at a 1024-byte boundary, then (last, in
//               case it faults) for one 128 bytes past it, which tells the two apart; bytes
//               compared on the host.
//   rate        How long does one warp take to issue a pair's K block of such copies (128 rows,
//               four per lane) and have them land, on every SM at once, against one 128-row box
//               of the same bytes (what L1 loads from the pool today)? Rows are drawn at random
//               from a token matrix; a K block of L1's math takes ~0.85 us at M = 2048.
//
// Build and run (benchmarks/device_run.sh `tmarow` mode):
//   nvcc -std=c++17 -O3 -gencode=arch=compute_90a,code=sm_90a --expt-relaxed-constexpr \
//     -I csrc/include tools/tma_row_gather.cu -o tma_row_gather && ./tma_row_gather
// Exit status 0 when the placement matches the address-based swizzle.
// Answered on an H200 (2026-12-03, benchmarks/RESULTS.md "one TMA per token row"): placed by
// address, but ~39 ns per row box per SM, 5 us per K block of a pair: too slow to gather with.
#include <cuda.h>
#include <cudaTypedefs.h>
#include <cuda_runtime_api.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "jax_megamoe/layout/sm90_gemm_tile.cuh"
#include "jax_megamoe/ptx/mbarrier.cuh"
#include "tma_host.h"

namespace {

using namespace jax_megamoe::sm90;
namespace ptx = jax_megamoe::ptx;
using tma_tools::check;

constexpr int kRows = 128;                   // a pair's rows: one stage of A
constexpr int kTileBytes = kRows * kBlockK;  // 16 KB
constexpr int kStages = 4;
constexpr int kHidden = 7168;
constexpr int kNumKb = kHidden / kBlockK;
// Ring (and room for the shifted placement check's tile), barriers.
constexpr int kSmemBytes = (kStages + 1) * kTileBytes + kSwizzleAtomBytes + 2 * kStages * 8;

// Issues row p's K block kb (p = lane, lane + 32, ...) into tile + 128 p: every lane of the warp
// its share, after lane 0 has announced the tile's bytes on `bar`.
__device__ __forceinline__ void gather_rows(uint8_t* tile, const CUtensorMap* rows_map,
                                            const CUtensorMap* pair_map, const int32_t* tokens,
                                            int kb, bool per_row, uint64_t* bar) {
  const int lane = threadIdx.x % 32;
  if (lane == 0) ptx::mbarrier_arrive_expect_tx(bar, kTileBytes);
  __syncwarp();
  if (!per_row) {
    if (lane == 0) ptx::tma_load_2d(tile, pair_map, kb * kBlockK, tokens[0], bar);
    return;
  }
#pragma unroll
  for (int i = 0; i < kRows / 32; ++i) {
    const int p = lane + 32 * i;
    ptx::tma_load_2d(tile + p * kBlockK, rows_map, kb * kBlockK, tokens[p], bar);
  }
}

// One CTA: one tile `shift` bytes past a 1024-byte boundary, copied out as it landed.
__global__ void __launch_bounds__(32, 1)
    placement(const __grid_constant__ CUtensorMap rows_map, const int32_t* tokens, int kb,
              int shift, uint8_t* out) {
  extern __shared__ uint8_t smem_raw[];
  uint8_t* base = align_smem(smem_raw);
  uint64_t* bar = reinterpret_cast<uint64_t*>(base + (kStages + 1) * kTileBytes);
  if (threadIdx.x == 0) {
    ptx::mbarrier_init(bar, 1);
    ptx::fence_barrier_init();
  }
  __syncwarp();
  uint8_t* tile = base + shift;
  gather_rows(tile, &rows_map, &rows_map, tokens, kb, true, bar);
  ptx::mbarrier_wait(bar, 0);
  for (int i = threadIdx.x; i < kTileBytes; i += 32) out[i] = tile[i];
}

// The placement kernel's tile at `shift`, copied to the host.
std::vector<uint8_t> place(const CUtensorMap& rows_map, const int32_t* tokens, int kb, int shift,
                           uint8_t* out_dev) {
  placement<<<1, 32, kSmemBytes>>>(rows_map, tokens, kb, shift, out_dev);
  check(cudaDeviceSynchronize(), "placement kernel");
  std::vector<uint8_t> out(kTileBytes);
  check(cudaMemcpy(out.data(), out_dev, out.size(), cudaMemcpyDeviceToHost), "copy");
  return out;
}

// Every CTA: warp 0 fills a ring of 128-row A stages for `tiles` tiles of kNumKb K blocks, each
// stage's rows from tokens[(tile * kNumKb + kb) * 128 ...]; warp 1's lane 0 releases each stage
// once it has landed. No math: the kernel's time is the copies' alone.
__global__ void __launch_bounds__(64, 1)
    rate(const __grid_constant__ CUtensorMap rows_map, const __grid_constant__ CUtensorMap pair_map,
         const int32_t* tokens, int tiles, bool per_row, uint32_t* sink) {
  extern __shared__ uint8_t smem_raw[];
  uint8_t* ring = align_smem(smem_raw);
  uint64_t* full = reinterpret_cast<uint64_t*>(ring + (kStages + 1) * kTileBytes);
  uint64_t* empty = full + kStages;
  tma_tools::init_ring(full, empty, kStages);
  const bool producer = threadIdx.x < 32, consumer = threadIdx.x == 32;
  if (!producer && !consumer) return;
  int slot = 0;
  uint32_t phase = 0, seen = 0;
  for (int tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    for (int kb = 0; kb < kNumKb; ++kb) {
      if (producer) {
        ptx::mbarrier_wait(&empty[slot], phase ^ 1);
        gather_rows(ring + slot * kTileBytes, &rows_map, &pair_map,
                    tokens + size_t(tile * kNumKb + kb) * kRows, kb, per_row, &full[slot]);
      } else {
        seen ^= tma_tools::consume_stage(full, empty, ring + slot * kTileBytes, slot, phase);
      }
      tma_tools::next_stage(slot, phase, kStages);
    }
  }
  if (consumer) sink[blockIdx.x] = seen;
}

// [rows, kHidden] bytes in boxes of box_rows rows x 128 B, 128B-swizzled like the GEMMs' maps.
CUtensorMap encode(void* base, size_t rows, int box_rows) {
  const cuuint64_t dims[2] = {kHidden, rows};
  const cuuint64_t strides[1] = {kHidden};
  const cuuint32_t box[2] = {kBlockK, static_cast<cuuint32_t>(box_rows)};
  const cuuint32_t element_strides[2] = {1, 1};
  const PFN_cuTensorMapEncodeTiled_v12000 encode_tiled = tma_tools::encode_tiled();
  CUtensorMap map;
  const CUresult r =
      encode_tiled(&map, CU_TENSOR_MAP_DATA_TYPE_UINT8, 2, base, dims, strides, box,
                   element_strides, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                   CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (r != CUDA_SUCCESS) {
    std::fprintf(stderr, "cuTensorMapEncodeTiled failed (%d)\n", static_cast<int>(r));
    std::exit(1);
  }
  return map;
}

// Rows of `out` (one tile) that match row p's chunk c at chunk c ^ ((p + phase) % 8).
int rows_matching(const uint8_t* out, const std::vector<uint8_t>& x,
                  const std::vector<int32_t>& tokens, int kb, int phase) {
  int ok = 0;
  for (int p = 0; p < kRows; ++p) {
    bool same = true;
    for (int c = 0; c < 8 && same; ++c) {
      const uint8_t* want = &x[size_t(tokens[p]) * kHidden + kb * kBlockK + c * 16];
      const uint8_t* got = out + p * kBlockK + ((c ^ ((p + phase) % 8)) * 16);
      for (int b = 0; b < 16; ++b) same = same && want[b] == got[b];
    }
    ok += same;
  }
  return ok;
}

}  // namespace

int main() {
  int sms = 0;
  check(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0), "device");
  constexpr int kTokens = 2048;  // x at M = 2048: 14.7 MB, L2-resident as in the layer
  std::mt19937 rng(7);
  std::vector<uint8_t> x(size_t(kTokens) * kHidden);
  for (auto& b : x) b = static_cast<uint8_t>(rng());
  const int tiles = 8 * sms;  // eight tiles per CTA
  std::vector<int32_t> tokens(size_t(tiles) * kNumKb * kRows);
  for (auto& t : tokens) t = static_cast<int32_t>(rng() % kTokens);
  // The pool path's box reads 128 consecutive rows: its "token" is the first one's, kept in range.
  for (size_t i = 0; i < tokens.size(); i += kRows) tokens[i] = tokens[i] % (kTokens - kRows + 1);

  uint8_t *x_dev, *out_dev;
  int32_t* tokens_dev;
  uint32_t* sink;
  check(cudaMalloc(&x_dev, x.size()), "malloc");
  check(cudaMalloc(&out_dev, kTileBytes), "malloc");
  check(cudaMalloc(&tokens_dev, tokens.size() * sizeof(int32_t)), "malloc");
  check(cudaMalloc(&sink, sms * sizeof(uint32_t)), "malloc");
  check(cudaMemcpy(x_dev, x.data(), x.size(), cudaMemcpyHostToDevice), "copy");
  check(cudaMemcpy(tokens_dev, tokens.data(), tokens.size() * sizeof(int32_t),
                   cudaMemcpyHostToDevice),
        "copy");
  const CUtensorMap rows_map = encode(x_dev, kTokens, 1);
  const CUtensorMap pair_map = encode(x_dev, kTokens, kRows);

  // Placement at a 1024-byte boundary (as L1's stages are).
  constexpr int kKb = 5;
  check(cudaFuncSetAttribute(placement, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes),
        "smem attribute");
  const std::vector<uint8_t> aligned = place(rows_map, tokens_dev, kKb, 0, out_dev);
  const int aligned_ok = rows_matching(aligned.data(), x, tokens, kKb, 0);
  std::printf("placement: tile at a 1024-byte boundary, %d of %d rows as wgmma reads them\n",
              aligned_ok, kRows);
  const bool placed = aligned_ok == kRows;

  // Rate.
  check(cudaFuncSetAttribute(rate, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes),
        "smem attribute");
  for (const bool per_row : {false, true}) {
    const auto launch = [&] {
      rate<<<sms, 64, kSmemBytes>>>(rows_map, pair_map, tokens_dev, tiles, per_row, sink);
    };
    launch();  // warm-up
    const float best = tma_tools::best_ms(5, "rate kernel", launch);
    const double per_kb_us = best * 1e3 / (double(tiles) / sms * kNumKb);
    std::printf("rate: %-34s %8.1f us, %.3f us per K block of a pair per SM, %.0f GB/s\n",
                per_row ? "128 one-row boxes per K block" : "one 128-row box per K block (pool)",
                best * 1e3, per_kb_us, double(tiles) * kNumKb * kTileBytes / (best * 1e-3) / 1e9);
  }
  // Last, as it may fault if the unit wants more alignment: a tile 128 B past the boundary.
  const std::vector<uint8_t> shifted = place(rows_map, tokens_dev, kKb, kBlockK, out_dev);
  std::printf(
      "placement: tile 128 B past the boundary, %d rows swizzled by address, %d by row "
      "in the tile\n",
      rows_matching(shifted.data(), x, tokens, kKb, 1),
      rows_matching(shifted.data(), x, tokens, kKb, 0));
  return placed ? 0 : 1;
}
