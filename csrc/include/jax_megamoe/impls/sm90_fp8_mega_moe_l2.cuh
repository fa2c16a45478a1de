// L2 of the MegaMoE layer: out = act x W2[e]^T, rounded to bf16 and stored straight into the
// source rank's combine slot [k][token][hidden] (possibly a peer GPU's memory). Every (slot, h) has
// exactly one writer, so the combine needs no atomics and the result is deterministic.
#pragma once

#include <cstdint>

#include "jax_megamoe/epilogue/quad_transpose.cuh"
#include "jax_megamoe/impls/sm90_fp8_grouped_mainloop.cuh"
#include "jax_megamoe/launch.h"
#include "jax_megamoe/ptx/convert.cuh"
#include "jax_megamoe/ptx/store.cuh"

namespace jax_megamoe::sm90 {

template <int kNumGroups>
struct L2Epilogue {
  static_assert(kWarpGroupNTiles == 4, "quad_transpose regroups exactly four n8 tiles");

  const L2Params& p;

  // Each quad writes 8 rows x 64 contiguous bytes per group with 16-byte stores; no shared
  // memory, so nothing here waits on other warps.
  __device__ __forceinline__ void operator()(const Tile& tile, Accum<kNumGroups>& acc) const {
    const FragCoords fc;
    const int row0 = tile.block * kBlockM;
    const int slots_per_rank = p.max_tokens * p.topk;
#pragma unroll
    for (int mt = 0; mt < kWarpMTiles; ++mt) {
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int src = p.row_src[row0 + fc.row(mt, half)];
        uint16_t* dst = nullptr;
        if (src >= 0) {
          const int rank = src / slots_per_rank, rem = src % slots_per_rank;
          const int token = rem / p.topk, k = rem % p.topk;
          dst = p.combine[rank] + (static_cast<size_t>(k) * p.max_tokens + token) * p.hidden +
                static_cast<size_t>(tile.n) * kNumGroups * kGroupRows;
        }
#pragma unroll
        for (int g = 0; g < kNumGroups; ++g) {
          uint32_t words[kWarpGroupNTiles];
#pragma unroll
          for (int j = 0; j < kWarpGroupNTiles; ++j) {
            const float* d = acc[mt][g * kWarpGroupNTiles + j];
            words[j] = ptx::cvt_bf16x2(d[half * 2], d[half * 2 + 1]);
          }
          // All lanes shuffle; only rows with a destination store.
          const uint4 v = epilogue::quad_transpose(words);
          if (dst != nullptr)
            ptx::st_global_v4(dst + g * kGroupRows + fc.wn * kWarpGroupCols + (fc.lane % 4) * 8, v);
        }
      }
    }
  }
};

template <int kNumGroups, int kStages>
__global__ void __launch_bounds__(kNumThreads, 1)
    sm90_fp8_mega_moe_l2(const __grid_constant__ L2Params p) {
  using Mainloop = GroupedFp8Mainloop<kNumGroups, kStages>;
  extern __shared__ __align__(128) uint8_t smem[];

  const GemmOperands op{
      p.act,
      p.act_scale,
      p.w2,
      p.w2_scale,
      p.block_expert,
      /*k=*/p.intermediate,
      /*b_rows=*/p.hidden,
      /*b_tile_stride=*/kNumGroups * kGroupRows,
      /*b_group_stride=*/kGroupRows,
      /*n_tiles=*/p.hidden / (kNumGroups * kGroupRows),
  };
  const int num_blocks = min(*p.num_blocks, p.max_blocks);
  Mainloop mainloop(smem, op, num_blocks);
  mainloop.run(L2Epilogue<kNumGroups>{p});
  // The runtime's release flag (written after this kernel) must order these peer stores.
  __threadfence_system();
}

template <int kNumGroups, int kStages>
constexpr int l2_smem_bytes() {
  return GroupedFp8Mainloop<kNumGroups, kStages>::kSmemBytes;
}

}  // namespace jax_megamoe::sm90
