// L1 of the MegaMoE layer: per row block, act = quant_1x128(swiglu(A x W1[e]^T) * row_weight).
// A CTA tile covers 128 output columns j in [n0, n0 + 128) of a pair of row blocks: B group 0 is
// the W1 gate rows [n0, +128), group 1 the up rows [I + n0, +128), so a thread holds gate and up
// of the same (row, column) in the same register of its two accumulators, and a tile's row is
// exactly one 1x128 requant group. Both groups' rows arrive in lane-run order
// (BRowOrder::kLaneRuns), so each lane's columns of a row are two runs of consecutive columns.
#pragma once

#include <cstdint>

#include "jax_megamoe/epilogue/fp8_quant.cuh"
#include "jax_megamoe/epilogue/swiglu.cuh"
#include "jax_megamoe/impls/sm90_fp8_grouped_tma_mainloop.cuh"
#include "jax_megamoe/launch.h"
#include "jax_megamoe/ptx/cp_async.cuh"
#include "jax_megamoe/ptx/dependent_launch.cuh"
#include "jax_megamoe/ptx/shared.cuh"
#include "jax_megamoe/ptx/store.cuh"

namespace jax_megamoe::sm90 {

constexpr int kL1WgN = kQuantBlock;  // 128 columns per B group: gate or up

// Straight from registers. A paired tile: each warpgroup on its own, its row block's 64 x 128 act
// tile; lane q of a quad holds columns [32 q, +32) of its rows. A lone block: warpgroup wg holds
// half of the gate and of the up group, the columns [32 q + 8 wg, +8) and [32 q + 16 + 8 wg, +8),
// so the two warpgroups exchange their row maxima through shared memory for the 1x128 scale.
//
// kReleaseWarps: each tile's releases for L2 (release_stored) run on warp 1 + wg of the
// producer warpgroup, the release warp of math warpgroup wg, as L2's sends run on its store
// warps; without (the gathered-A kernel, whose warps 1 and 2 gather), on the math warpgroup's
// thread 0. Handshake per math warpgroup, one phase per tile, as L2's: `staged` completes on the
// four warps' arrivals (the stores are done and the record names their blocks), `freed` on the
// release warp's (it has read the record), which the math warpgroup's thread 0 waits for before
// it writes the next record, a tile's K loop later.
template <bool kReleaseWarps>
struct L1Epilogue {
  using Shape = TileShape<kL1WgN>;
  static constexpr LoneSplit kLoneSplit = LoneSplit::kHalfOfEachGroup;
  // The stores go straight from the math warps' registers; the release warps, if any, release.
  static constexpr int kStoreWarps = kReleaseWarps ? kNumMathWarpGroups : 0;
  static_assert(Shape::kNTiles == 16, "one row of the tile is one 128-column requant group");
  // Row maxima of a lone block, [warpgroup][row]; then the store-warp handshake, its record:
  // the tile's two row blocks (the pair's or lone one, and a tail or -1), then the number of
  // records written; then each math thread's prefetched rows (begin_tile), 16 bytes each.
  static constexpr int kAmaxBytes = kNumMathWarpGroups * kBlockM * sizeof(float);
  static constexpr int kRowsOffset = kAmaxBytes + kNumMathWarpGroups * StoreWarpHandshake::kBytes;
  static constexpr int kSmemBytes = kRowsOffset + kNumMathThreads * 16;
  static_assert(3 * sizeof(int) <= StoreWarpHandshake::kRecordBytes, "two blocks, the count");
  static_assert(kAmaxBytes % 8 == 0, "mbarriers must be 8-byte aligned");
  static_assert(kRowsOffset % 16 == 0, "a thread's rows are one 16-byte word");

  const L1Params& p;
  float* lone_amax;
  StoreWarpHandshake handshake;

  __device__ uint32_t records_written(int wg) const { return handshake.record(wg) + 8; }
  // Math thread i's two rows' routing weights, then their row_src (begin_tile), from the
  // handshake's address: the epilogue's shared memory starts kAmaxBytes before it.
  __device__ uint32_t rows_at(int math_thread) const {
    return handshake.base + (kRowsOffset - kAmaxBytes) + math_thread * 16;
  }

  // By one thread, before the main loop's CTA-wide barrier.
  __device__ void init_handshake() const {
    handshake.init();
    for (int wg = 0; wg < kNumMathWarpGroups; ++wg) ptx::st_shared(records_written(wg), 0);
  }

