// L2 of the MegaMoE layer: out = act x W2[e]^T, rounded to bf16 and stored straight into the
// source rank's combine slot [k][token][hidden] (possibly a peer GPU's memory). Every (slot, h) has
// exactly one writer, so the combine needs no atomics and the result is deterministic.
#pragma once

#include <cstdint>

#include "jax_megamoe/epilogue/quad_transpose.cuh"
#include "jax_megamoe/impls/sm90_fp8_grouped_tma_mainloop.cuh"
#include "jax_megamoe/launch.h"
#include "jax_megamoe/ptx/convert.cuh"
#include "jax_megamoe/ptx/store.cuh"

namespace jax_megamoe::sm90 {

// Runs on each working math warpgroup on its own: its row block's 64 rows x the tile's
// kNumBGroups * kWgN hidden columns, or of a lone block B group wg's kWgN columns.
template <int kWgN>
struct L2Epilogue {
  using Shape = TileShape<kWgN>;
  static constexpr LoneSplit kLoneSplit = LoneSplit::kOneGroupEach;
  static constexpr int kQuadTiles = 4;  // quad_transpose regroups exactly four n8 tiles
  static_assert(Shape::kNTiles % kQuadTiles == 0, "group columns must split into 32s");

  const L2Params& p;

  // Each quad writes 8 rows x 64 contiguous bytes per 32 columns with 16-byte stores; no shared
  // memory, so nothing here waits on other warps.
  __device__ __forceinline__ void operator()(const Tile& tile, TileAccum<kWgN>& acc,
                                             int math_thread) const {
    const FragCoords fc(math_thread);
    const int row0 = (tile.pair * kNumMathWarpGroups + tile.block_of(fc.wg)) * kBlockM;
    const int slots_per_rank = p.max_tokens * p.topk;
    const int col0 = tile.n * Shape::kBRows;
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int src = p.row_src[row0 + fc.row(half)];
      uint16_t* dst = nullptr;
      if (src >= 0) {
        const int rank = src / slots_per_rank, rem = src % slots_per_rank;
        const int token = rem / p.topk, k = rem % p.topk;
        dst = p.combine[rank] + (static_cast<size_t>(k) * p.max_tokens + token) * p.hidden + col0;
      }
#pragma unroll
      for (int g = 0; g < kNumBGroups; ++g) {
        if (tile.lone() && g != fc.wg) continue;
#pragma unroll
        for (int q = 0; q < Shape::kNTiles / kQuadTiles; ++q) {
          uint32_t words[kQuadTiles];
#pragma unroll
          for (int j = 0; j < kQuadTiles; ++j) {
            const int r = 4 * (q * kQuadTiles + j) + 2 * half;
            words[j] = ptx::cvt_bf16x2(acc[g][r], acc[g][r + 1]);
          }
          // All lanes shuffle; only rows with a destination store.
          const uint4 v = epilogue::quad_transpose(words);
          if (dst != nullptr) ptx::st_global_v4(dst + g * kWgN + q * 32 + (fc.lane % 4) * 8, v);
        }
      }
    }
  }
};

template <int kWgN>
__device__ __forceinline__ GemmOperands l2_operands(const L2Params& p) {
  return GemmOperands{
      p.act,
      p.act_scale,
      p.w2,
      p.w2_scale,
      p.block_expert,
      /*k=*/p.intermediate,
      /*b_rows=*/p.hidden,
      /*b_tile_stride=*/TileShape<kWgN>::kBRows,
      /*b_group_stride=*/kWgN,
      /*n_tiles=*/p.hidden / TileShape<kWgN>::kBRows,
  };
}

// Kernel parameters: the launch contract plus the TMA tensor maps of act (a) and of w2 viewed as
// [E * H, I].
struct L2KernelParams {
  L2Params p;
  CUtensorMap a;
  CUtensorMap b;
};

template <int kWgN, int kStages>
__global__ void __launch_bounds__(kNumThreads, 1)
    sm90_fp8_mega_moe_l2(const __grid_constant__ L2KernelParams k) {
  extern __shared__ __align__(1024) uint8_t smem_raw[];
  const L2Params& p = k.p;
  GroupedFp8TmaMainloop<kWgN, kStages> mainloop(align_smem(smem_raw), l2_operands<kWgN>(p),
                                                p.num_blocks, p.max_blocks, &k.a, &k.b);
  mainloop.run(L2Epilogue<kWgN>{p});
  // The runtime's release flag (written after this kernel) must order these peer stores.
  __threadfence_system();
}

template <int kWgN, int kStages>
constexpr int l2_smem_bytes() {
  return kSmemAlignSlack + GroupedFp8TmaMainloop<kWgN, kStages>::kSmemBytes;
}

}  // namespace jax_megamoe::sm90
