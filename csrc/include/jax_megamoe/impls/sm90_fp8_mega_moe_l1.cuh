// L1 of the MegaMoE layer: per row block, act = quant_1x128(swiglu(A x W1[e]^T) * row_weight).
// A CTA tile covers 128 output columns j in [n0, n0 + 128): warpgroup 0 multiplies the W1 gate
// rows [n0, +128), warpgroup 1 the up rows [I + n0, +128), so both hold the same (row, column) in
// the same register of the same thread index, and a tile is exactly one 1x128 requant group.
#pragma once

#include <cstdint>

#include "jax_megamoe/epilogue/fp8_quant.cuh"
#include "jax_megamoe/epilogue/swiglu.cuh"
#include "jax_megamoe/impls/sm90_fp8_grouped_tma_mainloop.cuh"
#include "jax_megamoe/launch.h"

namespace jax_megamoe::sm90 {

constexpr int kL1WgN = kQuantBlock;  // 128 columns per warpgroup: gate or up

struct L1Epilogue {
  using Shape = TileShape<kL1WgN>;
  // Up accumulators handed from warpgroup 1 to warpgroup 0, [register][thread] (conflict-free).
  static constexpr int kUpBytes = Shape::kAccRegs * kWarpGroupThreads * 4;
  // [kBlockM][128] e4m3 tile, swizzled like the operand tiles, staged for 16-byte row stores.
  static constexpr int kStageBytes = kBlockM * kQuantBlock;
  static constexpr int kSmemBytes = kUpBytes + kStageBytes;

  const L1Params& p;
  float* up;
  uint8_t* stage;

  __device__ __forceinline__ void operator()(const Tile& tile, Accum<kL1WgN>& acc,
                                             int math_thread) const {
    constexpr int kNT = Shape::kNTiles;
    const FragCoords fc(math_thread);
    const int row0 = tile.block * kBlockM;

    if (fc.wg == 1) {
#pragma unroll
      for (int r = 0; r < Shape::kAccRegs; ++r) up[r * kWarpGroupThreads + fc.t] = acc[r];
    }
    math_sync();

    if (fc.wg == 0) {
      // One row's 128 columns live in the four lanes of one quad: the amax needs no smem.
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int row = fc.row(half);
        const float weight = p.row_weight[row0 + row];
        float act[kNT * 2];
        float row_amax = 0.f;
#pragma unroll
        for (int j = 0; j < kNT; ++j) {
#pragma unroll
          for (int c = 0; c < 2; ++c) {
            const int r = 4 * j + 2 * half + c;
            const float a =
                epilogue::swiglu(acc[r], up[r * kWarpGroupThreads + fc.t], p.clamp) * weight;
            act[j * 2 + c] = a;
            row_amax = fmaxf(row_amax, fabsf(a));
          }
        }
        row_amax = epilogue::quad_max(row_amax);
        const float scale = epilogue::e4m3_scale(row_amax);
#pragma unroll
        for (int j = 0; j < kNT; ++j) {
          const int col = fc.col(j, 0);
          *reinterpret_cast<uint16_t*>(stage + swizzle_128(row, col / 16) + col % 16) =
              epilogue::quantize_e4m3x2(act[j * 2], act[j * 2 + 1], scale);
        }
        if (fc.lane % 4 == 0 && p.row_src[row0 + row] >= 0)
          p.act_scale[static_cast<size_t>(row0 + row) * (p.intermediate / kQuantBlock) + tile.n] =
              scale;
      }
    }
    math_sync();

    // Whole 128-byte row segments per 8 threads. Padding rows are never written.
#pragma unroll
    for (int i = 0; i < kStageBytes / 16 / kNumMathThreads; ++i) {
      const int idx = math_thread + i * kNumMathThreads;
      const int row = idx / 8, chunk = idx % 8;
      if (p.row_src[row0 + row] < 0) continue;
      *reinterpret_cast<uint4*>(p.act + static_cast<size_t>(row0 + row) * p.intermediate +
                                tile.n * kQuantBlock + chunk * 16) =
          *reinterpret_cast<const uint4*>(stage + swizzle_128(row, chunk));
    }
    // The next tile's epilogue rewrites `up` and `stage`; with the TMA main loop one warpgroup
    // can finish that tile's K loop before the other has read them here.
    math_sync();
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
      /*b_group_stride=*/p.intermediate,  // warpgroup 1: the up rows of the same columns
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
  uint8_t* epi_smem = smem + Mainloop::kSmemBytes;
  mainloop.run(L1Epilogue{p, reinterpret_cast<float*>(epi_smem), epi_smem + L1Epilogue::kUpBytes});
}

template <int kStages>
constexpr int l1_smem_bytes() {
  return kSmemAlignSlack + GroupedFp8TmaMainloop<kL1WgN, kStages>::kSmemBytes +
         L1Epilogue::kSmemBytes;
}

}  // namespace jax_megamoe::sm90
