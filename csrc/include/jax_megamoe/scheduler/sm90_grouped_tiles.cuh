// Work decomposition shared by the grouped FP8 GEMM main loops: the operands of one grouped GEMM
// and the persistent schedule over (row-block pair, N tile), claimed from a counter or static.
// A CTA's producer warp takes the tiles and hands each to the math warpgroups with the stage of
// its first K block (impls/sm90_fp8_grouped_tma_mainloop.cuh).
#pragma once

#include <cuda.h>

#include <cstddef>
#include <cstdint>

#include "jax_megamoe/launch.h"
#include "jax_megamoe/ptx/shared.cuh"

namespace jax_megamoe::sm90 {

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
  // Null, or per row block a count that reaches a_ready_count (twice that for a block that
  // works alone in its pair) once the block's A rows have been written by an earlier kernel
  // still running beside this one; the producer waits for it before the tile's first loads.
  const int32_t* a_ready;
  int a_ready_count;
  // 0, or the rows of a swap-AB tail (L1; with a_ready null): a row block that works alone in
  // its pair, is its expert's last and follows a full pair of the same expert, and whose valid
  // rows (row_src >= 0) all lie in its first tail_rows rows, rides along with that pair's tiles
  // (Tile::tail) instead of being tiles of its own.
  int tail_rows;
  const int32_t* row_src;  // [pool rows], read only when tail_rows > 0 or A is gathered
  // Null, or A gathered from the tokens' own rows (GroupedFp8TmaMainloop's kGatherA, one rank):
  // pool row r is token row_src[r] / a_src_div of a_src [tokens, k] e4m3, whose scales are
  // a_src_scale [tokens, k / 128]; `a` and `a_scale` are not read, and a padding row (row_src
  // -1) reads as zeros.
  const uint8_t* a_src = nullptr;
  const float* a_src_scale = nullptr;
  int a_src_div = 1;
  // With claimed tiles: how many of the last pairs are claimed in order of cost (at most
  // TileScheduler::kMaxSortedPairs; 0 keeps the pool's order to the end).
  int sorted_pairs = 0;

  // With A gathered: the token row of a_src that pool row `row` reads, or -1 (padding).
  __device__ int gathered_token(int row) const {
    const int src = row_src[row];
    return src < 0 ? -1 : src / a_src_div;
  }
  // Row of `b` (viewed as [experts * b_rows, k]) where B group `group`'s rows of N tile `n` of
  // `expert` start; one kQuantBlock-row scale block holds all of them.
  __device__ int b_row(int expert, int n, int group) const {
    return expert * b_rows + n * b_tile_stride + group * b_group_stride;
  }
  // Where N tile n of `expert` starts in the 3-D view of `b` that the B tensor map takes:
  // [experts * b_rows / b_group_stride][b_group_stride][k], so that one box of two along the
  // outer dimension holds both B groups (group 1 is b_group_stride rows after group 0).
  struct BCoords {
    int row, outer;
  };
  __device__ BCoords b_coords(int expert, int n) const {
    const int row = b_row(expert, n, 0);
    return {row % b_group_stride, row / b_group_stride};
  }
  // The weight scale of those rows for K block kb.
  __device__ const float* b_scale_at(int expert, int n, int group, int kb) const {
    return b_scale +
           static_cast<size_t>(b_row(expert, n, group) / kQuantBlock) * (k / kQuantBlock) + kb;
  }
  // The activation scale of pool row `row` for K block kb.
  __device__ const float* a_scale_at(size_t row, int kb) const {
    return a_scale + row * (k / kQuantBlock) + kb;
  }
};

struct Tile {
  int index;  // >= num_tiles: this CTA is done
  int pair;   // row blocks 2 * pair (math warpgroup 0) and 2 * pair + 1 (warpgroup 1)
  int n;
  int expert;
  // Bit w < 2: row block 2 * pair + w belongs to `expert`. Bit 2 (kTailBit, with both others):
  // row block 2 * pair + 2 rides along as the tail (GemmOperands::tail_rows).
  int mask;

  static constexpr int kTailBit = 4;
  __device__ bool has(int block) const { return (mask >> block) & 1; }
  __device__ bool tail() const { return mask & kTailBit; }
  // One working block: both math warpgroups work on it, each on part of the columns, so a lone
  // block (small M, an expert's last rows) still keeps both issuing wgmma.
  __device__ bool lone() const { return mask == 1 || mask == 2; }
  // The row block (0 or 1 of the pair) math warpgroup wg works on.
  __device__ int block_of(int wg) const { return lone() ? mask >> 1 : wg; }
  // The first pool row of that row block.
  __device__ int first_row(int wg) const { return (2 * pair + block_of(wg)) * kBlockM; }
};

