// L2 of the MegaMoE layer: out = act x W2[e]^T, rounded to bf16 and sent into the source rank's
// combine slot [k][token][hidden] (possibly a peer GPU's memory). Every (slot, h) has
// exactly one writer, so the combine needs no atomics and the result is deterministic.
#pragma once

#include <cstdint>

#include "jax_megamoe/impls/sm90_fp8_grouped_tma_mainloop.cuh"
#include "jax_megamoe/launch.h"
#include "jax_megamoe/ptx/convert.cuh"
#include "jax_megamoe/ptx/mbarrier.cuh"
#include "jax_megamoe/ptx/shared.cuh"
#include "jax_megamoe/ptx/store.cuh"

namespace jax_megamoe::sm90 {

// Roles: each math warpgroup stages its rows (operator(), after each tile's K loop); store warp
// w of the producer warpgroup (store(w)) sends math warpgroup w's staged rows to their combine
// slots. A math warpgroup: 64 rows x the tile's kNumBGroups * kWgN hidden columns, or of a lone
// block B group wg's kWgN columns.
//
// The math warpgroup's part is short so that it is back in the K loop soon: stmatrix writes
// the bf16 fragments into its staging buffer (rows in order, 16 bytes of padding per row so the
// eight rows of one stmatrix phase hit distinct banks), a proxy fence, then one arrival per warp
// on `staged`. Its store warp then sends each row's 512 (lone: 256) contiguous bytes to the
// row's combine slot with a bulk copy, waits until the copies have read the buffer and arrives on
// `freed`, which the math warpgroup waits for before it stages its next tile (a tile's K loop
// later, so it rarely waits). When the math warps issued the copies themselves, one sender
// thread per row, the uniform bulk-copy instruction ran once per sender in a loop and the wait
// for the previous copies sat in their path: with the next tile's first-stage wait, ~11 % of
// L2's warp samples at M = 8192 (Nsight Compute, H200, 2026-12-02). Writing from registers
// (quad shuffles + 16-byte stores) had taken ~1400 instructions per warp and tile.
//
// Handshake per math warpgroup w, one phase per staged tile: `staged[w]` completes on the four
// warp arrivals (release: the rows and the record below are written), `freed[w]` on the store
// warp's one arrival (its copies have read the buffer). A record {row0, col0, bytes} says what
// the buffer holds; the math warpgroup writes it only after waiting on `freed` of the previous
// one, so the store warp has read that. The store warp stops at the CTA's tile count.
template <int kWgN>
struct L2Epilogue {
  using Shape = TileShape<kWgN>;
  static constexpr LoneSplit kLoneSplit = LoneSplit::kOneGroupEach;
  static constexpr int kStoreWarps = kNumMathWarpGroups;
  static constexpr int kRowBytes = Shape::kBRows * 2;  // bf16
  static constexpr int kStagedRowBytes = kRowBytes + 16;
  static constexpr int kWgStagingBytes = kBlockM * kStagedRowBytes;
  // After the staging buffers, the store-warp handshake (its record: first row, first column,
  // bytes per row).
  static constexpr int kHandshakeOffset = kNumMathWarpGroups * kWgStagingBytes;
  static constexpr int kSmemBytes =
      kHandshakeOffset + kNumMathWarpGroups * StoreWarpHandshake::kBytes;
  static_assert(3 * sizeof(int) <= StoreWarpHandshake::kRecordBytes, "row, column, bytes");
  static_assert(kStagedRowBytes % 128 == 16, "padding must shift each row by four banks");
  static_assert(Shape::kNTiles % 2 == 0, "one stmatrix x4 covers two n8 tiles");
  static_assert(kHandshakeOffset % 8 == 0, "mbarriers must be 8-byte aligned");

  const L2Params& p;
  // kSmemBytes at this 32-bit shared-memory address, 16-byte aligned (the math threads hold it
  // and `phase` across the K loop, with no register to spare; a generic pointer takes two).
  uint32_t staging;
  uint32_t phase = 0;  // a math thread's count of staged tiles, mod 2

  __device__ StoreWarpHandshake handshake() const { return {staging + kHandshakeOffset}; }

  // Before a tile's K loop (GroupedFp8TmaMainloop::run): nothing to start early.
  __device__ __forceinline__ void begin_tile(const Tile&, int) const {}

