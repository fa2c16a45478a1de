// Shared main loop of the L1/L2 grouped FP8 GEMMs: a persistent CTA walks (row block, N tile)
// pairs; every K block of 128 (= one scale block) is a cp.async stage in a shared-memory ring,
// multiplied on the tensor cores by wgmma e4m3 (ptx/wgmma.cuh, SASS QGMMA) into a per-stage f32
// accumulator, then promoted into the f32 master accumulator with a_scale x b_scale, which change
// every 128 K.
//
// CTA tile: kBlockM (64) rows x 2 * kWgN B rows. Threads: two warpgroups; warpgroup g owns all 64
// rows and B rows [g * kWgN, +kWgN) of the tile, one wgmma m64nNk32 per k32 step. Each
// warpgroup's B rows are contiguous in the expert's weight matrix and lie inside one 128x128
// scale block, so they have one weight scale per K block. L1 uses warpgroup 0 = gate rows,
// warpgroup 1 = up rows of the same 128 columns.
//
// Per K block, all threads: wait for the stage's cp.async groups, fence them into the async
// proxy, barrier; issue the stage's four wgmma; while they run, issue the loads of stage
// i + kStages - 1 into the slot consumed in the previous step; wait for the wgmma; promote.
// After a tile's last K block the epilogue runs while the next tile's first stages load.
#pragma once

#include <cstdint>

#include "jax_megamoe/launch.h"
#include "jax_megamoe/ptx/cp_async.cuh"
#include "jax_megamoe/ptx/wgmma.cuh"

namespace jax_megamoe::sm90 {

constexpr int kNumWarpGroups = 2;
constexpr int kWarpGroupThreads = 128;
constexpr int kNumThreads = kNumWarpGroups * kWarpGroupThreads;
constexpr int kBlockK = kQuantBlock;
constexpr int kWgmmaK = 32;
// wgmma's 128-byte swizzle repeats every 8 rows x 128 B: operand tiles must start 1024-aligned.
constexpr int kSwizzleAtomBytes = 1024;
// Slack for aligning the dynamic shared-memory base up to kSwizzleAtomBytes.
constexpr int kSmemAlignSlack = kSwizzleAtomBytes;
static_assert(kBlockK == 128, "one K block must be exactly one 128-byte swizzle row");
static_assert(kBlockM == 64, "one wgmma m64 covers the row block");

template <int kWgN>
struct TileShape {
  static_assert(kWgN == 64 || kWgN == 128, "warpgroup N must be a wgmma shape we instantiate");
  static constexpr int kBRows = kNumWarpGroups * kWgN;
  // One stage: A [64][128], B [kBRows][128] (both 128B-swizzled, 1024-aligned), then in a
  // separate region A scales [64] and B scales [kNumWarpGroups].
  static constexpr int kABytes = kBlockM * kBlockK;
  static constexpr int kBWgBytes = kWgN * kBlockK;
  static constexpr int kBBytes = kBRows * kBlockK;
  static constexpr int kOperandBytes = kABytes + kBBytes;
  static constexpr int kScaleBytes = ((kBlockM + kNumWarpGroups) * 4 + 127) / 128 * 128;
  static constexpr int kStageBytes = kOperandBytes + kScaleBytes;
  static constexpr int kAccRegs = kWgN / 2;  // m64nN f32 accumulator per thread
  static constexpr int kNTiles = kWgN / 8;   // n8 tiles per warpgroup
  static_assert(kABytes % kSwizzleAtomBytes == 0 && kBWgBytes % kSwizzleAtomBytes == 0,
                "every operand tile must start on a swizzle atom");
  static_assert(kBlockM * kBlockK / 16 % kNumThreads == 0, "A chunks must split evenly");
  static_assert(kBRows * kBlockK / 16 % kNumThreads == 0, "B chunks must split evenly");
  static_assert(kBlockM + kNumWarpGroups <= kNumThreads, "one thread per scale copy");
};

// Master accumulator of one thread, in the wgmma m64nN D layout (ptx/wgmma.cuh).
template <int kWgN>
using Accum = float[TileShape<kWgN>::kAccRegs];

// Byte offset of 16-byte chunk `chunk` of row `row` in a [rows][128] tile: the 128-byte swizzle
// wgmma's descriptors (layout 1) expect of a 1024-aligned tile (also the TMA 128B pattern).
__device__ __forceinline__ uint32_t swizzle_128(int row, int chunk) {
  return static_cast<uint32_t>(row * 128 + ((chunk ^ (row & 7)) << 4));
}

__device__ __forceinline__ uint8_t* align_smem(uint8_t* p) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  return reinterpret_cast<uint8_t*>((a + kSwizzleAtomBytes - 1) &
                                    ~static_cast<uintptr_t>(kSwizzleAtomBytes - 1));
}