// Tiles in (row-block pair, N tile) order, pair-major so CTAs running side by side
// share the A tile and one expert's weights in L2. A pair whose blocks name one expert is one
// tile; a block naming -1 (padding only, past num_blocks, or never produced by a correct
// dispatch) is left out of the mask. Pools laid out by the dispatch never put two experts in one
// pair (kExpertAlignM); a caller's pool may (the standalone GEMMs accept 64-row alignment), and
// then the pair is two consecutive tiles of the same index, one per expert, each with one
// warpgroup working.
//
// A tail (GemmOperands::tail_rows) is decided from the pool alone, the same way for the tile it
// rides with (bit 2 of its mask) and for the pair it leaves (that block is left out of the
// mask), so every block is computed exactly once. The test is warp-collective: every entry
// point is called by all 32 lanes of the producer warp.
//
// Claimed tiles (a counter given, the default; csrc/launch/gemm.cu): instead of walking index,
// index + gridDim.x, ... (the static order: first/next), each CTA's producer warp takes the next
// index from a device counter that is zero at launch (claim/take). The tiles running at any
// moment are then consecutive however far the CTAs have drifted apart (a lone tile takes half a
// pair's time), so the CTAs that share an A pair or a weight tile read it from L2 at nearly the
// same time. Every tile is still computed whole by one CTA, so the output does not depend on
// which CTA took it.
//
// The grid's end: the CTAs finish their last tiles at different times, and they idle, on average,
// about half a tile. So the last GemmOperands::sorted_pairs pairs are claimed most expensive
// first (a pair carrying a tail, ~1.5 of a full pair's time; full pairs; a lone block, ~0.77;
// none), and the grid ends on the cheapest tiles. The order is a permutation of those pairs,
// the same in every CTA (each computes it from the pool, the first time it claims one of them,
// into the shared-memory record at order_at), so each tile is still claimed once. With it L1
// ran 0.4-0.7 % faster at M = 2048 on one H100, a quarter of what a simulation of the claims on
// bench_gemm.py's pools had promised, and on one H200 at the power cap 1.3 % faster at 2048 and
// 0.6 % at 8192, where L2 ran 0.5 % slower at 2048 (benchmarks/RESULTS.md 2026-12-05); M <= 512
// unchanged.
class TileScheduler {
 public:
  // One lane of the producer warp per sorted pair; the order is kept as one byte per pair.
  static constexpr int kMaxSortedPairs = 16;
  // The order record: a word that is nonzero once the order is written, then the pairs' bytes.
  static constexpr int kOrderBytes = 4 + kMaxSortedPairs;

  // order_at: the shared-memory address of the order record (kOrderBytes), zeroed before the
  // first take(); only take() reads or writes it.
  __device__ TileScheduler(const GemmOperands& op, int num_blocks, uint32_t order_at)
      : block_expert_(op.block_expert),
        row_src_(op.row_src),
        tail_rows_(op.tail_rows),
        n_tiles_(op.n_tiles),
        num_blocks_(num_blocks),
        num_tiles_((num_blocks + 1) / 2 * op.n_tiles),
        sorted_first_(max(0, (num_blocks + 1) / 2 - min(op.sorted_pairs, kMaxSortedPairs))),
        order_at_(order_at) {}

  __device__ Tile first() const { return resolve(static_cast<int>(blockIdx.x)); }
  __device__ Tile next(const Tile& t) const {
    const Tile second = straddle(t);
    return second.mask != 0 ? second : resolve(t.index + grid_size());
  }
  __device__ bool done(const Tile& t) const { return t.index >= num_tiles_; }
  __device__ Tile done_tile() const { return {num_tiles_, 0, 0, 0, 0}; }

  // Claimed tiles; called by all 32 lanes of the producer warp. claim() takes an index and
  // returns it in lane 0 only, take(claimed) resolves it, claiming again past pairs where no block
  // works. The index is compared unsigned: a counter that was not zero at launch and has passed
  // 2^31 reads as negative, and must end the CTA's tiles, not name a block before the table.
  __device__ int claim(int* claims, int lane) const { return lane == 0 ? atomicAdd(claims, 1) : 0; }
  __device__ Tile take(int claimed, int* claims, int lane) const {
    for (int index = __shfl_sync(~0u, claimed, 0); unsigned(index) < unsigned(num_tiles_);
         index = __shfl_sync(~0u, claim(claims, lane), 0)) {
      const int pair = index / n_tiles_;
      const Tile t = resolve_at(index, claimed_pair(pair, lane), index - pair * n_tiles_);
      if (t.mask != 0) return t;
    }
    return done_tile();
  }
  // The second tile of a pair that straddles two experts (same index), or mask 0.
  __device__ Tile straddle(const Tile& t) const {
    if (t.mask == 1) {
      const int e1 = expert_of(2 * t.pair + 1);
      if (e1 >= 0 && e1 != t.expert) return {t.index, t.pair, t.n, e1, 2};
    }
    return {t.index, t.pair, t.n, 0, 0};
  }

