// Shared main loop of the L1/L2 grouped FP8 GEMMs: a persistent CTA walks (row block, N tile)
// pairs; every K block of 128 (= one scale block) is a cp.async stage in a shared-memory ring,
// multiplied on the tensor cores (ptx/mma.cuh: e4m3 unpacked to f16, exact) into a per-stage f32
// accumulator, then promoted into the f32 master accumulator with a_scale x b_scale, which change
// every 128 K.
//
// CTA tile: kBlockM (64) rows x kNumGroups * 128 B rows. Each group of 128 B rows is contiguous
// in the expert's weight matrix and lies inside one 128x128 scale block, so it has one weight
// scale per K block. L1 uses group 0 = gate rows, group 1 = up rows of the same columns.
//
// Threads: 8 warps as 2 (M) x 4 (N). Warp (wm, wn) owns rows [32 wm, +32) and, in every group,
// B rows [32 wn, +32): the gate and up values of one output column land in the same thread.
// Roles, in order per step: producer (issue stage i + kStages - 1), math (stage i), and after a
// tile's last K block the epilogue; all warps take every role.
#pragma once

#include <cstdint>

#include "jax_megamoe/launch.h"
#include "jax_megamoe/ptx/cp_async.cuh"
#include "jax_megamoe/ptx/ldmatrix.cuh"
#include "jax_megamoe/ptx/mma.cuh"

namespace jax_megamoe::sm90 {

constexpr int kNumThreads = 256;
constexpr int kBlockK = kQuantBlock;
constexpr int kGroupRows = kQuantBlock;
constexpr int kWarpsM = 2;
constexpr int kWarpsN = 4;
constexpr int kWarpRows = kBlockM / kWarpsM;          // 32
constexpr int kWarpMTiles = kWarpRows / 16;           // m16 tiles per warp
constexpr int kWarpGroupCols = kGroupRows / kWarpsN;  // 32 B rows of each group per warp
constexpr int kWarpGroupNTiles = kWarpGroupCols / 8;  // n8 tiles per group per warp
static_assert(kWarpsM * kWarpsN * 32 == kNumThreads, "warp grid must cover the CTA");
static_assert(kBlockK == 128, "a 128-byte K row is what the 16-byte-chunk XOR swizzle assumes");
static_assert(kWarpRows % 16 == 0 && kWarpGroupCols % 16 == 0,
              "an ldmatrix.x4 covers 16 rows: one m16 tile of A, two n8 tiles of one B group");

template <int kNumGroups>
struct TileShape {
  static constexpr int kBRows = kNumGroups * kGroupRows;
  static constexpr int kNTiles = kNumGroups * kWarpGroupNTiles;  // n8 tiles per warp
  // One stage: A [64][128], B [kBRows][128] (both XOR-swizzled), A scales [64], B scales [G].
  static constexpr int kABytes = kBlockM * kBlockK;
  static constexpr int kBBytes = kBRows * kBlockK;
  static constexpr int kScaleBytes = ((kBlockM + kNumGroups) * 4 + 127) / 128 * 128;
  static constexpr int kStageBytes = kABytes + kBBytes + kScaleBytes;
  static_assert(kBlockM * kBlockK / 16 % kNumThreads == 0, "A chunks must split evenly");
  static_assert(kBRows * kBlockK / 16 % kNumThreads == 0, "B chunks must split evenly");
  static_assert(kBlockM + kNumGroups <= kNumThreads, "one thread per scale copy");
};

// Master accumulator of one thread: [m16 tile][n8 tile][mma D fragment].
template <int kNumGroups>
using Accum = float[kWarpMTiles][TileShape<kNumGroups>::kNTiles][4];

// Byte offset of 16-byte chunk `chunk` of row `row` in a [rows][128] tile. XOR-ing the chunk with
// row % 8 spreads the 8 rows an ldmatrix phase reads over all 32 banks (it is also the TMA
// 128B-swizzle pattern, so a later TMA producer keeps the consumer unchanged).
__device__ __forceinline__ uint32_t swizzle_128(int row, int chunk) {
  return static_cast<uint32_t>(row * 128 + ((chunk ^ (row & 7)) << 4));
}

struct GemmOperands {
  const uint8_t* a;             // [pool_rows, k]
  const float* a_scale;         // [pool_rows, k / 128]
  const uint8_t* b;             // [experts, b_rows, k]
  const float* b_scale;         // [experts, b_rows / 128, k / 128]
  const int32_t* block_expert;  // [max_blocks]
  int k;
  int b_rows;
  // B row of group g of N tile n: n * b_tile_stride + g * b_group_stride.
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

template <int kNumGroups, int kStages>
class GroupedFp8Mainloop {
  using Shape = TileShape<kNumGroups>;
  static_assert(kStages >= 2, "the ring needs one stage in flight while another is consumed");

 public:
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
      Accum<kNumGroups> acc;
#pragma unroll
      for (int mt = 0; mt < kWarpMTiles; ++mt)
#pragma unroll
        for (int nt = 0; nt < Shape::kNTiles; ++nt)
#pragma unroll
          for (int i = 0; i < 4; ++i) acc[mt][nt][i] = 0.f;

