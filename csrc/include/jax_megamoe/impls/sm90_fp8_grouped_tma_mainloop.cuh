// Warp-specialized grouped FP8 GEMM main loop: TMA loads into a shared-memory ring guarded by
// full/empty mbarriers, two math warpgroups that never meet at a CTA-wide barrier inside the K
// loop. Tile layout in layout/sm90_gemm_tile.cuh, schedule in scheduler/sm90_grouped_tiles.cuh,
// the per-K-block math in impls/sm90_fp8_grouped_math.cuh.
//
// Roles (384 threads):
//   warpgroup 0, producer   setmaxnreg down to kProducerRegs; warp 0 takes the CTA's tiles
//                           (claimed from a counter, or a static sequence: scheduler/) and walks
//                           their K blocks: waits until the slot is empty, then lane 0 writes the
//                           tile into the stage's slot and arrives on the stage's desc barrier,
//                           announces the stage's bytes and issues the TMA loads of A (the
//                           working row blocks' 64 pool rows each) and of the two B groups.
//                           Warp kScaleWarp, the scale warp, waits for each stage's desc
//                           barrier, reads the tile, and its 32 lanes cp.async the activation
//                           scales of the working row blocks and the 2 weight scales and arrive
//                           on the slot's full barrier when those land. After the last tile, one
//                           stage carries only the end. Warps 1 .. Epilogue::kStoreWarps run the
//                           epilogue's store role (epilogue.store(warp - 1)); the others exit.
//                           With kGatherA (one rank: A read from the tokens' rows, not from a
//                           pool copy of them), warps 1 .. kGatherWarps, the gather warps, copy
//                           the stage's A rows instead of A's TMA loads (below), and the scale
//                           warp takes the rows' scales from the tokens' scales.
//   warpgroups 1-2, math    setmaxnreg up to kMathRegs; read each tile from the slot of its first
//                           stage; warpgroup w takes row block w of the pair. Per K block: per
//                           B group, four wgmma into a partial, wait for them, promote into the
//                           group's master accumulator; release the slot (one arrival per warp)
//                           once its last shared-memory read is done; then wait for the next
//                           K block's full barrier. Each tile kind has its own K loop, so the
//                           loop holds no branch but its end and the wait's retry. A paired
//                           tile may carry a tail (kTailRows > 0, L1): the next row block's
//                           first kTailRows rows, computed swap-AB from the same weight tile
//                           (below). When only one block of the pair works (a lone block:
//                           small M, an expert's last rows), both warpgroups work on it,
//                           splitting the columns as the epilogue asks (Epilogue::kLoneSplit):
//                           a whole B group each, or half of every group. The epilogue follows
//                           a tile's last K block. The two warpgroups drift independently, so
//                           one's promotion overlaps the other's wgmma.
//
// Barrier counts: full[s] completes on 1 (the producer's expect_tx arrival) + 32 (the scale
// warp's cp.async arrivals) (+ 64, the gather warps', with kGatherA) arrivals and the stage's TMA
// bytes; empty[s] on one arrival per math warp; desc[s] on the producer's one arrival. Phases
// alternate per pass over the ring; the producer's first pass waits on parity 1, which a fresh
// barrier reports as complete. A math warp arrives on empty[s] only after its wait on full[s] of
// the same pass, so no warp can arrive twice in one phase; the producer rewrites a slot's tile
// only after that slot's empty phase, which needs the scale warp's (and the gather warps')
// arrivals, so they have read it. The end's stage completes on 33 arrivals (the producer's lane
// 0 and the scale warp's 32; with kGatherA 64 more, the gather warps' lanes) and no bytes;
// nobody releases it.
//
// Gathered A (kGatherA): at one rank a pool row is a copy of a token's row, so L1 can read the
// token's row of x instead and the route phase writes no row (at M = 2048, 117 MB of writes and
// as many reads). No TMA box can name a pair's 128 scattered rows (and a box of one row would
// start inside the 128-byte swizzle's 1024-byte period), so the gather warps copy them with
// 16-byte cp.async, each warp-wide copy 4 rows x 128 B of one K block, applying the swizzle by
// hand; a padding row is zero-filled and reads nothing. Those copies are generic-proxy writes
// that the wgmma read through the async proxy: each math thread fences the proxies once a stage
// has landed (StageAddrs::view). Two warps keep up with tiles of a few rows, not with full ones,
// so the runtime gathers only at small M (kGatherRowsPerExpert).
#pragma once

#include <cuda.h>

#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "jax_megamoe/impls/sm90_fp8_grouped_math.cuh"
#include "jax_megamoe/layout/sm90_gemm_tile.cuh"
#include "jax_megamoe/ptx/cp_async.cuh"
#include "jax_megamoe/ptx/dependent_launch.cuh"
#include "jax_megamoe/ptx/mbarrier.cuh"
#include "jax_megamoe/ptx/shared.cuh"
#include "jax_megamoe/ptx/store.cuh"
#include "jax_megamoe/ptx/warpgroup.cuh"
#include "jax_megamoe/scheduler/sm90_grouped_tiles.cuh"

namespace jax_megamoe::sm90 {

constexpr int kNumThreads = kWarpGroupThreads + kNumMathThreads;

// The handshake of each math warpgroup with its store warp (epilogue.store, Epilogue::kStoreWarps
// > 0), kBytes per warpgroup from shared address `base` (8-byte aligned): the staged mbarrier
// (one arrival per warp of the math warpgroup, one phase per tile), the freed mbarrier (the
// store warp's one arrival: it has read the record), then kRecordBytes of record, which the
// epilogue lays out.
struct StoreWarpHandshake {
  static constexpr int kRecordBytes = 16, kBytes = 16 + kRecordBytes;
  uint32_t base;

  __device__ uint32_t staged(int wg) const { return base + wg * kBytes; }
  __device__ uint32_t freed(int wg) const { return staged(wg) + 8; }
  __device__ uint32_t record(int wg) const { return staged(wg) + 16; }