struct GemmOperands {
  const uint8_t* a;             // [pool_rows, k]
  const float* a_scale;         // [pool_rows, k / 128]
  const uint8_t* b;             // [experts, b_rows, k]
  const float* b_scale;         // [experts, b_rows / 128, k / 128]
  const int32_t* block_expert;  // [max_blocks]
  int k;
  int b_rows;
  // B row of warpgroup g of N tile n: n * b_tile_stride + g * b_group_stride.
  int b_tile_stride;
  int b_group_stride;
  int n_tiles;  // N tiles per row block
};

struct Tile {
  int index;  // >= num_tiles: this CTA is done
  int block;
  int n;
  int expert;
};

// Static round-robin over (row block, N tile), row-block-major so CTAs running side by side share
// the A tile and one expert's weights in L2. A block whose expert is negative (never produced by
// a correct dispatch) is skipped rather than read out of bounds.
class TileScheduler {
 public:
  __device__ TileScheduler(const GemmOperands& op, int num_blocks)
      : block_expert_(op.block_expert), n_tiles_(op.n_tiles), num_tiles_(num_blocks * op.n_tiles) {}

  __device__ Tile first() const { return resolve(static_cast<int>(blockIdx.x)); }
  __device__ Tile next(const Tile& t) const {
    return resolve(t.index + static_cast<int>(gridDim.x));
  }
  __device__ bool done(const Tile& t) const { return t.index >= num_tiles_; }

 private:
  __device__ Tile resolve(int index) const {
    for (; index < num_tiles_; index += gridDim.x) {
      const int block = index / n_tiles_;
      const int expert = block_expert_[block];
      if (expert >= 0) return {index, block, index - block * n_tiles_, expert};
    }
    return {num_tiles_, 0, 0, 0};
  }

  const int32_t* block_expert_;
  int n_tiles_;
  int num_tiles_;
};

template <int kWgN, int kStages>
class GroupedFp8Mainloop {
  using Shape = TileShape<kWgN>;
  using Mma = ptx::WgmmaE4m3<kWgN>;
  static_assert(kStages >= 2, "the ring needs one stage in flight while another is consumed");

 public:
  // `smem` must be kSwizzleAtomBytes-aligned (align_smem).
  static constexpr int kSmemBytes = kStages * Shape::kStageBytes;

  __device__ GroupedFp8Mainloop(uint8_t* smem, const GemmOperands& op, int num_blocks)
      : smem_(smem), op_(op), sched_(op, num_blocks), num_kb_(op.k / kBlockK) {}

  // Runs every tile of this CTA; epilogue(tile, acc) is called by all threads after the tile's
  // last K block, while the next tile's first stages are already loading.
  template <class Epilogue>
  __device__ __forceinline__ void run(Epilogue&& epilogue) {
    Producer producer{sched_.first(), 0};
    for (int s = 0; s < kStages - 1; ++s) produce(producer, s);

    int slot = 0;
    for (Tile tile = sched_.first(); !sched_.done(tile); tile = sched_.next(tile)) {
      Accum<kWgN> acc;
#pragma unroll
      for (int i = 0; i < Shape::kAccRegs; ++i) acc[i] = 0.f;

      for (int kb = 0; kb < num_kb_; ++kb) {
        ptx::cp_async_wait<kStages - 2>();
        // This thread's copies into `slot` are complete; make them visible to the async proxy
        // (wgmma reads operands through it) before the barrier publishes them to all warps.
        ptx::fence_proxy_async_shared();
        // Makes stage `slot` visible to all warps, and retires every read of the slot the
        // producer refills next (its wgmma were waited for in the previous step).
        __syncthreads();
        float part[Shape::kAccRegs];
        issue_mma(slot, part);
        produce(producer, slot == 0 ? kStages - 1 : slot - 1);
        ptx::wgmma_wait<0>();
        ptx::fence_operands(part);
        promote(slot, part, acc);
        slot = slot == kStages - 1 ? 0 : slot + 1;
      }
      epilogue(tile, acc);
    }
  }

 private:
  struct Producer {
    Tile tile;
    int kb;
  };

  __device__ uint8_t* stage_a(int slot) const { return smem_ + slot * Shape::kOperandBytes; }
  __device__ uint8_t* stage_b(int slot) const { return stage_a(slot) + Shape::kABytes; }
  __device__ float* stage_a_scale(int slot) const {
    return reinterpret_cast<float*>(smem_ + kStages * Shape::kOperandBytes +
                                    slot * Shape::kScaleBytes);
  }
  __device__ float* stage_b_scale(int slot) const { return stage_a_scale(slot) + kBlockM; }

