// L1 of the MegaMoE layer: per row block, act = quant_1x128(swiglu(A x W1[e]^T) * row_weight).
// A CTA tile covers 128 output columns j in [n0, n0 + 128) of a pair of row blocks: B group 0 is
// the W1 gate rows [n0, +128), group 1 the up rows [I + n0, +128), so a thread holds gate and up
// of the same (row, column) in the same register of its two accumulators, and a tile's row is
// exactly one 1x128 requant group.
#pragma once

#include <cstdint>

#include "jax_megamoe/epilogue/fp8_quant.cuh"
#include "jax_megamoe/epilogue/quad_transpose.cuh"
#include "jax_megamoe/epilogue/swiglu.cuh"
#include "jax_megamoe/impls/sm90_fp8_grouped_tma_mainloop.cuh"
#include "jax_megamoe/launch.h"
#include "jax_megamoe/ptx/store.cuh"

namespace jax_megamoe::sm90 {

constexpr int kL1WgN = kQuantBlock;  // 128 columns per B group: gate or up

// Runs on each working math warpgroup on its own, straight from registers: its row block's
// 64 x 128 act tile, no shared memory and no barrier.
struct L1Epilogue {
  using Shape = TileShape<kL1WgN>;
  static_assert(Shape::kNTiles == 16, "one row of the tile is one 128-column requant group");

  const L1Params& p;

  __device__ __forceinline__ void operator()(const Tile& tile, TileAccum<kL1WgN>& acc,
                                             int math_thread) const {
    constexpr int kNT = Shape::kNTiles;
    const FragCoords fc(math_thread);
    const int row0 = (tile.pair * kNumMathWarpGroups + fc.wg) * kBlockM;
    Accum<kL1WgN>& gate = acc[0];
    const Accum<kL1WgN>& up = acc[1];

    // One row's 128 columns live in the four lanes of one quad: the amax needs no smem.
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int row = row0 + fc.row(half);
      const float weight = p.row_weight[row];
      float row_amax = 0.f;
#pragma unroll
      for (int j = 0; j < kNT; ++j) {
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          const int r = 4 * j + 2 * half + c;
          gate[r] = epilogue::swiglu(gate[r], up[r], p.clamp) * weight;  // act, in place
          row_amax = fmaxf(row_amax, fabsf(gate[r]));
        }
      }
      row_amax = epilogue::quad_max(row_amax);
      const float scale = epilogue::e4m3_scale(row_amax);
      uint16_t q[kNT];
#pragma unroll
      for (int j = 0; j < kNT; ++j)
        q[j] = epilogue::quantize_e4m3x2(gate[4 * j + 2 * half], gate[4 * j + 2 * half + 1], scale);
      uint4 out[2];
      epilogue::quad_transpose_e4m3(q, out);  // every lane shuffles; valid rows store
      if (p.row_src[row] < 0) continue;       // padding rows are never written
      uint8_t* dst = p.act + static_cast<size_t>(row) * p.intermediate + tile.n * kQuantBlock +
                     (fc.lane % 4) * 32;
      ptx::st_global_v4(dst, out[0]);
      ptx::st_global_v4(dst + 16, out[1]);
      if (fc.lane % 4 == 0)
        p.act_scale[static_cast<size_t>(row) * (p.intermediate / kQuantBlock) + tile.n] = scale;
    }
  }
};

__device__ __forceinline__ GemmOperands l1_operands(const L1Params& p) {
  return GemmOperands{
      p.a,
      p.a_scale,
      p.w1,
      p.w1_scale,
      p.block_expert,
      /*k=*/p.hidden,
      /*b_rows=*/2 * p.intermediate,
      /*b_tile_stride=*/kQuantBlock,
      /*b_group_stride=*/p.intermediate,  // group 1: the up rows of the same columns
      /*n_tiles=*/p.intermediate / kQuantBlock,
  };
}

// Kernel parameters: the launch contract plus the TMA tensor maps of the pool (a) and of w1
// viewed as [E * 2I, H].
struct L1KernelParams {
  L1Params p;
  CUtensorMap a;
  CUtensorMap b;
};

template <int kStages>
__global__ void __launch_bounds__(kNumThreads, 1)
    sm90_fp8_mega_moe_l1(const __grid_constant__ L1KernelParams k) {
  using Mainloop = GroupedFp8TmaMainloop<kL1WgN, kStages>;
  extern __shared__ __align__(1024) uint8_t smem_raw[];
  uint8_t* smem = align_smem(smem_raw);
  const L1Params& p = k.p;
  Mainloop mainloop(smem, l1_operands(p), min(*p.num_blocks, p.max_blocks), &k.a, &k.b);
  mainloop.run(L1Epilogue{p});
}

template <int kStages>
constexpr int l1_smem_bytes() {
  return kSmemAlignSlack + GroupedFp8TmaMainloop<kL1WgN, kStages>::kSmemBytes;
}

}  // namespace jax_megamoe::sm90
