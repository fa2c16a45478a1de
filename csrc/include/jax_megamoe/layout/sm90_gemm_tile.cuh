// Shared-memory tile layout of the grouped FP8 GEMMs and the accumulator fragment map of their
// math warpgroups (impls/sm90_fp8_grouped_tma_mainloop.cuh).
//
// CTA tile: kTileM (128) pool rows = a pair of row blocks of one expert, x two B groups of kWgN
// weight rows each. Two math warpgroups; warpgroup w owns row block w of the pair (64 rows) and
// multiplies it by both B groups, one wgmma m64nNk32 per k32 step and group, so one weight tile
// read from L2 feeds 128 rows. Each B group's rows are contiguous in the expert's weight matrix
// and lie inside one 128x128 scale block, so they have one weight scale per K block. L1 uses
// group 0 = gate rows, group 1 = up rows of the same 128 columns: the two values SwiGLU joins sit
// in the same thread.
#pragma once

#include <cstdint>

#include "jax_megamoe/launch.h"

namespace jax_megamoe::sm90 {

constexpr int kNumMathWarpGroups = 2;
constexpr int kNumBGroups = 2;
constexpr int kWarpGroupThreads = 128;
constexpr int kNumMathThreads = kNumMathWarpGroups * kWarpGroupThreads;
constexpr int kTileM = kNumMathWarpGroups * kBlockM;
constexpr int kBlockK = kQuantBlock;
constexpr int kWgmmaK = 32;
// wgmma's 128-byte swizzle repeats every 8 rows x 128 B: operand tiles must start 1024-aligned.
constexpr int kSwizzleAtomBytes = 1024;
// Slack for aligning the dynamic shared-memory base up to kSwizzleAtomBytes.
constexpr int kSmemAlignSlack = kSwizzleAtomBytes;
static_assert(kBlockK == 128, "one K block must be exactly one 128-byte swizzle row");
static_assert(kBlockM == 64, "one wgmma m64 covers a warpgroup's row block");
static_assert(kTileM == kExpertAlignM, "a tile's row pair must never straddle two experts");

template <int kWgN>
struct TileShape {
  static_assert(kWgN == 64 || kWgN == 128, "B group N must be a wgmma shape we instantiate");
  static constexpr int kBRows = kNumBGroups * kWgN;
  // One stage: A [128][128], B [kBRows][128] (both 128B-swizzled, 1024-aligned), then in a
  // separate region A scales [128] and B scales [kNumBGroups].
  static constexpr int kABytes = kTileM * kBlockK;
  static constexpr int kAWgBytes = kBlockM * kBlockK;  // one warpgroup's row block
  static constexpr int kBGroupBytes = kWgN * kBlockK;
  static constexpr int kBBytes = kBRows * kBlockK;
  static constexpr int kOperandBytes = kABytes + kBBytes;
  static constexpr int kScaleBytes = ((kTileM + kNumBGroups) * 4 + 127) / 128 * 128;
  static constexpr int kStageBytes = kOperandBytes + kScaleBytes;
  static constexpr int kAccRegs = kWgN / 2;  // m64nN f32 accumulator per thread
  static constexpr int kNTiles = kWgN / 8;   // n8 tiles per B group
  static_assert(kAWgBytes % kSwizzleAtomBytes == 0 && kBGroupBytes % kSwizzleAtomBytes == 0,
                "every operand tile must start on a swizzle atom");
};

// One B group's f32 accumulator of one thread, in the wgmma m64nN D layout (ptx/wgmma.cuh).
template <int kWgN>
using Accum = float[TileShape<kWgN>::kAccRegs];
// A math thread's master accumulators: one per B group.
template <int kWgN>
using TileAccum = Accum<kWgN>[kNumBGroups];

// The order of a 128-row B group's weight rows in shared memory, which is the order of the
// wgmma accumulator's columns. kAsStored: row c is the group's weight row c. kLaneRuns (L1): row c
// is weight row lane_run_row(c) = 16 (c % 8) + c / 8, so that the columns lane q of a quad holds
// in n8 tile j (8 j + 2 q + e, e = 0, 1) are output columns 32 q + 16 e + j: each lane holds two
// runs of 16 consecutive columns of its rows and stores their FP8 bytes without exchanging them
// across the quad. The TMA box reorders the rows (a 5-D view of the weights, launch/gemm.cu); the
// weights in memory stay as given, and so do their per-128-row scales (the order only permutes
// rows inside one scale block).
enum class BRowOrder { kAsStored, kLaneRuns };
// A group's 128 rows as kLaneRuns runs of kLaneRunRows: row 16 m + j is j of run m.
constexpr int kLaneRuns = 8, kLaneRunRows = 16;
static_assert(kLaneRuns * kLaneRunRows == kQuantBlock, "the runs cover one 128-row B group");
__device__ __forceinline__ int lane_run_row(int c) {
  return kLaneRunRows * (c % kLaneRuns) + c / kLaneRuns;
}

// How the two math warpgroups share the columns of a tile whose pair has one working row block:
// B group w each (L2: its columns are independent), or half w of every group (L1: gate and up
// of a column must meet in one thread).
enum class LoneSplit { kOneGroupEach, kHalfOfEachGroup };

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

// One stage of a ring whose tiles may carry a tail of kTailRows token rows (L1's swap-AB tail,
// impls/sm90_fp8_grouped_tma_mainloop.cuh): the operands, the tail's rows, the scales.
template <int kWgN, int kTailRows>
constexpr int kRingStageBytes = TileShape<kWgN>::kStageBytes + kTailRows * kBlockK;

// The stage ring in shared memory (base kSwizzleAtomBytes-aligned): kStages operand stages
// (A, B, and with kTailRows > 0 the tail's kTailRows rows, each 1024-aligned and each at a fixed
// offset from the stage's B), then kStages scale stages (A scales [128], tail scales
// [kTailRows] as if a third row block's, B scales [2]).
template <int kWgN, int kStages, int kTailRows = 0>
struct StageRing {
  using Shape = TileShape<kWgN>;
  static constexpr int kTailBytes = kTailRows * kBlockK;
  static constexpr int kOperandStride = Shape::kOperandBytes + kTailBytes;
  static constexpr int kBytes = kStages * kRingStageBytes<kWgN, kTailRows>;
  static_assert(kTailBytes % kSwizzleAtomBytes == 0, "the tail's rows: whole swizzle atoms");
  static_assert((kTileM + kNumBGroups + kTailRows) * 4 <= Shape::kScaleBytes,
                "the tail's scales must fit the scale stage");

