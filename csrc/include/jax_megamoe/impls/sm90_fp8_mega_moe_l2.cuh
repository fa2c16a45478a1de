// L2 of the MegaMoE layer: out = act x W2[e]^T, rounded to bf16 and sent into the source rank's
// combine slot [k][token][hidden] (possibly a peer GPU's memory). Every (slot, h) has
// exactly one writer, so the combine needs no atomics and the result is deterministic.
#pragma once

#include <cstdint>

#include "jax_megamoe/impls/sm90_fp8_grouped_tma_mainloop.cuh"
#include "jax_megamoe/launch.h"
#include "jax_megamoe/ptx/convert.cuh"
#include "jax_megamoe/ptx/store.cuh"

namespace jax_megamoe::sm90 {

// Runs on each working math warpgroup on its own: its row block's 64 rows x the tile's
// kNumBGroups * kWgN hidden columns, or of a lone block B group wg's kWgN columns.
//
// The rows go out through shared memory so that the warpgroup is back in the main loop after a
// few hundred instructions: stmatrix writes the bf16 fragments into the warpgroup's staging
// buffer (rows in order, 16 bytes of padding per row so the eight rows of one stmatrix phase hit
// distinct banks), then one thread per row sends the row's 512 (lone: 256) contiguous bytes to
// its combine slot with a bulk copy, which runs on while the next tile's K loop starts. Before
// the buffer is rewritten, its sender waits until the previous copy has read it. Writing from
// registers instead (quad shuffles + 16-byte stores) took ~1400 instructions per warp and tile,
// a quarter of the math warps' time at M = 8192 (Nsight Compute, H200, 2026-12-02).
template <int kWgN>
struct L2Epilogue {
  using Shape = TileShape<kWgN>;
  static constexpr LoneSplit kLoneSplit = LoneSplit::kOneGroupEach;
  static constexpr int kRowBytes = Shape::kBRows * 2;  // bf16
  static constexpr int kStagedRowBytes = kRowBytes + 16;
  static constexpr int kWgStagingBytes = kBlockM * kStagedRowBytes;
  static constexpr int kSmemBytes = kNumMathWarpGroups * kWgStagingBytes;
  static_assert(kStagedRowBytes % 128 == 16, "padding must shift each row by four banks");
  static_assert(Shape::kNTiles % 2 == 0, "one stmatrix x4 covers two n8 tiles");

  const L2Params& p;
  uint8_t* staging;  // kSmemBytes, 16-byte aligned

  __device__ __forceinline__ void operator()(const Tile& tile, TileAccum<kWgN>& acc,
                                             int math_thread) const {
    const FragCoords fc(math_thread);
    uint8_t* buf = staging + fc.wg * kWgStagingBytes;
    const int row0 = (tile.pair * kNumMathWarpGroups + tile.block_of(fc.wg)) * kBlockM;
    // Thread t < 64 sends row t; its row_src load is issued first, to land under the staging.
    const bool sender = fc.t < kBlockM;
    const int src = sender ? p.row_src[row0 + fc.t] : -1;
    if (sender) ptx::bulk_wait_read<0>();
    warpgroup_sync(fc.wg);  // every sender's previous copy has read buf

    // stmatrix s of group g: n8 tiles 2s, 2s + 1 of the warp's 16 rows, matrix i = lane / 8 is
    // tile 2s + i / 2, rows (i % 2) * 8 + lane % 8.
    const int i = fc.lane / 8;
    const uint32_t lane_addr = ptx::smem_addr(buf) +
                               (fc.warp * 16 + (i % 2) * 8 + fc.lane % 8) * kStagedRowBytes +
                               (i / 2) * 16;
    if (tile.lone()) {  // B group wg, in acc[0] (the main loop's lone path)
      stage_group(acc[0], lane_addr + fc.wg * kWgN * 2);
    } else {
#pragma unroll
      for (int g = 0; g < kNumBGroups; ++g) stage_group(acc[g], lane_addr + g * kWgN * 2);
    }
    ptx::fence_proxy_async_shared();
    warpgroup_sync(fc.wg);  // buf holds all 64 rows

    if (src >= 0) {
      const int slots_per_rank = p.max_tokens * p.topk;
      const int rank = src / slots_per_rank, rem = src % slots_per_rank;
      const int token = rem / p.topk, k = rem % p.topk;
      const int col0 = tile.n * Shape::kBRows + (tile.lone() ? fc.wg * kWgN : 0);
      uint16_t* dst =
          p.combine[rank] + (static_cast<size_t>(k) * p.max_tokens + token) * p.hidden + col0;
      const uint8_t* row = buf + fc.t * kStagedRowBytes + (tile.lone() ? fc.wg * kWgN * 2 : 0);
      ptx::bulk_store(dst, row, tile.lone() ? kWgN * 2 : kRowBytes);
      ptx::bulk_commit();
    }
  }

  // One B group's accumulator into the staging rows, at the group's first column (lane_addr).
  // stmatrix s2 covers n8 tiles 2 s2, 2 s2 + 1 of the warp's 16 rows.
  __device__ __forceinline__ static void stage_group(const Accum<kWgN>& acc, uint32_t lane_addr) {
#pragma unroll
    for (int s2 = 0; s2 < Shape::kNTiles / 2; ++s2) {
      uint32_t r[4];
#pragma unroll
      for (int m = 0; m < 4; ++m) {
        const int reg = 4 * (2 * s2 + m / 2) + 2 * (m % 2);
        r[m] = ptx::cvt_bf16x2(acc[reg], acc[reg + 1]);
      }
      ptx::stmatrix_x4(lane_addr + 16 * s2 * 2, r);
    }
  }

  // After a thread's last tile: its rows must have landed before the kernel ends.
  __device__ __forceinline__ void finish() const { ptx::bulk_wait_all(); }
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
      /*a_ready=*/p.block_stored,
      /*a_ready_count=*/p.l1_n_tiles,
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
  using Mainloop = GroupedFp8TmaMainloop<kWgN, kStages>;
  extern __shared__ __align__(1024) uint8_t smem_raw[];
  uint8_t* smem = align_smem(smem_raw);
  const L2Params& p = k.p;
  Mainloop mainloop(smem, l2_operands<kWgN>(p), p.num_blocks, p.max_blocks, &k.a, &k.b,
                    p.tile_claims);
  const L2Epilogue<kWgN> epilogue{p, smem + Mainloop::kSmemBytes};
  mainloop.run(epilogue);
  epilogue.finish();
  // The runtime's release flag (written after this kernel) must order these peer stores.
  __threadfence_system();
}

template <int kWgN, int kStages>
constexpr int l2_smem_bytes() {
  return kSmemAlignSlack + GroupedFp8TmaMainloop<kWgN, kStages>::kSmemBytes +
         L2Epilogue<kWgN>::kSmemBytes;
}

}  // namespace jax_megamoe::sm90
