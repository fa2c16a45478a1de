// The math warpgroups' work per K block of 128 in the grouped GEMM main loop: four
// wgmma k32 steps into a per-block f32 partial, then its promotion into the master accumulator
// with a_scale[row] x b_scale (FP8 block scaling changes the scales every 128 K, and the tensor
// cores accumulate only in limited precision, so each block is scaled and summed in f32).
#pragma once

#include <cstdint>

#include "jax_megamoe/layout/sm90_gemm_tile.cuh"
#include "jax_megamoe/ptx/shared.cuh"
#include "jax_megamoe/ptx/warpgroup.cuh"
#include "jax_megamoe/ptx/wgmma.cuh"

namespace jax_megamoe::sm90 {

// Issues the K block whose A (this warpgroup's 64 rows) and B (one group's kWgN rows) tiles are
// at shared-memory addresses a_smem / b_smem into `part` (overwritten by the first k32 step), as
// one committed wgmma group of this warpgroup.
template <int kWgN>
__device__ __forceinline__ void issue_block_mma(uint32_t a_smem, uint32_t b_smem,
                                                float (&part)[ptx::WgmmaE4m3<kWgN>::kRegs]) {
  using Mma = ptx::WgmmaE4m3<kWgN>;
  const uint32_t a_lo = ptx::smem_desc_lo(a_smem), b_lo = ptx::smem_desc_lo(b_smem);
  ptx::fence_operands(part);
  ptx::wgmma_fence();
#pragma unroll
  for (int ks = 0; ks < kBlockK / kWgmmaK; ++ks)
    Mma::mma(part, ptx::smem_desc_sw128(a_lo + ks * (kWgmmaK >> 4)),
             ptx::smem_desc_sw128(b_lo + ks * (kWgmmaK >> 4)), ks > 0);
  ptx::wgmma_commit();
  ptx::fence_operands(part);
}

// The activation scales of the two accumulator rows (half 0, 1) that warpgroup thread t holds;
// a_scale is the shared-memory address of the K block's 64 row scales of the warpgroup's row
// block.
struct RowScales {
  float s[2];
};
__device__ __forceinline__ RowScales load_row_scales(uint32_t a_scale, int t) {
  RowScales r;
#pragma unroll
  for (int half = 0; half < 2; ++half)
    r.s[half] = ptx::ld_shared_f32(a_scale + 4 * ((t / 32) * 16 + half * 8 + (t % 32) / 4));
  return r;
}

// acc += part * a_scale[row] * b_scale, over part's n8 tiles: acc may be wider (a partial of
// n64 promoted into the first half of an n128 accumulator, whose fragment layout it shares).
template <int kPartRegs, int kAccRegs>
__device__ __forceinline__ void promote(const RowScales& a_scales, float b_scale,
                                        const float (&part)[kPartRegs], float (&acc)[kAccRegs]) {
  static_assert(kPartRegs <= kAccRegs && kPartRegs % 4 == 0, "part must be a prefix of acc");
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const float scale = a_scales.s[half] * b_scale;
#pragma unroll
    for (int j = 0; j < kPartRegs / 4; ++j) {
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        const int r = 4 * j + 2 * half + c;
        acc[r] = fmaf(part[r], scale, acc[r]);
      }
    }
  }
}

// The activation scales of the token columns (n8 tile j, column c) that warpgroup lane `lane`
// holds in a swap-AB accumulator (weights as A, kRows token rows as B); tail_scale is the
// shared-memory address of the K block's kRows token scales.
template <int kRows>
struct ColScales {
  float s[kRows / 8][2];
};
template <int kRows>
__device__ __forceinline__ ColScales<kRows> load_col_scales(uint32_t tail_scale, int lane) {
  ColScales<kRows> r;
#pragma unroll
  for (int j = 0; j < kRows / 8; ++j)
    ptx::ld_shared_v2(tail_scale + 4 * (8 * j + 2 * (lane % 4)), r.s[j]);
  return r;
}

// The swap-AB form of promote: acc += part * b_scale * token_scale[column].
template <int kRows>
__device__ __forceinline__ void promote_cols(const ColScales<kRows>& cols, float b_scale,
                                             const float (&part)[kRows / 2],
                                             float (&acc)[kRows / 2]) {
#pragma unroll
  for (int j = 0; j < kRows / 8; ++j) {
#pragma unroll
    for (int c = 0; c < 2; ++c) {
      const float scale = cols.s[j][c] * b_scale;
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int r = 4 * j + 2 * half + c;
        acc[r] = fmaf(part[r], scale, acc[r]);
      }
    }
  }
}

// Barrier 1 over the two math warpgroups only, never the producer warp: an epilogue's exchange
// through shared memory.
__device__ __forceinline__ void math_sync() { ptx::named_barrier_sync<1, kNumMathThreads>(); }

// Barrier 2 + wg over math warpgroup wg alone: an epilogue step the other warpgroup need not join.
__device__ __forceinline__ void warpgroup_sync(int wg) {
  ptx::named_barrier_sync<kWarpGroupThreads>(2 + wg);
}

}  // namespace jax_megamoe::sm90