  // By one thread, before the main loop's CTA-wide barrier (only threads use these barriers).
  __device__ void init() const {
    for (int wg = 0; wg < kNumMathWarpGroups; ++wg) {
      ptx::mbarrier_init(staged(wg), kWarpGroupThreads / 32);
      ptx::mbarrier_init(freed(wg), 1);
    }
  }
};

// A store warp's wait (epilogue.store, Epilogue::kStoreWarps > 0) for its math warpgroup's tile
// n: true once the phase of the staged barrier at shared address `staged` with parity `parity`
// (n's) has completed, false if the CTA runs no tile n (then that phase never completes), as
// the main loop's tile count at shared address tile_count says. The count is tested before each
// sleeping wait, so after its last tile the warp normally ends at once (the producer writes the
// count when it issues the end, while the math warps still run that tile's last K blocks; if
// not yet, the next test is at most kStoreWarpSleepNs later). The wait sleeps until the phase
// completes or kStoreWarpSleepNs pass: a polling warp took issue slots from the math warps
// beside it (L2 3 % slower at M <= 128).
constexpr uint32_t kStoreWarpSleepNs = 4000;
__device__ __forceinline__ bool store_warp_wait(uint32_t staged, uint32_t parity, int n,
                                                uint32_t tile_count) {
  bool last = false;
  ptx::spin_until([&] {
    if (ptx::mbarrier_test_wait(staged, parity)) return true;
    last = ptx::ld_volatile_shared_s32(tile_count) <= n;
    return last || ptx::mbarrier_try_wait_sleep(staged, parity, kStoreWarpSleepNs);
  });
  return !last;
}

// One CTA per SM of 384 threads starts with 168 registers per thread (65536 / 384 rounded down
// to the allocation unit of 8): 64512 in all. setmaxnreg only moves registers inside that pool:
// a math warpgroup's increase waits until the producer's decrease has freed enough, forever if
// the two do not fit, so the split must satisfy 128 x producer + 256 x math <= 64512.
// 128 x 40 + 256 x 232 = 64512: two 64-register master accumulators, a partial and the four mma
// paths (paired, paired with a tail, lone by group, lone by halves). ptxas spills nothing in any
// GEMM kernel (tests/test_tools_build.py; tests/test_sass_kloops.py checks the K loops). In L1
// that takes care: the tail's 16-register master accumulator, live through its K loop, leaves no
// room for what the epilogues derive from the thread index (coordinates, addresses), which the
// compiler would hoist out of the tile loop and keep on the stack (seven words, and two of the
// gather warps'). So each epilogue derives them per tile from a thread index the compiler cannot
// hoist (ptx::opaque), and the gather warps keep their record in shared memory (GatherRecord).
// Against a build that kept them on the stack, L1 ran 1.6 % faster at M = 2048 and 0.7 % at 8192
// (11 of 12 rounds of 200 launches, one H200, benchmarks/RESULTS.md 2026-12-05).
constexpr int kRegsAtLaunch = 65536 / kNumThreads / 8 * 8;
constexpr int kProducerRegs = 40;
constexpr int kMathRegs = 232;
static_assert(kWarpGroupThreads * kProducerRegs + kNumMathThreads * kMathRegs <=
                  kNumThreads * kRegsAtLaunch,
              "setmaxnreg would wait forever: the split exceeds the CTA's registers");
constexpr int kMathWarps = kNumMathThreads / 32;
// A full barrier's phase: the producer's lane 0 (announcing the TMA bytes) and the scale warp's
// 32 lanes (each when its cp.async have landed). The scale warp is the producer warpgroup's last.
constexpr int kFullArrivals = 1 + 32;
constexpr int kScaleWarp = 3;
// Gathered A: warps 1 .. kGatherWarps of the producer warpgroup, each lane one more full-barrier
// arrival.
constexpr int kGatherWarps = 2;
constexpr int kGatherArrivals = kGatherWarps * 32;
// Rows a gather lane copies at a time (4 kGatherBatch rows per warp): a warp's share of every
// tile (half of 64, 80, 128 or 144 rows) is a multiple.
constexpr int kGatherBatch = 2;
// Shared memory where the tails' master accumulators wait through the pair's epilogue
// (GroupedFp8TmaMainloop, kTailRows > 0).
template <int kTailRows>
constexpr int kTailAccBytes = kNumMathThreads * kTailRows * static_cast<int>(sizeof(float));

// A tail (kTailRows > 0, the rows of GemmOperands::tail_rows): an expert's last row block with
// few rows left alone in its pair would cost a lone tile, which loads the whole weight tile for
// them (0.77 of a paired tile's time at M = 2048 for 1-16 real rows). Instead it rides along
// with the expert's last full pair, whose stages already hold that weight tile: the producer
// adds the tail's kTailRows rows (one more TMA box) and their scales to each stage, and each
// math warpgroup runs the tail swap-AB, the weights as A and the tail's rows as B: wgmma
// m64n(kTailRows) over its 64 rows of each B group (gate and up of the same columns, so SwiGLU
// still meets in one thread), issued just before the pair's wgmma of the same group and
// promoted while those run (mma_pair_tail). Its master accumulator (kTailRows floats per
// thread) stays in registers through the K loop and waits in shared memory, each thread's own,
// through the pair's epilogue.
// Shared memory of the gather warps (kGatherA): the token of each row of the current tile (a
// pair's and a tail's), per warp a fixed region of its own for its half of the rows, then 16
// bytes of its GatherRecord (so regions stay 16-byte aligned).
template <int kTailRows>
constexpr int kGatherTokenBytes = (kTileM + kTailRows) / kGatherWarps * 4;
template <int kTailRows>
constexpr int kGatherWarpBytes = kGatherTokenBytes<kTailRows> + 16;

// Which row blocks' tokens a gather warp holds: those of the tile it last looked them up for
// (none at first), in shared memory after the warp's tokens, read once per tile as pair * 8 +
// mask: the producer warpgroup's 40 registers are taken, and ptxas kept a register copy on the
// stack. All 32 lanes call each member, the same tile in every lane.
struct GatherRecord {
  uint32_t at;
  static_assert(Tile::kTailBit < 8, "a mask fits three bits");
  __device__ explicit GatherRecord(uint32_t record_at) : at(record_at) {
    if (threadIdx.x % 32 == 0) ptx::st_shared(at, -1);
    __syncwarp();
  }
  __device__ static int key(const Tile& tile) { return tile.pair * 8 + tile.mask; }
  __device__ bool holds(const Tile& tile) const { return ptx::ld_shared_s32(at) == key(tile); }
  // After a __syncwarp that follows every lane's holds(): lane 0 rewrites what they read, and
  // the warp's next holds() reads it.
  __device__ void set(const Tile& tile) const {
    if (threadIdx.x % 32 == 0) ptx::st_shared(at, key(tile));
    __syncwarp();
  }
};
template <int kTailRows>
constexpr int kGatherBytes = kGatherWarps * kGatherWarpBytes<kTailRows>;

template <int kWgN, int kStages, int kTailRows = 0, bool kGatherA = false,
          BRowOrder kBOrder = BRowOrder::kAsStored>
class GroupedFp8TmaMainloop {
  using Shape = TileShape<kWgN>;
  using Ring = StageRing<kWgN, kStages, kTailRows>;
  static_assert(kBOrder == BRowOrder::kAsStored || kWgN == kQuantBlock,
                "lane runs reorder whole 128-row B groups");
  static_assert(kTailRows == 0 || (kTailRows == 16 && kWgN == 2 * kBlockM),
                "a tail is m64n16 over each warpgroup's half of a 128-row B group");
  static_assert(kStages >= 2, "the ring needs one stage in flight while another is consumed");
  static_assert(kBlockM % 32 == 0, "the producer warp copies whole rows of scales per lane");