  // Release warp `wg` (kReleaseWarps): per tile of math warpgroup wg, the release of the record's
  // blocks, until the CTA's tile count (the main loop's, at shared address tile_count) says
  // there are no more (store_warp_wait).
  __device__ __forceinline__ void store(int wg, uint32_t tile_count) const {
    if (p.block_stored == nullptr) return;  // nothing to release: the math warps hand nothing
    const int lane = threadIdx.x % 32;
    uint32_t ph = 0;
    for (int n = 0;; ++n, ph ^= 1) {
      if (!store_warp_wait(handshake.staged(wg), ph, n, tile_count)) return;
      if (lane == 0) {
        // The staged phase's acquire, then these releases: cumulative over the math
        // warpgroup's stores, which its warps' arrivals ordered before that phase.
        const int first = ptx::ld_shared_s32(handshake.record(wg));
        const int tail = ptx::ld_shared_s32(handshake.record(wg) + 4);
        ptx::red_release_gpu_add(&p.block_stored[first], 1);
        if (tail >= 0) ptx::red_release_gpu_add(&p.block_stored[tail], 1);
        ptx::mbarrier_arrive(handshake.freed(wg));
      }
      __syncwarp();
    }
  }

  // A math thread, once a tile is published and before its K loop (GroupedFp8TmaMainloop): copies
  // its two rows' routing weights and row_src into its own 16 bytes of shared memory, for the
  // epilogue after the K loop. Loaded by the epilogue itself, their round trip to global memory
  // sat at the start of every tile's epilogue, while the tensor cores idled (RESULTS.md
  // 2026-12-04, "what L1's time goes to").
  __device__ __forceinline__ void begin_tile(const Tile& tile, int math_thread) const {
    // Opaque: the rows' addresses hoisted out of the tile loop took registers there and pushed
    // more per-tile values to the stack.
    const int thread = ptx::opaque(math_thread);
    const FragCoords fc(thread);
    const int row0 = tile.first_row(fc.wg);
    const uint32_t at = rows_at(thread);
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int row = row0 + fc.row(half);
      ptx::cp_async_4(at + 4 * half, p.row_weight + row);
      ptx::cp_async_4(at + 8 + 4 * half, p.row_src + row);
    }
  }