 private:
  // gridDim.x, read where it is used: otherwise ptxas held it from the kernel's start and, at the
  // producer's 40 registers, spilled it.
  __device__ static int grid_size() {
    int n;
    asm volatile("mov.u32 %0, %%nctaid.x;" : "=r"(n));
    return n;
  }

  __device__ int expert_of(int block) const {
    return block < num_blocks_ ? block_expert_[block] : -1;
  }

  // Whether row block b (the first of its pair) of expert e rides along with the pair before it.
  __device__ bool rides(int b, int e) const {
    if (tail_rows_ == 0 || b < 2 || expert_of(b) != e || expert_of(b + 1) == e ||
        expert_of(b - 1) != e || expert_of(b - 2) != e)
      return false;
    bool late = false;  // a valid row past the tail's rows
#pragma unroll
    for (int r = static_cast<int>(threadIdx.x % 32); r < kBlockM; r += 32)
      late |= r >= tail_rows_ && row_src_[static_cast<size_t>(b) * kBlockM + r] >= 0;
    return !__any_sync(0xffffffffu, late);
  }

  // The pair that claimed pair position `pos` names: itself, or among the last pairs the one of
  // the cost order (the class comment), which the first call there writes. All 32 lanes call it.
  __device__ int claimed_pair(int pos, int lane) const {
    if (pos < sorted_first_) return pos;
    if (ptx::ld_shared_s32(order_at_) == 0) sort_last_pairs(lane);
    return sorted_first_ + ptx::ld_shared_u8(order_at_ + 4 + (pos - sorted_first_));
  }

  // Writes the order of the pairs from sorted_first_ on: lane i classes pair sorted_first_ + i
  // (0: full, carrying a tail; 1: full; 2: one working block; 3: none) and takes the place after
  // every lane of a lower class and every lower lane of its own (a stable sort). A CTA does this
  // once, at its first claim there (at its start when the pool has at most kMaxSortedPairs
  // pairs): its loads are independent, so it costs about one trip to L2.
  __device__ void sort_last_pairs(int lane) const {
    const int b = 2 * (sorted_first_ + lane);  // the pair's first row block
    int cls = 4;                               // past the pool: no place
    if (b < num_blocks_) {
      const int e0 = expert_of(b), e1 = expert_of(b + 1), e2 = expert_of(b + 2),
                e3 = expert_of(b + 3);
      // Whether block b + 2 probably rides along with this pair (rides() decides, over all its
      // rows and the whole warp): only the row after the tail's is read, as the dispatch fills a
      // block's rows from its first. For the order alone.
      const bool late_row = tail_rows_ > 0 && b + 2 < num_blocks_ &&
                            row_src_[static_cast<size_t>(b + 2) * kBlockM + tail_rows_] >= 0;
      const bool tail = tail_rows_ > 0 && e2 >= 0 && e2 == e0 && e3 != e0 && !late_row;
      if (e0 >= 0 && e1 == e0) {
        cls = tail ? 0 : 1;
      } else {
        cls = e0 >= 0 || e1 >= 0 ? 2 : 3;
      }
    }
    int place = 0;
    for (int c = 0; c < 4; ++c) {
      const unsigned in_class = __ballot_sync(0xffffffffu, cls == c);
      place += __popc(c < cls ? in_class : c == cls ? in_class & ((1u << lane) - 1) : 0u);
    }
    if (cls < 4) ptx::st_shared_u8(order_at_ + 4 + place, lane);
    __syncwarp();
    if (lane == 0) ptx::st_shared(order_at_, 1);
    __syncwarp();
  }

  // The tile at `index`; mask 0 when neither of its blocks works.
  __device__ Tile resolve_at(int index) const {
    const int pair = index / n_tiles_;
    return resolve_at(index, pair, index - pair * n_tiles_);
  }
  // The tile at `index` when it names N tile n of `pair`.
  __device__ Tile resolve_at(int index, int pair, int n) const {
    int e0 = expert_of(2 * pair);
    const int e1 = expert_of(2 * pair + 1);
    if (e0 >= 0 && e1 == e0)
      return {index, pair, n, e0, 3 | (rides(2 * pair + 2, e0) ? Tile::kTailBit : 0)};
    if (e0 >= 0 && rides(2 * pair, e0)) e0 = -1;  // computed by the pair before it
    if (e0 >= 0) return {index, pair, n, e0, 1};
    if (e1 >= 0) return {index, pair, n, e1, 2};
    return {index, pair, n, 0, 0};
  }
  __device__ Tile resolve(int index) const {
    for (; index < num_tiles_; index += grid_size()) {
      const Tile t = resolve_at(index);
      if (t.mask != 0) return t;
    }
    return done_tile();
  }

  const int32_t* block_expert_;
  const int32_t* row_src_;
  int tail_rows_;
  int n_tiles_;
  int num_blocks_;
  int num_tiles_;
  int sorted_first_;  // the first pair claimed in the cost order
  uint32_t order_at_;
};

}  // namespace jax_megamoe::sm90