 public:
  // Per stage a full, an empty and a desc barrier (the producer has named the stage's tile).
  static constexpr int kBarrierBytes = 3 * kStages * static_cast<int>(sizeof(uint64_t));
  // Per stage, the tile whose first K block it holds (tile_slot).
  static constexpr int kTileSlotBytes = kStages * static_cast<int>(sizeof(Tile));
  // Then the number of tiles the producer took, written after its last (kNoTileCount before),
  // and its running count (in shared memory: a register for it made the producer spill at 40).
  static constexpr int kTileCountBytes = 8;
  static constexpr int kNoTileCount = 0x7fffffff;
  // Then the scheduler's order of the last pairs (TileScheduler::kOrderBytes).
  static constexpr int kControlBytes =
      (kBarrierBytes + kTileSlotBytes + kTileCountBytes + TileScheduler::kOrderBytes + 127) / 128 *
      128;
  // Then the tails' master accumulators: per math thread kTailRows floats, stored as float4
  // quads, quad q of math thread i at (q * kNumMathThreads + i) * 16 (conflict-free).
  static constexpr int kTailQuads = kTailRows / 4;
  // Then, with kGatherA, the gather warps' tokens (kGatherBytes). Where (from `smem`) these two
  // regions start, whose bytes each belong to one thread or one warp: the tails' master
  // accumulators (each math thread's) and the tokens (each warp's). A racecheck report on them
  // is a race (launch.h's gemm_private_smem).
  static constexpr int kTailAccOffset = Ring::kBytes + kControlBytes;
  static constexpr int kGatherTokensOffset = kTailAccOffset + kTailAccBytes<kTailRows>;
  static constexpr int kSmemBytes = kGatherTokensOffset + (kGatherA ? kGatherBytes<kTailRows> : 0);
  static constexpr int kFullCount = kFullArrivals + (kGatherA ? kGatherArrivals : 0);

  // `smem` must be kSwizzleAtomBytes-aligned (align_smem). The tensor maps, all 128B-swizzled
  // and in kernel parameter space (__grid_constant__): `maps.a` views `op.a` as [pool rows, k]
  // with a box of kBlockM x 128 (one row block), `maps.a_pair` the same with a box of kTileM x
  // 128 (a pair), `maps.b` views `op.b` as [experts * b_rows / b_group_stride][b_group_stride][k]
  // with a box of 2 x kWgN x 128 (both B groups of a tile, GemmOperands::b_coords; with
  // kLaneRuns as [experts * b_rows / b_group_stride][b_group_stride / 128][16][8][k] with a box of
  // 2 x 1 x 16 x 8 x 128, which puts each group's rows in lane-run order), and
  // `maps.tail` views `op.a` with a box of kTailRows x 128 (null without a tail).
  // Blocks at or past min(*num_blocks, max_blocks) are skipped; the count is read by each role
  // after the register split (a value held across it would be spilled).
  __device__ GroupedFp8TmaMainloop(uint8_t* smem, const GemmOperands& op, const int32_t* num_blocks,
                                   int max_blocks, const GemmTensorMaps& maps, int* tile_claims)
      : ring_{smem},
        full_(reinterpret_cast<uint64_t*>(smem + Ring::kBytes)),
        empty_(full_ + kStages),
        desc_(empty_ + kStages),
        claims_(tile_claims),
        op_(op),
        num_blocks_(num_blocks),
        max_blocks_(max_blocks),
        tma_a_(&maps.a),
        tma_a_pair_(&maps.a_pair),
        tma_b_(&maps.b),
        tma_tail_(&maps.tail) {}

  // Called by every thread of the CTA. epilogue(tile, acc, math_thread) runs on a math
  // warpgroup whose row block works in `tile` (math_thread in [0, 256)), on its own: the
  // warpgroups never wait for each other; epilogue.begin_tile(tile, math_thread) runs on every
  // math thread before each tile's K loop (to start loads that the epilogue will need). An
  // epilogue with kStoreWarps > 0 also gets epilogue.store(w, tile_count) on producer warp w + 1:
  // tile_count is the shared-memory address of the number of tiles this CTA runs, kNoTileCount
  // until the producer has taken its last. (The math warps do not announce their end: any code
  // after their tile loop, even a __syncwarp, made ptxas spill the wide L2's accumulators.)
  template <class Epilogue>
  __device__ __forceinline__ void run(Epilogue&& epilogue) {
    if (threadIdx.x == 0) {
      for (int s = 0; s < kStages; ++s) {
        ptx::mbarrier_init(&full_[s], kFullCount);
        ptx::mbarrier_init(&empty_[s], kMathWarps);
        ptx::mbarrier_init(&desc_[s], 1);
      }
      ptx::st_shared(tile_count(), kNoTileCount);
      ptx::st_shared(order_record(), 0);
      ptx::fence_barrier_init();
    }
    __syncthreads();
    if (threadIdx.x < kWarpGroupThreads) {
      ptx::setmaxnreg_dec<kProducerRegs>();
      constexpr int kStoreWarps = std::remove_reference_t<Epilogue>::kStoreWarps;
      const int warp = threadIdx.x / 32;
      static_assert(kStoreWarps < kScaleWarp, "the store warps are warps 1 .. kStoreWarps");
      static_assert(!kGatherA || (kStoreWarps == 0 && kGatherWarps < kScaleWarp),
                    "the gather warps are warps 1 .. kGatherWarps, which no other role takes");
      if (warp == 0) produce();
      if (warp == kScaleWarp) copy_scales();
      if constexpr (kGatherA) {
        if (warp >= 1 && warp <= kGatherWarps) gather_a(warp - 1);
      }
      if constexpr (kStoreWarps > 0) {
        if (warp >= 1 && warp <= kStoreWarps) epilogue.store(warp - 1, tile_count());
      }
    } else {
      ptx::setmaxnreg_inc<kMathRegs>();
      consume(epilogue, static_cast<int>(threadIdx.x) - kWarpGroupThreads);
    }
  }

