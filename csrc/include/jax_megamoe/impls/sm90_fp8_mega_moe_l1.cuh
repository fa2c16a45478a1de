// L1 of the MegaMoE layer: per row block, act = quant_1x128(swiglu(A x W1[e]^T) * row_weight).
// A CTA tile covers 128 output columns j in [n0, n0 + 128): group 0 of the B tile is W1 gate rows
// [n0, +128), group 1 the up rows [I + n0, +128), so gate and up of a column meet in one thread
// without re-laying out the weights, and a tile is exactly one 1x128 requant group.
#pragma once

#include <cstdint>

#include "jax_megamoe/epilogue/fp8_quant.cuh"
#include "jax_megamoe/epilogue/swiglu.cuh"
#include "jax_megamoe/impls/sm90_fp8_grouped_mainloop.cuh"
#include "jax_megamoe/launch.h"

namespace jax_megamoe::sm90 {

constexpr int kL1Groups = 2;  // gate, up

struct L1Epilogue {
  // [kBlockM][128] e4m3 tile, swizzled like the operand tiles, staged for 16-byte row stores.
  static constexpr int kStageBytes = kBlockM * kQuantBlock;
  // Per row, the amax of each N warp's 32 columns.
  static constexpr int kAmaxBytes = kBlockM * kWarpsN * 4;
  static constexpr int kSmemBytes = kStageBytes + kAmaxBytes;

  const L1Params& p;
  uint8_t* stage;
  float* amax;

  __device__ __forceinline__ void operator()(const Tile& tile, Accum<kL1Groups>& acc) const {
    constexpr int kNT = kWarpGroupNTiles;
    const FragCoords fc;
    const int row0 = tile.block * kBlockM;

    float act[kWarpMTiles][2][kNT * 2];
#pragma unroll
    for (int mt = 0; mt < kWarpMTiles; ++mt) {
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int row = fc.row(mt, half);
        const float weight = p.row_weight[row0 + row];
        float row_amax = 0.f;
#pragma unroll
        for (int nt = 0; nt < kNT; ++nt) {
#pragma unroll
          for (int i = 0; i < 2; ++i) {
            const float a = epilogue::swiglu(acc[mt][nt][half * 2 + i],
                                             acc[mt][kNT + nt][half * 2 + i], p.clamp) *
                            weight;
            act[mt][half][nt * 2 + i] = a;
            row_amax = fmaxf(row_amax, fabsf(a));
          }
        }
        row_amax = epilogue::quad_max(row_amax);
        if (fc.lane % 4 == 0) amax[row * kWarpsN + fc.wn] = row_amax;
      }
    }
    __syncthreads();

#pragma unroll
    for (int mt = 0; mt < kWarpMTiles; ++mt) {
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int row = fc.row(mt, half);
        float row_amax = 0.f;
#pragma unroll
        for (int w = 0; w < kWarpsN; ++w) row_amax = fmaxf(row_amax, amax[row * kWarpsN + w]);
        const float scale = epilogue::e4m3_scale(row_amax);
#pragma unroll
        for (int nt = 0; nt < kNT; ++nt) {
          const int col = fc.col(nt, 0);
          *reinterpret_cast<uint16_t*>(stage + swizzle_128(row, col / 16) + col % 16) =
              epilogue::quantize_e4m3x2(act[mt][half][nt * 2], act[mt][half][nt * 2 + 1], scale);
        }
        if (fc.wn == 0 && fc.lane % 4 == 0 && p.row_src[row0 + row] >= 0)
          p.act_scale[static_cast<size_t>(row0 + row) * (p.intermediate / kQuantBlock) + tile.n] =
              scale;
      }
    }
    __syncthreads();

    // Whole 128-byte row segments per 8 threads. Padding rows are never written.
#pragma unroll
    for (int i = 0; i < kStageBytes / 16 / kNumThreads; ++i) {
      const int idx = threadIdx.x + i * kNumThreads;
      const int row = idx / 8, chunk = idx % 8;
      if (p.row_src[row0 + row] < 0) continue;
      *reinterpret_cast<uint4*>(p.act + static_cast<size_t>(row0 + row) * p.intermediate +
                                tile.n * kQuantBlock + chunk * 16) =
          *reinterpret_cast<const uint4*>(stage + swizzle_128(row, chunk));
    }
    // No trailing barrier: the next epilogue writes `stage`/`amax` only after the next tile's
    // K loop, whose __syncthreads (at least one, K >= 128) orders it after these reads.
  }
};

template <int kStages>
__global__ void __launch_bounds__(kNumThreads, 1)
    sm90_fp8_mega_moe_l1(const __grid_constant__ L1Params p) {
  using Mainloop = GroupedFp8Mainloop<kL1Groups, kStages>;
  extern __shared__ __align__(128) uint8_t smem[];

  const GemmOperands op{
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
  const int num_blocks = min(*p.num_blocks, p.max_blocks);
  Mainloop mainloop(smem, op, num_blocks);
  uint8_t* epi_smem = smem + Mainloop::kSmemBytes;
  mainloop.run(
      L1Epilogue{p, epi_smem, reinterpret_cast<float*>(epi_smem + L1Epilogue::kStageBytes)});
}

template <int kStages>
constexpr int l1_smem_bytes() {
  return GroupedFp8Mainloop<kL1Groups, kStages>::kSmemBytes + L1Epilogue::kSmemBytes;
}

}  // namespace jax_megamoe::sm90