  __device__ __forceinline__ void operator()(const Tile& tile, TileAccum<kL1WgN>& acc,
                                             int math_thread) const {
    math_thread = ptx::opaque(math_thread);  // nothing hoisted: see kMathRegs
    const FragCoords fc(math_thread);
    const int row0 = tile.first_row(fc.wg);
    // Both rows' routing weight and destination flag, copied at the tile's start (begin_tile).
    ptx::cp_async_wait_all();
    Rows rows;
    const uint32_t at = rows_at(math_thread);
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      rows.row[half] = row0 + fc.row(half);
      rows.weight[half] = ptx::ld_shared_f32(at + 4 * half);
      rows.valid[half] = ptx::ld_shared_s32(at + 8 + 4 * half) >= 0;
    }
    if (tile.lone()) {
      lone(tile, acc, fc, rows);
    } else {
      paired(tile, acc, fc, rows);
    }
    // A tail's epilogue follows this one and hands both blocks over.
    release_stored(row0 / kBlockM, fc, /*first=*/true, /*last=*/!tile.tail());
  }

 private:
  // The warpgroup's stores of this tile to row block `block`, then one release: L2 may start on
  // the block once every N tile of it has counted (twice per N tile for a block L2 sees alone,
  // a lone block or a tail: both warpgroups). L2 reads the rows with TMA, the async proxy: each
  // writer fences its generic stores for it (and L2 fences again after its acquire). A release
  // waits until the releasing thread's earlier stores have landed (MEMBAR.GPU in SASS): on
  // thread 0 right after the tile's stores, that held warp 0, and with it the warpgroup's next
  // wgmma, ~0.6 us a tile (L1 1.1 % slower at M = 8192 with the releases than without,
  // RESULTS.md 2026-12-03); a release warp takes that wait off the math warps. first: the
  // tile's first block (a pair's or a lone one; a tail is second), last: its last.
  __device__ __forceinline__ void release_stored(int block, const FragCoords& fc, bool first,
                                                 bool last) const {
    if (p.block_stored == nullptr) return;
    ptx::fence_proxy_async_global();
    if constexpr (!kReleaseWarps) {
      warpgroup_sync(fc.wg);
      if (fc.t == 0) ptx::red_release_gpu_add(&p.block_stored[block], 1);
    } else {
      if (fc.t == 0) {
        if (first) {  // the release warp has read the previous record (its first: at once)
          const int written = ptx::ld_shared_s32(records_written(fc.wg));
          ptx::mbarrier_wait(handshake.freed(fc.wg), (written & 1) ^ 1);
          ptx::st_shared(handshake.record(fc.wg) + 4, -1);
        }
        ptx::st_shared(handshake.record(fc.wg) + (first ? 0 : 4), block);
        if (last) {
          ptx::st_shared(records_written(fc.wg), ptx::ld_shared_s32(records_written(fc.wg)) + 1);
        }
      }
      if (last) {  // one arrival per warp, after its lanes' stores (thread 0's record included)
        __syncwarp();
        if (fc.lane == 0) ptx::mbarrier_arrive(handshake.staged(fc.wg));
      }
    }
  }

  // A thread's two accumulator rows (half 0, 1): pool row, routing weight, has a destination.
  struct Rows {
    int row[2];
    float weight[2];
    bool valid[2];
  };

  // act = swiglu(gate, up) * weight in place over the first kNT n8 tiles of half `half`'s row;
  // returns the quad's max |act| (the row's, over these columns). Without the activation clamp
  // (p.clamp = +inf, the default) the clamp-free form, chosen once per row: the clamp's three
  // FMNMX a value were a sixth of L1's epilogue instructions.
  template <int kNT>
  __device__ __forceinline__ float swiglu_row(TileAccum<kL1WgN>& acc, int half,
                                              float weight) const {
    return p.clamp < INFINITY ? swiglu_row<kNT, true>(acc, half, weight)
                              : swiglu_row<kNT, false>(acc, half, weight);
  }
  template <int kNT, bool kClamp>
  __device__ __forceinline__ float swiglu_row(TileAccum<kL1WgN>& acc, int half,
                                              float weight) const {
    float row_amax = 0.f;
#pragma unroll
    for (int j = 0; j < kNT; ++j) {
      const int r = 4 * j + 2 * half;  // and r + 1: the thread's columns e = 0, 1 of n8 tile j
      const float2 gate{acc[0][r], acc[0][r + 1]}, up{acc[1][r], acc[1][r + 1]};
      const float2 act = kClamp ? epilogue::swiglu_x2(gate, up, weight, p.clamp)
                                : epilogue::swiglu_x2(gate, up, weight);
      acc[0][r] = act.x;
      acc[0][r + 1] = act.y;
      row_amax = fmaxf(row_amax, fmaxf(fabsf(acc[0][r]), fabsf(acc[0][r + 1])));
    }
    // One row's columns of this warpgroup live in the four lanes of one quad.
    return epilogue::quad_max(row_amax);
  }

  // Quantizes the first kNT n8 tiles of half `half`'s row with `scale` and stores them (padding
  // rows, !valid, are never written). Lane q's values of n8 tile j are the tile's columns
  // col0 + 32 q + j (e = 0) and col0 + 32 q + 16 + j (e = 1) (BRowOrder::kLaneRuns): two runs of
  // kNT bytes, each in one store.
  template <int kNT>
  __device__ __forceinline__ void store_row(const TileAccum<kL1WgN>& acc, int half, int row,
                                            bool valid, int n, int col0, float scale,
                                            int lane) const {
    if (!valid) return;
    const epilogue::ScaleDivisor divisor(scale);
    const auto value = [&](int j, int e) { return acc[0][4 * j + 2 * half + e]; };
    uint8_t* dst = p.act + static_cast<size_t>(row) * p.intermediate + n * kQuantBlock + col0 +
                   (lane % 4) * 32;
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      uint32_t run[kNT / 4];
#pragma unroll
      for (int w = 0; w < kNT / 4; ++w) {
        const uint16_t lo =
            epilogue::quantize_e4m3x2(value(4 * w, e), value(4 * w + 1, e), divisor);
        const uint16_t hi =
            epilogue::quantize_e4m3x2(value(4 * w + 2, e), value(4 * w + 3, e), divisor);
        run[w] = __byte_perm(lo, hi, 0x5410);
      }
      ptx::st_global_words(dst + 16 * e, run);
    }
  }

  __device__ __forceinline__ void store_scale(int row, bool valid, int n, float scale) const {
    if (valid) p.act_scale[static_cast<size_t>(row) * (p.intermediate / kQuantBlock) + n] = scale;
  }

  __device__ __forceinline__ void paired(const Tile& tile, TileAccum<kL1WgN>& acc,
                                         const FragCoords& fc, const Rows& rows) const {
    constexpr int kNT = Shape::kNTiles;
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int row = rows.row[half];
      const float amax = swiglu_row<kNT>(acc, half, rows.weight[half]);
      const float scale = epilogue::e4m3_scale(amax);
      store_row<kNT>(acc, half, row, rows.valid[half], tile.n, 0, scale, fc.lane);
      if (fc.lane % 4 == 0) store_scale(row, rows.valid[half], tile.n, scale);
    }
  }

 public:
  // The tail that rode along with a paired tile (GroupedFp8TmaMainloop, kTailRows): swap-AB
  // accumulators, tail_acc[g][4 j + 2 half + c] is B row 64 wg + fc.row(half) of the group, gate
  // (g = 0) or up (1), of token row fc.col(j, c) of the row block after the pair; in lane-run
  // order that is column lane_run_row(64 wg + fc.row(0)) + half of the tile. A token's 128
  // columns are spread over the eight lanes of a warp that share lane % 4 and over all eight
  // math warps: its amax meets through shuffles, then through lone_amax ([warp][token]).
  template <int kRegs>
  __device__ __forceinline__ void tail(const Tile& tile, float (&tail_acc)[kNumBGroups][kRegs],
                                       int math_thread) const {
    constexpr int kRows = 2 * kRegs, kJ = kRows / 8;
    static_assert(kNumMathThreads / 32 * kRows <= kNumMathWarpGroups * kBlockM,
                  "the tail's amax exchange must fit lone_amax");
    math_thread = ptx::opaque(math_thread);  // nothing hoisted: see kMathRegs
    const FragCoords fc(math_thread);
    const int block = (tile.pair + 1) * kNumMathWarpGroups;
    int row[kJ][2];
    float weight[kJ][2], amax[kJ][2];
    bool valid[kJ][2];
#pragma unroll
    for (int j = 0; j < kJ; ++j) {
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        row[j][c] = block * kBlockM + fc.col(j, c);
        weight[j][c] = p.row_weight[row[j][c]];
        valid[j][c] = p.row_src[row[j][c]] >= 0;
      }
    }
    const bool clamp = p.clamp < INFINITY;