 private:
  // Producer warp.
  __device__ __forceinline__ void produce() {
    const int lane = threadIdx.x % 32;
    int slot = 0;
    uint32_t phase = 0;
    const TileScheduler sched = scheduler();
    const bool dynamic = claims_ != nullptr;
    // Slot 0's shared-memory addresses, computed once: from the generic pointers, each K block
    // recomputed the aligned ring base (a dozen instructions) on a warp whose latency per K block
    // is on both GEMMs' critical path (benchmarks/RESULTS.md, 2026-12-03).
    const ProducerAddrs at(ring_);
    // A claim's latency (one atomic) is hidden by the ring: when a tile's last K block has
    // been issued, the producer is kStages K blocks ahead of the math.
    Tile tile = dynamic ? sched.take(sched.claim(claims_, lane), claims_, lane) : sched.first();
    if (lane == 0) ptx::st_shared(tiles_taken(), 0);
    while (!sched.done(tile)) {
      const int row0 = tile.pair * kTileM;
      const int a_first = (tile.mask & 3) == 2 ? 1 : 0;  // the first working row block
      const GemmOperands::BCoords b_at = op_.b_coords(tile.expert, tile.n);
      // kLaneRuns: the 5-D view's coordinates [outer][row / 128][16][8][k] (launch/gemm.cu).
      const int b_row_at = kBOrder == BRowOrder::kLaneRuns ? b_at.row / kQuantBlock : b_at.row;
      if (op_.a_ready != nullptr && lane == 0) wait_a_ready(tile);
      for (int kb = 0; kb < num_kb(); ++kb) {
        ptx::mbarrier_wait(at.empty0() + slot * kBarrierStride, phase ^ 1);
        uint64_t* full = ptx::barrier_at(at.full0() + slot * kBarrierStride);
        if (lane == 0) {
          // Every stage names its tile for the scale warp (the math reads it at the first).
          publish(slot, tile);
          ptx::mbarrier_arrive(ptx::barrier_at(at.desc0() + slot * kBarrierStride));
          if (kb == 0) ptx::st_shared(tiles_taken(), ptx::ld_shared_s32(tiles_taken()) + 1);
          // Only the working row blocks' A: at small M most pairs have one, and the other
          // block's bytes would only take L2 bandwidth from the weight stream. One TMA for A
          // (a pair's 128 rows in one box) and one for both B groups, the scales on another warp:
          // this warp's latency per K block is on the critical path (benchmarks/RESULTS.md,
          // 2026-12-03).
          const int a_blocks = __popc(tile.mask & 3);
          const int tail_bytes = tile.tail() ? Ring::kTailBytes : 0;
          const uint32_t a = at.a0 + slot * Ring::kOperandStride;
          if constexpr (kGatherA) {  // A and the tail: the gather warps' copies
            ptx::mbarrier_arrive_expect_tx(full, Shape::kBBytes);
          } else {
            ptx::mbarrier_arrive_expect_tx(
                full, a_blocks * Shape::kAWgBytes + Shape::kBBytes + tail_bytes);
            ptx::tma_load_2d(ptx::smem_ptr(a + a_first * Shape::kAWgBytes),
                             a_blocks == 2 ? tma_a_pair_ : tma_a_, kb * kBlockK,
                             row0 + a_first * kBlockM, full);
          }
          if constexpr (kBOrder == BRowOrder::kLaneRuns) {
            ptx::tma_load_5d(ptx::smem_ptr(a + Shape::kABytes), tma_b_,
                             {kb * kBlockK, 0, 0, b_row_at, b_at.outer}, full);
          } else {
            ptx::tma_load_3d(ptx::smem_ptr(a + Shape::kABytes), tma_b_, kb * kBlockK, b_row_at,
                             b_at.outer, full);
          }
          if constexpr (kTailRows > 0 && !kGatherA) {
            if (tile.tail())
              ptx::tma_load_2d(ptx::smem_ptr(a + Shape::kABytes + Shape::kBBytes), tma_tail_,
                               kb * kBlockK, row0 + kTileM, full);
          }
        }
        if (++slot == kStages) {
          slot = 0;
          phase ^= 1;
        }
      }
      if (!dynamic) {
        tile = sched.next(tile);
      } else if (const Tile second = sched.straddle(tile); second.mask != 0) {
        tile = second;
      } else {
        tile = sched.take(sched.claim(claims_, lane), claims_, lane);
      }
    }
    // One more stage that holds no data, only the end (mask 0): this arrival and the scale
    // warp's 32 complete the phase.
    ptx::mbarrier_wait(&empty_[slot], phase ^ 1);
    if (lane == 0) {
      publish(slot, sched.done_tile());
      ptx::mbarrier_arrive(ptx::barrier_at(at.desc0() + slot * kBarrierStride));
      ptx::mbarrier_arrive(&full_[slot]);
      ptx::st_shared(tile_count(), ptx::ld_shared_s32(tiles_taken()));
    }
  }

