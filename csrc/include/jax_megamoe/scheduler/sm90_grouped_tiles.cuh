// Work decomposition shared by the grouped FP8 GEMM main loops: the operands of one grouped GEMM
// and the persistent static schedule over (row-block pair, N tile). Every role of a CTA (the
// producer and each math warpgroup) walks the same sequence, so they agree without talking.
#pragma once

#include <cstddef>
#include <cstdint>

#include "jax_megamoe/launch.h"

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

  // Row of `b` (viewed as [experts * b_rows, k]) where B group `group`'s rows of N tile `n` of
  // `expert` start; one kQuantBlock-row scale block holds all of them.
  __device__ int b_row(int expert, int n, int group) const {
    return expert * b_rows + n * b_tile_stride + group * b_group_stride;
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
  int mask;  // bit w: row block 2 * pair + w belongs to `expert`

  __device__ bool has(int block) const { return (mask >> block) & 1; }
  // One working block: both math warpgroups work on it, each on part of the columns, so a lone
  // block (small M, an expert's last rows) still keeps both issuing wgmma.
  __device__ bool lone() const { return mask == 1 || mask == 2; }
  // The row block (0 or 1 of the pair) math warpgroup wg works on.
  __device__ int block_of(int wg) const { return lone() ? mask >> 1 : wg; }
};

// Static round-robin over (row-block pair, N tile), pair-major so CTAs running side by side
// share the A tile and one expert's weights in L2. A pair whose blocks name one expert is one
// tile; a block naming -1 (padding only, past num_blocks, or never produced by a correct
// dispatch) is left out of the mask. Pools laid out by the dispatch never put two experts in one
// pair (kExpertAlignM); a caller's pool may (the standalone GEMMs accept 64-row alignment), and
// then the pair is two consecutive tiles of the same index, one per expert, each with one
// warpgroup working.
class TileScheduler {
 public:
  __device__ TileScheduler(const GemmOperands& op, int num_blocks)
      : block_expert_(op.block_expert),
        n_tiles_(op.n_tiles),
        num_blocks_(num_blocks),
        num_tiles_((num_blocks + 1) / 2 * op.n_tiles) {}

  __device__ Tile first() const { return resolve(static_cast<int>(blockIdx.x)); }
  __device__ Tile next(const Tile& t) const {
    if (t.mask == 1) {  // the second block of a pair that straddles two experts
      const int e1 = expert_of(2 * t.pair + 1);
      if (e1 >= 0 && e1 != t.expert) return {t.index, t.pair, t.n, e1, 2};
    }
    return resolve(t.index + static_cast<int>(gridDim.x));
  }
  __device__ bool done(const Tile& t) const { return t.index >= num_tiles_; }

 private:
  __device__ int expert_of(int block) const {
    return block < num_blocks_ ? block_expert_[block] : -1;
  }

  __device__ Tile resolve(int index) const {
    for (; index < num_tiles_; index += gridDim.x) {
      const int pair = index / n_tiles_;
      const int n = index - pair * n_tiles_;
      const int e0 = expert_of(2 * pair), e1 = expert_of(2 * pair + 1);
      if (e0 >= 0) return {index, pair, n, e0, 1 | (e1 == e0 ? 2 : 0)};
      if (e1 >= 0) return {index, pair, n, e1, 2};
    }
    return {num_tiles_, 0, 0, 0, 0};
  }

  const int32_t* block_expert_;
  int n_tiles_;
  int num_blocks_;
  int num_tiles_;
};

}  // namespace jax_megamoe::sm90