#pragma unroll
    for (int j = 0; j < kJ; ++j) {
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        // Halves 0 and 1: two columns of token fc.col(j, c).
        const int r0 = 4 * j + c, r1 = r0 + 2;
        const float2 gate{tail_acc[0][r0], tail_acc[0][r1]}, up{tail_acc[1][r0], tail_acc[1][r1]};
        const float2 act = clamp ? epilogue::swiglu_x2(gate, up, weight[j][c], p.clamp)
                                 : epilogue::swiglu_x2(gate, up, weight[j][c]);
        tail_acc[0][r0] = act.x;
        tail_acc[0][r1] = act.y;
        amax[j][c] = fmaxf(fmaxf(0.f, fabsf(tail_acc[0][r0])), fabsf(tail_acc[0][r1]));
#pragma unroll
        for (int lanes = 4; lanes < 32; lanes *= 2)
          amax[j][c] = fmaxf(amax[j][c], __shfl_xor_sync(0xffffffffu, amax[j][c], lanes));
        if (fc.lane < 4) lone_amax[(math_thread / 32) * kRows + fc.col(j, c)] = amax[j][c];
      }
    }
    math_sync();
    // Opaque: hoisted out of the tile loop, the column took a register there and pushed six more
    // words of per-tile values to the stack.
    const int col = tile.n * kQuantBlock + lane_run_row(ptx::opaque(fc.wg * kBlockM + fc.row(0)));