  // Scale warp: per stage, once the producer has named its tile (the stage's desc barrier, one
  // phase per use of the slot, like the full barrier; the producer arrives after its wait for the
  // empty slot, so the slot's scales are free), the 32 lanes copy the working row blocks' scales
  // and the two weight scales with cp.async, each lane arriving on the full barrier when its
  // copies land. The producer's stage names the same tile for all its K blocks; the end (mask 0)
  // gets the lanes' arrivals alone.
  __device__ __forceinline__ void copy_scales() {
    const int lane = threadIdx.x % 32;
    const ProducerAddrs at(ring_);
    int slot = 0;
    uint32_t phase = 0;
    for (;;) {
      ptx::mbarrier_wait(at.desc0() + slot * kBarrierStride, phase);
      const Tile tile = read_published(slot);
      uint64_t* full = ptx::barrier_at(at.full0() + slot * kBarrierStride);
      if (tile.mask == 0) {
        ptx::mbarrier_arrive(full);
        return;
      }
      const int row0 = tile.pair * kTileM;
      // The tile's first row's scales, then a 32-bit offset: a 64-bit row index spilled.
      const float* a_scale_src = op_.a_scale_at(row0, 0) + lane * (op_.k / kQuantBlock);
      const size_t src_stride = op_.k / kQuantBlock * 32;  // 32 rows
      // Rows of the pair in 32-row groups; with kGatherA, group kRows32 is the tail's.
      constexpr int kRows32 = kNumMathWarpGroups * kBlockM / 32;
      // Whether this lane's row of group i (row i * 32 + lane) is in a working block or the tail.
      const auto lane_row_works = [&](int i) {
        return i < kRows32 ? tile.has(i / (kBlockM / 32)) : tile.tail() && lane < kTailRows;
      };
      // kGatherA: the token of each of this lane's rows (the tail's rows follow the pair's in the
      // pool), -1 for a padding row or a block that does not work.
      int token[kGatherA ? kRows32 + 1 : 1];
      if constexpr (kGatherA) {
#pragma unroll
        for (int i = 0; i < kRows32 + 1; ++i) {
          token[i] = lane_row_works(i) ? op_.gathered_token(row0 + i * 32 + lane) : -1;
        }
      }
      for (int kb = 0; kb < num_kb(); ++kb) {
        if (kb > 0) ptx::mbarrier_wait(at.desc0() + slot * kBarrierStride, phase);
        // Only the working blocks' scales: a block past the pool's end has none to read.
        const uint32_t a_scale = at.a_scale0() + slot * Shape::kScaleBytes;
        if constexpr (kGatherA) {  // from the tokens' scales; a padding row's zero-filled
#pragma unroll
          for (int i = 0; i < kRows32 + 1; ++i) {
            const bool real = token[i] >= 0;
            const uint32_t at_token = real ? static_cast<uint32_t>(token[i]) : 0u;
            if (lane_row_works(i)) {
              ptx::cp_async_4_zfill(
                  a_scale + (i * 32 + lane) * 4,
                  op_.a_src_scale + at_token * static_cast<uint32_t>(op_.k / kQuantBlock) + kb,
                  real ? 4 : 0);
            }
          }
        } else {
#pragma unroll
          for (int w = 0; w < kNumMathWarpGroups; ++w) {
            if (!tile.has(w)) continue;
#pragma unroll
            for (int i = 0; i < kBlockM / 32; ++i) {
              const int rows32 = w * (kBlockM / 32) + i;
              ptx::cp_async_4(a_scale + (rows32 * 32 + lane) * 4,
                              a_scale_src + (rows32 * src_stride + kb));
            }
          }
        }
        if constexpr (kTailRows > 0 && !kGatherA) {  // the tail's, after the pair's
          if (tile.tail() && lane < kTailRows)
            ptx::cp_async_4(a_scale + (kRows32 * 32 + lane) * 4,
                            a_scale_src + (kRows32 * src_stride + kb));
        }
        if (lane < kNumBGroups)
          ptx::cp_async_4(a_scale + Ring::kBScaleOffset + 4 * lane,
                          op_.b_scale_at(tile.expert, tile.n, lane, kb));
        ptx::cp_async_mbarrier_arrive(ptx::barrier_at(at.full0() + slot * kBarrierStride));
        if (++slot == kStages) {
          slot = 0;
          phase ^= 1;
        }
      }
    }
  }

  // Gather warp gw of kGatherWarps (kGatherA): per stage, once the producer has named its tile
  // (the desc barrier, as for the scale warp), the warp copies its half of the stage's rows (the
  // working row blocks' 64 each, then a tail's kTailRows) from the tokens' rows of op_.a_src, and
  // each lane arrives on the full barrier when its copies land (as the scale warp's). One
  // warp-wide copy takes 4 rows x 128 B (lane: row lane / 8, 16-byte chunk lane % 8), so each
  // row's K block is one whole 128-byte line. The tokens of a tile's rows are looked up when its
  // row blocks change (not per N tile), into shared memory (a register each would not fit).
  // (One warp copying every row and its scale, ~20 instructions a row, took ~2.3 us per K block
  // of a pair against the ~0.85 us the math takes: RESULTS.md, 2026-12-03. Here a row costs a
  // handful: the token's address in one wide multiply-add, the scales on the scale warp.)
  __device__ __forceinline__ void gather_a(int gw) {
    const int lane = threadIdx.x % 32;
    // Row p of a tile lands at byte 128 p of the stage's A tile plus the first working block's
    // offset, a tail's rows kBBytes further (they follow B), each 16-byte chunk swizzled by p % 8.
    // A warp's rows start at a multiple of 8 and a lane takes rows lane / 8 + 4 j, so its chunk's
    // swizzled offset is one of two.
    const int chunk = lane % 8;
    const uint32_t swizzled[2] = {static_cast<uint32_t>((chunk ^ (lane / 8)) << 4),
                                  static_cast<uint32_t>((chunk ^ (lane / 8 + 4)) << 4)};
    const ProducerAddrs at(ring_);
    // Token q of this warp's rows (row p0 + q of the tile) at tokens + 4 q. A region per warp:
    // where the warps' halves meet depends on the tile, and one warp may already be rewriting
    // its tokens for its next tile (the desc barrier waits only for the producer) while the
    // other still copies rows of the last one (racecheck, benchmarks/RESULTS.md 2026-12-04).
    const uint32_t tokens = gather_tokens_addr(gw);
    int slot = 0;
    uint32_t phase = 0;
    GatherRecord held(tokens + kGatherTokenBytes<kTailRows>);
    for (;;) {
      ptx::mbarrier_wait(at.desc0() + slot * kBarrierStride, phase);
      const Tile tile = read_published(slot);
      if (tile.mask == 0) {
        ptx::mbarrier_arrive(ptx::barrier_at(at.full0() + slot * kBarrierStride));
        return;
      }
      // The tile's rows: the working blocks' (pool rows first_row + p for p < main_rows), then a
      // tail's, which follow them in the pool. This warp's: [p0, p0 + half).
      const int a_first = (tile.mask & 3) == 2 ? 1 : 0;
      const int main_rows = __popc(tile.mask & 3) * kBlockM;
      const int half = (main_rows + (tile.tail() ? kTailRows : 0)) / kGatherWarps;
      const int p0 = gw * half;
      if (!held.holds(tile)) {
        const int first_row = tile.pair * kTileM + a_first * kBlockM;
        __syncwarp();  // every lane has issued its copies from the old tokens
        for (int q = lane; q < half; q += 32) {
          ptx::st_shared(tokens + q * 4, op_.gathered_token(first_row + p0 + q));
        }
        __syncwarp();
        held.set(tile);
      }
      for (int kb = 0; kb < num_kb(); ++kb) {
        if (kb > 0) ptx::mbarrier_wait(at.desc0() + slot * kBarrierStride, phase);
        // Row p's 16 bytes: at a_dst + 128 p (+ kBBytes for a tail's), from row `token` of a_src.
        const uint32_t a_dst =
            at.a0 + slot * Ring::kOperandStride + a_first * Shape::kAWgBytes + swizzled[0];
        const uint8_t* a_src = op_.a_src + kb * kBlockK + chunk * 16;
        const uint32_t k = static_cast<uint32_t>(op_.k);
        for (int qb = lane / 8; qb < half; qb += 4 * kGatherBatch) {
          int token[kGatherBatch];  // read first, so their latencies overlap
#pragma unroll
          for (int j = 0; j < kGatherBatch; ++j)
            token[j] = ptx::ld_shared_s32(tokens + (qb + 4 * j) * 4);
#pragma unroll
          for (int j = 0; j < kGatherBatch; ++j) {
            const int p = p0 + qb + 4 * j;
            const bool real = token[j] >= 0;
            const uint32_t dst = a_dst + p * kBlockK + (p < main_rows ? 0 : Shape::kBBytes) +
                                 (j % 2 == 1 ? swizzled[1] - swizzled[0] : 0);
            // 32 x 32 -> 64 bits: one wide multiply-add with a_src.
            const uint64_t at =
                static_cast<uint64_t>(real ? static_cast<uint32_t>(token[j]) : 0u) * k;
            ptx::cp_async_16_zfill(dst, a_src + at, real ? 16 : 0);
          }
        }
        ptx::cp_async_mbarrier_arrive(ptx::barrier_at(at.full0() + slot * kBarrierStride));
        advance(slot, phase);
      }
    }
  }