  // Producer role: one K block of the CTA's load stream into `slot`. Always commits a group
  // (possibly empty) so cp_async_wait<kStages - 2> counts stages, not copies.
  __device__ __forceinline__ void produce(Producer& pr, int slot) {
    if (!sched_.done(pr.tile)) {
      const int tid = threadIdx.x;
      const int kq = op_.k / kQuantBlock;
      const size_t row0 = static_cast<size_t>(pr.tile.block) * kBlockM;
      const size_t k0 = static_cast<size_t>(pr.kb) * kBlockK;

      const uint32_t a_smem = ptx::smem_addr(stage_a(slot));
#pragma unroll
      for (int i = 0; i < Shape::kABytes / 16 / kNumThreads; ++i) {
        const int idx = tid + i * kNumThreads;
        const int row = idx / 8, chunk = idx % 8;
        ptx::cp_async_16(a_smem + swizzle_128(row, chunk),
                         op_.a + (row0 + row) * op_.k + k0 + chunk * 16);
      }

      const uint8_t* b_expert = op_.b + static_cast<size_t>(pr.tile.expert) * op_.b_rows * op_.k;
      const int b_row0 = pr.tile.n * op_.b_tile_stride;
      const uint32_t b_smem = ptx::smem_addr(stage_b(slot));
#pragma unroll
      for (int i = 0; i < Shape::kBBytes / 16 / kNumThreads; ++i) {
        const int idx = tid + i * kNumThreads;
        const int row = idx / 8, chunk = idx % 8;
        const int group = row / kWgN;
        const int b_row = b_row0 + group * op_.b_group_stride + row % kWgN;
        ptx::cp_async_16(b_smem + swizzle_128(row, chunk),
                         b_expert + static_cast<size_t>(b_row) * op_.k + k0 + chunk * 16);
      }

      if (tid < kBlockM) {
        ptx::cp_async_4(ptx::smem_addr(stage_a_scale(slot) + tid),
                        op_.a_scale + (row0 + tid) * kq + pr.kb);
      } else if (tid < kBlockM + kNumWarpGroups) {
        const int group = tid - kBlockM;
        const int b_row = b_row0 + group * op_.b_group_stride;
        const size_t scale_row =
            static_cast<size_t>(pr.tile.expert) * (op_.b_rows / kQuantBlock) + b_row / kQuantBlock;
        ptx::cp_async_4(ptx::smem_addr(stage_b_scale(slot) + group),
                        op_.b_scale + scale_row * kq + pr.kb);
      }

      if (++pr.kb == num_kb_) {
        pr.kb = 0;
        pr.tile = sched_.next(pr.tile);
      }
    }
    ptx::cp_async_commit();
  }

  // Math role, issue: the K block in `slot` into `part` (overwritten by the first k32 step) as
  // one committed wgmma group of this warpgroup.
  __device__ __forceinline__ void issue_mma(int slot, float (&part)[Shape::kAccRegs]) const {
    const int wg = threadIdx.x / kWarpGroupThreads;
    const uint32_t a_smem = ptx::smem_addr(stage_a(slot));
    const uint32_t b_smem = ptx::smem_addr(stage_b(slot)) + wg * Shape::kBWgBytes;
    ptx::fence_operands(part);
    ptx::wgmma_fence();
#pragma unroll
    for (int ks = 0; ks < kBlockK / kWgmmaK; ++ks)
      Mma::mma(part, ptx::smem_desc_sw128(a_smem + ks * kWgmmaK),
               ptx::smem_desc_sw128(b_smem + ks * kWgmmaK), ks > 0);
    ptx::wgmma_commit();
    ptx::fence_operands(part);
  }

  // Math role, promotion: acc += part * (a_scale[row] * b_scale[warpgroup]).
  __device__ __forceinline__ void promote(int slot, const float (&part)[Shape::kAccRegs],
                                          Accum<kWgN>& acc) const {
    const int t = threadIdx.x % kWarpGroupThreads;
    const int wg = threadIdx.x / kWarpGroupThreads;
    const float* sa = stage_a_scale(slot);
    const float b_scale = stage_b_scale(slot)[wg];
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const float s = sa[(t / 32) * 16 + half * 8 + (t % 32) / 4] * b_scale;
#pragma unroll
      for (int j = 0; j < Shape::kNTiles; ++j) {
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          const int r = 4 * j + 2 * half + c;
          acc[r] = fmaf(part[r], s, acc[r]);
        }
      }
    }
  }

  uint8_t* smem_;
  GemmOperands op_;
  TileScheduler sched_;
  int num_kb_;
};

// Coordinates of a thread's accumulator elements: acc[4 * j + 2 * half + c] is CTA row
// row(half) and, within the warpgroup's kWgN B rows, column col(j, c).
struct FragCoords {
  int wg, t, lane, warp;
  __device__ FragCoords()
      : wg(threadIdx.x / kWarpGroupThreads),
        t(threadIdx.x % kWarpGroupThreads),
        lane(threadIdx.x % 32),
        warp(threadIdx.x % kWarpGroupThreads / 32) {}
  __device__ int row(int half) const { return warp * 16 + half * 8 + lane / 4; }
  __device__ int col(int j, int c) const { return j * 8 + (lane % 4) * 2 + c; }
};

}  // namespace jax_megamoe::sm90
