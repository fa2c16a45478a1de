// Grouped FP8 GEMM main loop on cp.async, all threads in lockstep (the first wgmma version, kept
// as the reference point for the TMA main loop): a persistent CTA walks (row block, N tile)
// pairs (scheduler/sm90_grouped_tiles.cuh); every K block of 128 (= one scale block) is a
// cp.async stage in a shared-memory ring, multiplied by wgmma e4m3 and promoted into the f32
// master accumulator (impls/sm90_fp8_grouped_math.cuh). Tile layout: layout/sm90_gemm_tile.cuh.
//
// Per K block, all threads: wait for the stage's cp.async groups, fence them into the async
// proxy, barrier; issue the stage's four wgmma; while they run, issue the loads of stage
// i + kStages - 1 into the slot consumed in the previous step; wait for the wgmma; promote.
// After a tile's last K block the epilogue runs while the next tile's first stages load.
#pragma once

#include <cstdint>

#include "jax_megamoe/impls/sm90_fp8_grouped_math.cuh"
#include "jax_megamoe/layout/sm90_gemm_tile.cuh"
#include "jax_megamoe/ptx/cp_async.cuh"
#include "jax_megamoe/scheduler/sm90_grouped_tiles.cuh"

namespace jax_megamoe::sm90 {

// Every thread is a math thread and loads its share of each stage.
constexpr int kNumThreads = kNumMathThreads;

template <int kWgN, int kStages>
class GroupedFp8Mainloop {
  using Shape = TileShape<kWgN>;
  using Ring = StageRing<kWgN, kStages>;
  static_assert(kStages >= 2, "the ring needs one stage in flight while another is consumed");
  static_assert(Shape::kABytes / 16 % kNumThreads == 0, "A chunks must split evenly");
  static_assert(Shape::kBBytes / 16 % kNumThreads == 0, "B chunks must split evenly");
  static_assert(kBlockM + kNumMathWarpGroups <= kNumThreads, "one thread per scale copy");

 public:
  static constexpr int kSmemBytes = Ring::kBytes;

  // `smem` must be kSwizzleAtomBytes-aligned (align_smem).
  __device__ GroupedFp8Mainloop(uint8_t* smem, const GemmOperands& op, int num_blocks)
      : ring_{smem}, op_(op), sched_(op, num_blocks), num_kb_(op.k / kBlockK) {}

  // Runs every tile of this CTA; epilogue(tile, acc, thread) is called by all threads after the
  // tile's last K block, while the next tile's first stages are already loading.
  template <class Epilogue>
  __device__ __forceinline__ void run(Epilogue&& epilogue) {
    Producer producer{sched_.first(), 0};
    for (int s = 0; s < kStages - 1; ++s) produce(producer, s);

    const int wg = threadIdx.x / kWarpGroupThreads;
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
        issue_block_mma<kWgN>(ptx::smem_addr(ring_.a(slot)),
                              ptx::smem_addr(ring_.b(slot)) + wg * Shape::kBWgBytes, part);
        produce(producer, slot == 0 ? kStages - 1 : slot - 1);
        ptx::wgmma_wait<0>();
        ptx::fence_operands(part);
        promote<kWgN>(load_row_scales(ring_.a_scale(slot), ring_.b_scale(slot)[wg],
                                      threadIdx.x % kWarpGroupThreads),
                      part, acc);
        slot = slot == kStages - 1 ? 0 : slot + 1;
      }
      epilogue(tile, acc, static_cast<int>(threadIdx.x));
    }
  }

 private:
  struct Producer {
    Tile tile;
    int kb;
  };

  // Producer role: one K block of the CTA's load stream into `slot`. Always commits a group
  // (possibly empty) so cp_async_wait<kStages - 2> counts stages, not copies.
  __device__ __forceinline__ void produce(Producer& pr, int slot) {
    if (!sched_.done(pr.tile)) {
      const int tid = threadIdx.x;
      const size_t row0 = static_cast<size_t>(pr.tile.block) * kBlockM;
      const size_t k0 = static_cast<size_t>(pr.kb) * kBlockK;

      const uint32_t a_smem = ptx::smem_addr(ring_.a(slot));
#pragma unroll
      for (int i = 0; i < Shape::kABytes / 16 / kNumThreads; ++i) {
        const int idx = tid + i * kNumThreads;
        const int row = idx / 8, chunk = idx % 8;
        ptx::cp_async_16(a_smem + swizzle_128(row, chunk),
                         op_.a + (row0 + row) * op_.k + k0 + chunk * 16);
      }

      const uint8_t* b_tile = op_.b + size_t(op_.b_row(pr.tile.expert, pr.tile.n, 0)) * op_.k + k0;
      const uint32_t b_smem = ptx::smem_addr(ring_.b(slot));
#pragma unroll
      for (int i = 0; i < Shape::kBBytes / 16 / kNumThreads; ++i) {
        const int idx = tid + i * kNumThreads;
        const int row = idx / 8, chunk = idx % 8;
        const int b_row = (row / kWgN) * op_.b_group_stride + row % kWgN;  // within the tile
        ptx::cp_async_16(b_smem + swizzle_128(row, chunk),
                         b_tile + static_cast<size_t>(b_row) * op_.k + chunk * 16);
      }

      if (tid < kBlockM) {
        ptx::cp_async_4(ptx::smem_addr(ring_.a_scale(slot) + tid),
                        op_.a_scale_at(row0 + tid, pr.kb));
      } else if (tid < kBlockM + kNumMathWarpGroups) {
        const int group = tid - kBlockM;
        ptx::cp_async_4(ptx::smem_addr(ring_.b_scale(slot) + group),
                        op_.b_scale_at(pr.tile.expert, pr.tile.n, group, pr.kb));
      }

      if (++pr.kb == num_kb_) {
        pr.kb = 0;
        pr.tile = sched_.next(pr.tile);
      }
    }
    ptx::cp_async_commit();
  }

  Ring ring_;
  GemmOperands op_;
  TileScheduler sched_;
  int num_kb_;
};

}  // namespace jax_megamoe::sm90