  static constexpr uint32_t kBarrierStride = sizeof(uint64_t);
  // One register: everything the producer addresses is at a fixed offset from the ring's base
  // (the barriers follow the ring, kSmemBytes' layout).
  struct ProducerAddrs {
    uint32_t a0;
    __device__ explicit ProducerAddrs(const Ring& ring) : a0(ptx::smem_addr(ring.a(0))) {}
    __device__ uint32_t a_scale0() const { return a0 + Ring::kScalesOffset; }
    __device__ uint32_t full0() const { return a0 + Ring::kBytes; }
    __device__ uint32_t empty0() const { return full0() + kStages * kBarrierStride; }
    __device__ uint32_t desc0() const { return empty0() + kStages * kBarrierStride; }
  };

  // GemmOperands::a_ready, on the producer's lane 0: acquires the counts of the tile's working
  // blocks (bounded, like every mbarrier wait), then orders its TMA reads after them; the scale
  // warp's copies follow through the stages' desc barriers, on which this lane arrives after.
  __device__ __forceinline__ void wait_a_ready(const Tile& tile) const {
    const int need = op_.a_ready_count * (tile.lone() ? 2 : 1);
#pragma unroll
    for (int w = 0; w < kNumMathWarpGroups; ++w) {
      if (!tile.has(w)) continue;
      const int32_t* count = op_.a_ready + tile.pair * kNumMathWarpGroups + w;
      ptx::spin_until([&] { return ptx::ld_acquire_gpu(count) >= need; });
    }
    ptx::fence_proxy_async_global();
  }

  // Math warpgroups. One K loop per tile kind (paired, lone): no branch on the kind inside it.
  template <class Epilogue>
  __device__ __forceinline__ void consume(Epilogue& epilogue, int math_thread) {
    // Through a shuffle from lane 0, so the compiler knows it is the same in every lane of the
    // warp and keeps what derives from it (the A descriptor) in uniform registers: computed
    // per thread, each wgmma's A descriptor took two R2UR moves before it could issue.
    const int wg = __shfl_sync(0xffffffffu, math_thread / kWarpGroupThreads, 0);
    const int t = math_thread % kWarpGroupThreads;
    const bool warp_leader = math_thread % 32 == 0;
    int slot = 0;
    uint32_t phase = 0;
    for (Tile tile = published(slot, phase); tile.mask != 0; tile = published(slot, phase)) {
      const int block = tile.block_of(wg);
      epilogue.begin_tile(tile, math_thread);
      TileAccum<kWgN> acc;
#pragma unroll
      for (int g = 0; g < kNumBGroups; ++g) {
#pragma unroll
        for (int i = 0; i < Shape::kAccRegs; ++i) acc[g][i] = 0.f;
      }
      if constexpr (kTailRows > 0) {
        if (tile.tail()) {
          TailAccum tail_acc;
#pragma unroll
          for (int g = 0; g < kNumBGroups; ++g) {
#pragma unroll
            for (int i = 0; i < kTailRegs; ++i) tail_acc[g][i] = 0.f;
          }
          const uint32_t master = tail_acc_addr(math_thread);
          k_loop(slot, phase, block, t,
                 [&](const StageView& v) { mma_pair_tail(v, acc, tail_acc, warp_leader); });
          store_tail_acc(master, tail_acc);  // the pair's epilogue needs the registers
          epilogue(tile, acc, math_thread);
          load_tail_acc(master, tail_acc);
          epilogue.tail(tile, tail_acc, math_thread);
          continue;
        }
      }
      if (!tile.lone()) {
        k_loop(slot, phase, block, t, [&](const StageView& v) {
          mma_pair(v.a, v.b, v.a_scales, v.b_scales, acc, v.slot, warp_leader);
        });
      } else if constexpr (Epilogue::kLoneSplit == LoneSplit::kHalfOfEachGroup) {
        lone_halves_loop(slot, phase, block, wg, t, acc, warp_leader);
      } else {
        // Into acc[0] whichever group: a branch on the warpgroup here (to keep constant
        // accumulator indices) made the compiler treat the ring's slot as per-thread in every
        // K loop, with each wgmma's descriptors moved into uniform registers one by one.
        k_loop(slot, phase, block, t, [&](const StageView& v) {
          const float b_scale = wg == 0 ? v.b_scales[0] : v.b_scales[1];  // no local array
          mma_lone_group(v.a, v.b, wg, v.a_scales, b_scale, acc[0], v.slot, warp_leader);
        });
      }
      epilogue(tile, acc, math_thread);
    }
  }

  // What a math warpgroup reads of one full stage: its row block's A tile and the B tile
  // (shared-memory addresses), the scales of its accumulator rows and the B groups.
  struct StageView {
    int slot;
    uint32_t a, b, b_scale;
    RowScales a_scales;
    float b_scales[kNumBGroups];
  };

  // A tile's K blocks for row block `block` of the pair. The stage of K block 0 was waited for by
  // published(); each later one is waited for at the end of the block before it. Addresses are
  // 32-bit shared-memory offsets from the ring's slot 0 (scales read with ld.shared: a generic
  // pointer costs address arithmetic and a generic load per K block).
  template <class Step>
  __device__ __forceinline__ void k_loop(int& slot, uint32_t& phase, int block, int t,
                                         Step&& step) {
    const StageAddrs at(ring_, full_, block, t);
    const int n = num_kb();
    for (int kb = 0;;) {
      step(at.view(slot));
      advance(slot, phase);
      if (++kb == n) break;
      at.wait_full(slot, phase);
    }
  }