  uint8_t* base;

  __device__ uint8_t* a(int slot) const { return base + slot * kOperandStride; }
  __device__ uint8_t* b(int slot) const { return a(slot) + Shape::kABytes; }
  // Byte offsets: of scale stage 0 from the ring's base, of a stage's B scales from its A scales.
  static constexpr int kScalesOffset = kStages * kOperandStride;
  static constexpr int kBScaleOffset = (kTileM + kTailRows) * 4;

  __device__ float* a_scale(int slot) const {
    return reinterpret_cast<float*>(base + kScalesOffset + slot * Shape::kScaleBytes);
  }
  __device__ float* b_scale(int slot) const { return a_scale(slot) + kBScaleOffset / 4; }
};

// Coordinates of a math thread's accumulator elements (math_thread in [0, kNumMathThreads)):
// acc[g][4 * j + 2 * half + c] is row row(half) of the warpgroup's row block and, within B
// group g's kWgN rows, column col(j, c).
struct FragCoords {
  int wg, t, lane, warp;
  __device__ explicit FragCoords(int math_thread)
      : wg(math_thread / kWarpGroupThreads),
        t(math_thread % kWarpGroupThreads),
        lane(math_thread % 32),
        warp(math_thread % kWarpGroupThreads / 32) {}
  __device__ int row(int half) const { return warp * 16 + half * 8 + lane / 4; }
  __device__ int col(int j, int c) const { return j * 8 + (lane % 4) * 2 + c; }
};

}  // namespace jax_megamoe::sm90
