// Shared-memory tile layout of the grouped FP8 GEMMs and the accumulator fragment map of their
// math warpgroups (impls/sm90_fp8_grouped_tma_mainloop.cuh).
//
// CTA tile: kBlockM (64) rows x 2 * kWgN B rows. Two math warpgroups; warpgroup g owns all 64
// rows and B rows [g * kWgN, +kWgN) of the tile, one wgmma m64nNk32 per k32 step. Each
// warpgroup's B rows are contiguous in the expert's weight matrix and lie inside one 128x128
// scale block, so they have one weight scale per K block. L1 uses warpgroup 0 = gate rows,
// warpgroup 1 = up rows of the same 128 columns.
#pragma once

#include <cstdint>

#include "jax_megamoe/launch.h"

namespace jax_megamoe::sm90 {

constexpr int kNumMathWarpGroups = 2;
constexpr int kWarpGroupThreads = 128;
constexpr int kNumMathThreads = kNumMathWarpGroups * kWarpGroupThreads;
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
  static constexpr int kBRows = kNumMathWarpGroups * kWgN;
  // One stage: A [64][128], B [kBRows][128] (both 128B-swizzled, 1024-aligned), then in a
  // separate region A scales [64] and B scales [kNumMathWarpGroups].
  static constexpr int kABytes = kBlockM * kBlockK;
  static constexpr int kBWgBytes = kWgN * kBlockK;
  static constexpr int kBBytes = kBRows * kBlockK;
  static constexpr int kOperandBytes = kABytes + kBBytes;
  static constexpr int kScaleBytes = ((kBlockM + kNumMathWarpGroups) * 4 + 127) / 128 * 128;
  static constexpr int kStageBytes = kOperandBytes + kScaleBytes;
  static constexpr int kAccRegs = kWgN / 2;  // m64nN f32 accumulator per thread
  static constexpr int kNTiles = kWgN / 8;   // n8 tiles per warpgroup
  static_assert(kABytes % kSwizzleAtomBytes == 0 && kBWgBytes % kSwizzleAtomBytes == 0,
                "every operand tile must start on a swizzle atom");
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

// The stage ring in shared memory (base kSwizzleAtomBytes-aligned): kStages operand stages
// (A then B, each 1024-aligned), then kStages scale stages (A scales [64], B scales [2]).
template <int kWgN, int kStages>
struct StageRing {
  using Shape = TileShape<kWgN>;
  static constexpr int kBytes = kStages * Shape::kStageBytes;

  uint8_t* base;

  __device__ uint8_t* a(int slot) const { return base + slot * Shape::kOperandBytes; }
  __device__ uint8_t* b(int slot) const { return a(slot) + Shape::kABytes; }
  __device__ float* a_scale(int slot) const {
    return reinterpret_cast<float*>(base + kStages * Shape::kOperandBytes +
                                    slot * Shape::kScaleBytes);
  }
  __device__ float* b_scale(int slot) const { return a_scale(slot) + kBlockM; }
};

// Coordinates of a math thread's accumulator elements (math_thread in [0, kNumMathThreads)):
// acc[4 * j + 2 * half + c] is CTA row row(half) and, within the warpgroup's kWgN B rows,
// column col(j, c).
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

// Hardware barrier 1 over the math warpgroups only (never the producer warp of the TMA main
// loop): the epilogues' exchanges through shared memory.
constexpr int kMathBarrierId = 1;

}  // namespace jax_megamoe::sm90