  // Slot 0's shared-memory addresses of what a math warpgroup reads (its row block's A, B, the
  // scales) and of the full barriers; slot s's are these plus s stages.
  struct StageAddrs {
    uint32_t a0, b0, a_scale0, b_scale0, full0;
    int t;
    __device__ StageAddrs(const Ring& ring, uint64_t* full, int block, int t)
        : a0(ptx::smem_addr(ring.a(0)) + block * Shape::kAWgBytes),
          b0(ptx::smem_addr(ring.b(0))),
          a_scale0(ptx::smem_addr(ring.a_scale(0)) + block * kBlockM * 4),
          b_scale0(ptx::smem_addr(ring.b_scale(0))),
          full0(ptx::smem_addr(full)),
          t(t) {}
    __device__ __forceinline__ StageView view(int slot) const {
      // Gathered A: the stage's A rows are generic-proxy writes (cp.async) that this thread has
      // acquired through the full barrier; order them before its wgmma, async-proxy reads.
      if constexpr (kGatherA) ptx::fence_proxy_async_shared();
      StageView v;
      v.slot = slot;
      v.a = a0 + slot * Ring::kOperandStride;
      v.b = b0 + slot * Ring::kOperandStride;
      v.b_scale = b_scale0 + slot * Shape::kScaleBytes;
      v.a_scales = load_row_scales(a_scale0 + slot * Shape::kScaleBytes, t);
      ptx::ld_shared_v2(v.b_scale, v.b_scales);
      return v;
    }
    __device__ __forceinline__ void wait_full(int slot, uint32_t phase) const {
      ptx::mbarrier_wait(full0 + slot * static_cast<uint32_t>(sizeof(uint64_t)), phase);
    }
    // Whether the stage has landed, without waiting; the same answer in every lane of the warp
    // (lane 0's), so the warp takes one path.
    __device__ __forceinline__ bool test_full(int slot, uint32_t phase) const {
      const bool landed =
          ptx::mbarrier_test_wait(full0 + slot * static_cast<uint32_t>(sizeof(uint64_t)), phase);
      return __shfl_sync(0xffffffffu, landed, 0);
    }
  };

  __device__ __forceinline__ static void advance(int& slot, uint32_t& phase) {
    if (++slot == kStages) {
      slot = 0;
      phase ^= 1;
    }
  }

  // The tile a stage starts, in the stage's slot of shared memory: the producer writes it with
  // the stage of the tile's first K block (and an end, mask 0, after the last tile), the math
  // warpgroups read it after their wait on that stage's full barrier. Only what the math and the
  // epilogues read (pair, n, mask), by 32-bit shared-memory address: a generic pointer held
  // across the tile made ptxas spill.
  __device__ uint32_t tile_slot(int slot) const {
    return ptx::smem_addr(full_) + kBarrierBytes + slot * static_cast<uint32_t>(sizeof(Tile));
  }
  __device__ uint32_t tile_count() const { return tile_slot(kStages); }
  // The producer's running count of the tiles it has taken (kTileCountBytes' second word).
  __device__ uint32_t tiles_taken() const { return tile_count() + 4; }
  __device__ uint32_t order_record() const { return tile_count() + kTileCountBytes; }
  __device__ __forceinline__ void publish(int slot, const Tile& t) const {
    const uint32_t a = tile_slot(slot);
    ptx::st_shared(a + offsetof(Tile, pair), t.pair);
    ptx::st_shared(a + offsetof(Tile, n), t.n);
    ptx::st_shared(a + offsetof(Tile, expert), t.expert);  // for the scale warp
    ptx::st_shared(a + offsetof(Tile, mask), t.mask);
  }
  // What the scale warp reads, after its wait on the stage's desc barrier.
  __device__ __forceinline__ Tile read_published(int slot) const {
    const uint32_t a = tile_slot(slot);
    return {0, ptx::ld_shared_s32(a + offsetof(Tile, pair)),
            ptx::ld_shared_s32(a + offsetof(Tile, n)),
            ptx::ld_shared_s32(a + offsetof(Tile, expert)),
            ptx::ld_shared_s32(a + offsetof(Tile, mask))};
  }
  __device__ __forceinline__ Tile published(int slot, uint32_t phase) const {
    ptx::mbarrier_wait(&full_[slot], phase);
    const uint32_t a = tile_slot(slot);
    return {0, ptx::ld_shared_s32(a + offsetof(Tile, pair)),
            ptx::ld_shared_s32(a + offsetof(Tile, n)), 0,
            ptx::ld_shared_s32(a + offsetof(Tile, mask))};
  }

  // Paired tile: this warpgroup's own row block times both B groups.
  __device__ __forceinline__ void mma_pair(uint32_t a_smem, uint32_t b_smem,
                                           const RowScales& a_scales,
                                           const float (&b_scales)[kNumBGroups],
                                           TileAccum<kWgN>& acc, int slot, bool warp_leader) {
    float part[Shape::kAccRegs];
#pragma unroll
    for (int g = 0; g < kNumBGroups; ++g) {
      issue_block_mma<kWgN>(a_smem, b_smem + g * Shape::kBGroupBytes, part);
      ptx::wgmma_wait<0>();
      ptx::fence_operands(part);
      // After the last group's wgmma the warp has read all of the slot: hand it back before
      // the promotion.
      if (g == kNumBGroups - 1) release(slot, warp_leader);
      promote(a_scales, b_scales[g], part, acc[g]);
    }
  }

  // Paired tile with a tail, one K block. Per B group, the tail's wgmma (a commit group of its
  // own) go just before the pair's, and the tail is promoted while the pair's run: the tail then
  // costs the tensor pipe its wgmma and no wait of its own. (Issued after both of the pair's
  // groups and waited for there, by both warpgroups at about the same moment, it cost the
  // carrying tile ~0.7 of a pair's time; both tail groups before the pair's group 0 held 16
  // more registers and was slower still, RESULTS.md 2026-12-03.)
  static constexpr int kTailRegs = ptx::WgmmaE4m3<(kTailRows == 0 ? 16 : kTailRows)>::kRegs;
  using TailAccum = float[kNumBGroups][kTailRegs];
  __device__ __forceinline__ void mma_pair_tail(const StageView& v, TileAccum<kWgN>& acc,
                                                TailAccum& tail_acc, bool warp_leader) {
    // Fixed offsets from what the pair reads: this warpgroup's 64 rows of B group 0 (the tail's
    // A; group 1's are kBGroupBytes further) are as far from the stage's B as its A tile is from
    // the stage's A (block wg); the tail's rows follow B, their scales precede the B scales.
    const uint32_t w_smem = v.a + Shape::kABytes, tail_smem = v.b + Shape::kBBytes;
    const ColScales<kTailRows> cols =
        load_col_scales<kTailRows>(v.b_scale - kTailRows * 4, threadIdx.x % 32);
    float part[Shape::kAccRegs];
#pragma unroll
    for (int g = 0; g < kNumBGroups; ++g) {
      float tail_part[kTailRegs];
      issue_block_mma<kTailRows>(w_smem + g * Shape::kBGroupBytes, tail_smem, tail_part);
      issue_block_mma<kWgN>(v.a, v.b + g * Shape::kBGroupBytes, part);
      ptx::wgmma_wait<1>();
      ptx::fence_operands(tail_part);
      promote_cols(cols, v.b_scales[g], tail_part, tail_acc[g]);
      ptx::wgmma_wait<0>();
      ptx::fence_operands(part);
      if (g == kNumBGroups - 1) release(v.slot, warp_leader);
      promote(v.a_scales, v.b_scales[g], part, acc[g]);
    }
  }