#pragma unroll
    for (int j = 0; j < kJ; ++j) {
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        float token_amax = 0.f;
#pragma unroll
        for (int w = 0; w < kNumMathThreads / 32; ++w)
          token_amax = fmaxf(token_amax, lone_amax[w * kRows + fc.col(j, c)]);
        const float scale = epilogue::e4m3_scale(token_amax);
        const uint16_t q = epilogue::quantize_e4m3x2(
            tail_acc[0][4 * j + c], tail_acc[0][4 * j + 2 + c], epilogue::ScaleDivisor(scale));
        if (valid[j][c]) {  // halves 0 and 1: adjacent columns, an even one first
          *reinterpret_cast<uint16_t*>(p.act + static_cast<size_t>(row[j][c]) * p.intermediate +
                                       col) = q;
        }
        if (math_thread < 4) store_scale(row[j][c], valid[j][c], tile.n, scale);
      }
    }
    // The next lone tile or tail rewrites lone_amax; every warp must have read it here.
    math_sync();
    release_stored(block, fc, /*first=*/false, /*last=*/true);
  }

 private:
  __device__ __forceinline__ void lone(const Tile& tile, TileAccum<kL1WgN>& acc,
                                       const FragCoords& fc, const Rows& rows) const {
    constexpr int kNT = Shape::kNTiles / kNumMathWarpGroups;
    float amax[2];
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      amax[half] = swiglu_row<kNT>(acc, half, rows.weight[half]);
      if (fc.lane % 4 == 0) lone_amax[fc.wg * kBlockM + fc.row(half)] = amax[half];
    }
    math_sync();
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int row = rows.row[half];
      const float other = lone_amax[(1 - fc.wg) * kBlockM + fc.row(half)];
      const float scale = epilogue::e4m3_scale(fmaxf(amax[half], other));
      store_row<kNT>(acc, half, row, rows.valid[half], tile.n, fc.wg * kNT, scale, fc.lane);
      if (fc.wg == 0 && fc.lane % 4 == 0) store_scale(row, rows.valid[half], tile.n, scale);
    }
    // The next lone tile rewrites lone_amax; both warpgroups must have read it here.
    math_sync();
  }
};

// Rows of L1's swap-AB tail (GroupedFp8TmaMainloop): an expert's last row block rides along with
// its last full pair when its valid rows are at most this many.
constexpr int kL1TailRows = 16;

// tail_rows: kL1TailRows, or 0 to run every lone block as a tile of its own.
__device__ __forceinline__ GemmOperands l1_operands(const L1Params& p, int tail_rows) {
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
      /*a_ready=*/nullptr,
      /*a_ready_count=*/0,
      tail_rows,
      p.row_src,
      p.x,
      p.x_scale,
      /*a_src_div=*/p.topk,
  };
}

// Kernel parameters: the launch contract, the TMA tensor maps of the pool and of w1 (the gate and
// the up half of each expert, viewed as [2E][I / 128][16][8][H] so that a box delivers each
// 128-row block in lane-run order: csrc/launch/gemm.cu, encode_l1_weights), the tail rows
// (kL1TailRows or 0) and GemmOperands::sorted_pairs.
struct L1KernelParams {
  L1Params p;
  GemmTensorMaps maps;
  int tail_rows;
  int sorted_pairs;
};

template <int kStages, bool kGatherA>
using L1Mainloop =
    GroupedFp8TmaMainloop<kL1WgN, kStages, kL1TailRows, kGatherA, BRowOrder::kLaneRuns>;

// The gathered-A kernel's warps 1 and 2 gather, so it has no release warps.
template <bool kGatherA>
using L1EpilogueFor = L1Epilogue<!kGatherA>;

// kGatherA: A read from the tokens' rows (L1Params::x), not from the pool.
template <int kStages, bool kGatherA>
__global__ void __launch_bounds__(kNumThreads, 1)
    sm90_fp8_mega_moe_l1(const __grid_constant__ L1KernelParams k) {
  // An L2 launched as a programmatic dependent may take the SMs this grid's CTAs leave; it waits
  // for the row blocks it reads (L1Params::block_stored), never for the whole grid.
  ptx::launch_dependents();
  using Mainloop = L1Mainloop<kStages, kGatherA>;
  extern __shared__ __align__(1024) uint8_t smem_raw[];
  uint8_t* smem = align_smem(smem_raw);
  const L1Params& p = k.p;
  GemmOperands op = l1_operands(p, k.tail_rows);
  op.sorted_pairs = k.sorted_pairs;
  Mainloop mainloop(smem, op, p.num_blocks, p.max_blocks, k.maps, p.tile_claims);
  uint8_t* epilogue_smem = smem + Mainloop::kSmemBytes;
  using Epilogue = L1EpilogueFor<kGatherA>;
  const Epilogue epilogue{p,
                          reinterpret_cast<float*>(epilogue_smem),
                          {ptx::smem_addr(epilogue_smem + Epilogue::kAmaxBytes)}};
  if (threadIdx.x == 0) epilogue.init_handshake();  // published by run()'s CTA-wide barrier
  mainloop.run(epilogue);
}

template <int kStages, bool kGatherA>
constexpr int l1_smem_bytes() {
  return kSmemAlignSlack + L1Mainloop<kStages, kGatherA>::kSmemBytes +
         L1EpilogueFor<kGatherA>::kSmemBytes;
}

}  // namespace jax_megamoe::sm90