      for (int kb = 0; kb < num_kb_; ++kb) {
        ptx::cp_async_wait<kStages - 2>();
        // Makes stage `slot` visible to all warps, and retires every read of the slot the
        // producer refills next (it was consumed in the previous step).
        __syncthreads();
        produce(producer, slot == 0 ? kStages - 1 : slot - 1);
        math(slot, acc);
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

  __device__ uint8_t* stage_a(int slot) const { return smem_ + slot * Shape::kStageBytes; }
  __device__ uint8_t* stage_b(int slot) const { return stage_a(slot) + Shape::kABytes; }
  __device__ float* stage_a_scale(int slot) const {
    return reinterpret_cast<float*>(stage_b(slot) + Shape::kBBytes);
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
        const int group = row / kGroupRows;
        const int b_row = b_row0 + group * op_.b_group_stride + row % kGroupRows;
        ptx::cp_async_16(b_smem + swizzle_128(row, chunk),
                         b_expert + static_cast<size_t>(b_row) * op_.k + k0 + chunk * 16);
      }

      if (tid < kBlockM) {
        ptx::cp_async_4(ptx::smem_addr(stage_a_scale(slot) + tid),
                        op_.a_scale + (row0 + tid) * kq + pr.kb);
      } else if (tid < kBlockM + kNumGroups) {
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

  // Math role: the K block in `slot` into a fresh f32 accumulator, then promotion into `acc`.
  __device__ __forceinline__ void math(int slot, Accum<kNumGroups>& acc) const {
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const int wm = warp / kWarpsN, wn = warp % kWarpsN;
    // ldmatrix.x4 row-address lanes: A matrices are (rows 0-7 | 8-15) x (k 0-15 | 16-31) in the
    // order a0..a3; B matrices are (k 0-15 | 16-31) x (n tile 2p | 2p+1) in the order
    // b[2p][0], b[2p][1], b[2p+1][0], b[2p+1][1].
    const int a_row = wm * kWarpRows + lane % 8 + ((lane / 8) % 2) * 8;
    const int a_khalf = lane / 16;
    const int b_row = wn * kWarpGroupCols + lane % 8 + (lane / 16) * 8;
    const int b_khalf = (lane / 8) % 2;
    const uint32_t a_smem = ptx::smem_addr(stage_a(slot));
    const uint32_t b_smem = ptx::smem_addr(stage_b(slot));

    float part[kWarpMTiles][Shape::kNTiles][4];
#pragma unroll
    for (int mt = 0; mt < kWarpMTiles; ++mt)
#pragma unroll
      for (int nt = 0; nt < Shape::kNTiles; ++nt)
#pragma unroll
        for (int i = 0; i < 4; ++i) part[mt][nt][i] = 0.f;

#pragma unroll
    for (int ks = 0; ks < kBlockK / 32; ++ks) {
      uint32_t a[kWarpMTiles][4];
#pragma unroll
      for (int mt = 0; mt < kWarpMTiles; ++mt)
        ptx::ldmatrix_x4(a_smem + swizzle_128(a_row + mt * 16, ks * 2 + a_khalf), a[mt]);
      uint32_t b[Shape::kNTiles][2];
#pragma unroll
      for (int p = 0; p < Shape::kNTiles / 2; ++p) {
        const int row = (2 * p / kWarpGroupNTiles) * kGroupRows + (2 * p % kWarpGroupNTiles) * 8;
        uint32_t r[4];
        ptx::ldmatrix_x4(b_smem + swizzle_128(b_row + row, ks * 2 + b_khalf), r);
        b[2 * p][0] = r[0];
        b[2 * p][1] = r[1];
        b[2 * p + 1][0] = r[2];
        b[2 * p + 1][1] = r[3];
      }
#pragma unroll
      for (int mt = 0; mt < kWarpMTiles; ++mt) {
        const ptx::E4m3FragA fa(a[mt]);
#pragma unroll
        for (int nt = 0; nt < Shape::kNTiles; ++nt)
          ptx::mma_k32_e4m3(part[mt][nt], fa, ptx::E4m3FragB(b[nt]));
      }
    }

    const float* sa = stage_a_scale(slot);
    const float* sb = stage_b_scale(slot);
    float b_scale[kNumGroups];
#pragma unroll
    for (int g = 0; g < kNumGroups; ++g) b_scale[g] = sb[g];
#pragma unroll
    for (int mt = 0; mt < kWarpMTiles; ++mt) {
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const float a_scale = sa[wm * kWarpRows + mt * 16 + half * 8 + lane / 4];
#pragma unroll
        for (int nt = 0; nt < Shape::kNTiles; ++nt) {
          const float s = a_scale * b_scale[nt / kWarpGroupNTiles];
          acc[mt][nt][half * 2] = fmaf(part[mt][nt][half * 2], s, acc[mt][nt][half * 2]);
          acc[mt][nt][half * 2 + 1] =
              fmaf(part[mt][nt][half * 2 + 1], s, acc[mt][nt][half * 2 + 1]);
        }
      }
    }
  }

  uint8_t* smem_;
  GemmOperands op_;
  TileScheduler sched_;
  int num_kb_;
};

// Coordinates of a thread's accumulator elements: acc[mt][nt][half * 2 + i] is CTA row
// row(mt, half) and, within group nt / kWarpGroupNTiles, column col(nt, i).
struct FragCoords {
  int lane, wm, wn;
  __device__ FragCoords()
      : lane(threadIdx.x % 32), wm(threadIdx.x / 32 / kWarpsN), wn(threadIdx.x / 32 % kWarpsN) {}
  __device__ int row(int mt, int half) const {
    return wm * kWarpRows + mt * 16 + half * 8 + lane / 4;
  }
  __device__ int col(int nt, int i) const {
    return wn * kWarpGroupCols + (nt % kWarpGroupNTiles) * 8 + (lane % 4) * 2 + i;
  }
};

}  // namespace jax_megamoe::sm90