  // Gather warp gw's tokens (kGatherWarpBytes), after the tails' master accumulators.
  __device__ uint32_t gather_tokens_addr(int gw) const {
    return ptx::smem_addr(ring_.a(0)) + kGatherTokensOffset + gw * kGatherWarpBytes<kTailRows>;
  }

  // Math thread i's tail master accumulator (kTailAccBytes): quad q at + q * kNumMathThreads * 16.
  __device__ uint32_t tail_acc_addr(int math_thread) const {
    return ptx::smem_addr(ring_.a(0)) + kTailAccOffset + math_thread * 16;
  }
  __device__ __forceinline__ static void load_tail_acc(uint32_t master, TailAccum& acc) {
#pragma unroll
    for (int q = 0; q < kTailQuads; ++q)
      ptx::ld_shared_v4(master + q * kNumMathThreads * 16,
                        &acc[q * 4 / kTailRegs][q * 4 % kTailRegs]);
  }
  __device__ __forceinline__ static void store_tail_acc(uint32_t master, const TailAccum& acc) {
#pragma unroll
    for (int q = 0; q < kTailQuads; ++q)
      ptx::st_shared_v4(master + q * kNumMathThreads * 16,
                        &acc[q * 4 / kTailRegs][q * 4 % kTailRegs]);
  }

  // Lone block, LoneSplit::kOneGroupEach: warpgroup wg takes B group wg whole, into `acc` (the
  // caller passes its first accumulator).
  __device__ __forceinline__ void mma_lone_group(uint32_t a_smem, uint32_t b_smem, int wg,
                                                 const RowScales& a_scales, float b_scale,
                                                 Accum<kWgN>& acc, int slot, bool warp_leader) {
    float part[Shape::kAccRegs];
    issue_block_mma<kWgN>(a_smem, b_smem + wg * Shape::kBGroupBytes, part);
    ptx::wgmma_wait<0>();
    ptx::fence_operands(part);
    release(slot, warp_leader);
    promote(a_scales, b_scale, part, acc);
  }

  // Lone block, LoneSplit::kHalfOfEachGroup: warpgroup wg takes half wg of every B group, into
  // the first half of that group's accumulator, through one half-width partial per group
  // (together the registers of the paired path's one partial). The groups' wgmma chain across
  // K blocks: group g of block kb + 1 is issued as soon as group g of block kb is promoted, so
  // the warpgroup has a group in flight while it promotes the other, at a K block's boundary
  // too. (Waiting for both groups at the end of each block left the tensor cores a gap there,
  // at the same moment in both warpgroups, which start every block on the same barrier: a
  // lone K block cost 0.77 of a paired one for half its math.) Slot kb is released once
  // group 1 of block kb is done: after group 0 of block kb + 1 is issued when that block's
  // stage has landed, else before the wait for it (at small M the weight stream sets the rate,
  // and a slot held through the wait is a stage the producer cannot fill).
  __device__ __forceinline__ void lone_halves_loop(int& slot, uint32_t& phase, int block, int wg,
                                                   int t, TileAccum<kWgN>& acc, bool warp_leader) {
    static_assert(kNumBGroups == 2, "one partial per B group");
    constexpr int kHalfN = kWgN / 2;
    float part0[TileShape<kHalfN>::kAccRegs], part1[TileShape<kHalfN>::kAccRegs];
    const StageAddrs at(ring_, full_, block, t);
    const uint32_t b_half = wg * kHalfN * kBlockK;
    const int n = num_kb();
    StageView v = at.view(slot);
    issue_block_mma<kHalfN>(v.a, v.b + b_half, part0);
    issue_block_mma<kHalfN>(v.a, v.b + b_half + Shape::kBGroupBytes, part1);
    // Group 1 of v's block, once nothing younger runs: promoted, its slot handed back.
    const auto drain_group1 = [&](int held) {
      ptx::wgmma_wait<0>();
      ptx::fence_operands(part1);
      release(held, warp_leader);
      promote(v.a_scales, v.b_scales[1], part1, acc[1]);
    };
    for (int kb = 0;;) {
      ptx::wgmma_wait<1>();
      ptx::fence_operands(part0);
      promote(v.a_scales, v.b_scales[0], part0, acc[0]);
      const int held = slot;
      advance(slot, phase);
      if (++kb == n) {
        drain_group1(held);
        break;
      }
      if (!at.test_full(slot, phase)) {
        // The next stage has not landed (the weight stream sets the rate, as at small M):
        // hand this one back before waiting rather than hold it through the wait.
        drain_group1(held);
        at.wait_full(slot, phase);
        v = at.view(slot);
        issue_block_mma<kHalfN>(v.a, v.b + b_half, part0);
        issue_block_mma<kHalfN>(v.a, v.b + b_half + Shape::kBGroupBytes, part1);
        continue;
      }
      const StageView next = at.view(slot);
      issue_block_mma<kHalfN>(next.a, next.b + b_half, part0);
      ptx::wgmma_wait<1>();
      ptx::fence_operands(part1);
      release(held, warp_leader);
      promote(v.a_scales, v.b_scales[1], part1, acc[1]);
      issue_block_mma<kHalfN>(next.a, next.b + b_half + Shape::kBGroupBytes, part1);
      v = next;
    }
  }

  // Recomputed where used: a member would be held across the role split and spilled.
  __device__ int num_kb() const { return op_.k / kBlockK; }
  __device__ TileScheduler scheduler() const {
    return TileScheduler(op_, min(*num_blocks_, max_blocks_), order_record());
  }

  __device__ __forceinline__ void release(int slot, bool warp_leader) {
    __syncwarp();
    if (warp_leader) ptx::mbarrier_arrive(&empty_[slot]);
  }

  Ring ring_;
  uint64_t* full_;
  uint64_t* empty_;
  uint64_t* desc_;
  int* claims_;  // claimed tiles (scheduler/sm90_grouped_tiles.cuh), or null: static order
  GemmOperands op_;
  const int32_t* num_blocks_;
  int max_blocks_;
  const CUtensorMap* tma_a_;
  const CUtensorMap* tma_a_pair_;
  const CUtensorMap* tma_b_;
  const CUtensorMap* tma_tail_;
};

}  // namespace jax_megamoe::sm90