  // Math warpgroup: stage one tile's rows and hand them to the store warp.
  __device__ __forceinline__ void operator()(const Tile& tile, TileAccum<kWgN>& acc,
                                             int math_thread) {
    const FragCoords fc(math_thread);
    const uint32_t buf = staging + fc.wg * kWgStagingBytes;
    // The first wait sees a fresh barrier, whose phase of parity 1 reports complete.
    ptx::mbarrier_wait(handshake().freed(fc.wg), phase ^ 1);

    // stmatrix s of group g: n8 tiles 2s, 2s + 1 of the warp's 16 rows, matrix i = lane / 8 is
    // tile 2s + i / 2, rows (i % 2) * 8 + lane % 8.
    const int i = fc.lane / 8;
    const uint32_t lane_addr =
        buf + (fc.warp * 16 + (i % 2) * 8 + fc.lane % 8) * kStagedRowBytes + (i / 2) * 16;
    if (tile.lone()) {  // B group wg, in acc[0] (the main loop's lone path)
      stage_group(acc[0], lane_addr + fc.wg * kWgN * 2);
    } else {
#pragma unroll
      for (int g = 0; g < kNumBGroups; ++g) stage_group(acc[g], lane_addr + g * kWgN * 2);
    }
    ptx::fence_proxy_async_shared();
    if (fc.t == 0) {
      const int row0 = tile.first_row(fc.wg);
      const int col0 = tile.n * Shape::kBRows + (tile.lone() ? fc.wg * kWgN : 0);
      write_record(fc.wg, row0, col0, tile.lone() ? kWgN * 2 : kRowBytes);
    }
    hand_over(fc);
  }

  // Store warp `wg`: sends math warpgroup wg's staged rows, tile after tile, until the CTA's
  // tile count (the main loop's, at shared address tile_count) says there are no more; then waits
  // for its copies to land: the runtime's release flag (written after this kernel) must order
  // these peer stores.
  __device__ __forceinline__ void store(int wg, uint32_t tile_count) const {
    const int lane = threadIdx.x % 32;
    const uint32_t buf = staging + wg * kWgStagingBytes;
    const int slots_per_rank = p.max_tokens * p.topk;
    uint32_t ph = 0;
    for (int n = 0;; ++n, ph ^= 1) {
      if (!store_warp_wait(handshake().staged(wg), ph, n, tile_count)) break;
      const int row0 = ptx::ld_shared_s32(handshake().record(wg));
      const int col0 = ptx::ld_shared_s32(handshake().record(wg) + 4);
      const int bytes = ptx::ld_shared_s32(handshake().record(wg) + 8);
      const int src[2] = {p.row_src[row0 + lane], p.row_src[row0 + lane + 32]};
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        if (src[h] < 0) continue;
        const int rank = src[h] / slots_per_rank, rem = src[h] % slots_per_rank;
        const int token = rem / p.topk, k = rem % p.topk;
        uint16_t* dst =
            p.combine[rank] + (static_cast<size_t>(k) * p.max_tokens + token) * p.hidden + col0;
        const int r = lane + 32 * h;
        ptx::bulk_store(dst, buf + r * kStagedRowBytes + col0 % Shape::kBRows * 2, bytes);
      }
      ptx::bulk_commit();
      ptx::bulk_wait_read<0>();
      __syncwarp();
      if (lane == 0) ptx::mbarrier_arrive(handshake().freed(wg));
    }
    ptx::bulk_wait_all();
    __threadfence_system();
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

 private:
  __device__ __forceinline__ void write_record(int wg, int row0, int col0, int bytes) const {
    ptx::st_shared(handshake().record(wg), row0);
    ptx::st_shared(handshake().record(wg) + 4, col0);
    ptx::st_shared(handshake().record(wg) + 8, bytes);
  }
  // One arrival per warp, after all its lanes' writes (the record's writer is warp 0's leader).
  __device__ __forceinline__ void hand_over(const FragCoords& fc) {
    __syncwarp();
    if (fc.lane == 0) ptx::mbarrier_arrive(handshake().staged(fc.wg));
    phase ^= 1;
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
      /*a_ready=*/p.block_stored,
      /*a_ready_count=*/p.l1_n_tiles,
      /*tail_rows=*/0,
      /*row_src=*/nullptr,
  };
}

// Kernel parameters: the launch contract plus the TMA tensor maps of act and of w2 viewed as
// [E * H / kWgN][kWgN][I] (no tail: maps.tail unused), and GemmOperands::sorted_pairs.
struct L2KernelParams {
  L2Params p;
  GemmTensorMaps maps;
  int sorted_pairs;
};

template <int kWgN, int kStages>
__global__ void __launch_bounds__(kNumThreads, 1)
    sm90_fp8_mega_moe_l2(const __grid_constant__ L2KernelParams k) {
  using Mainloop = GroupedFp8TmaMainloop<kWgN, kStages>;
  extern __shared__ __align__(1024) uint8_t smem_raw[];
  uint8_t* smem = align_smem(smem_raw);
  const L2Params& p = k.p;
  GemmOperands op = l2_operands<kWgN>(p);
  op.sorted_pairs = k.sorted_pairs;
  Mainloop mainloop(smem, op, p.num_blocks, p.max_blocks, k.maps, p.tile_claims);
  L2Epilogue<kWgN> epilogue{p, ptx::smem_addr(smem + Mainloop::kSmemBytes)};
  if (threadIdx.x == 0) epilogue.handshake().init();  // published by run()'s CTA-wide barrier
  mainloop.run(epilogue);
}

template <int kWgN, int kStages>
constexpr int l2_smem_bytes() {
  return kSmemAlignSlack + GroupedFp8TmaMainloop<kWgN, kStages>::kSmemBytes +
         L2Epilogue<kWgN>::kSmemBytes;
}

}  // namespace jax_megamoe::sm90
