// Per-call runtime: pull dispatch, the two GEMM launches (launch.h), push combine. The kernels
// live in impls/ (stage, route count/fill, combine, GEMMs) and comm/sync.cuh (the epoch sync that
// steps 2 and 7 run); this file holds their launch sequence and this protocol.
//
// Kernels enqueued on rank r's stream, identical on every rank:
//   1. stage           copy this call's x, x_scale, sanitized topk ids, weights and M into r's
//                      staging.
//   2. sync dispatch   one thread: epoch = ++header.epoch; write the call's axis index (the
//                      expected rank) into dispatch_status[r] of every peer; fence; release
//                      dispatch_flag[r] = epoch into every peer's header; then wait (acquire) for
//                      dispatch_flag[s] >= epoch of every s in r's own header, and read every
//                      dispatch_status[s]: the call runs only if each equals s.
//   3. route_count     count the slots of every rank's staged tokens that go to r's experts; the
//                      last block lays out kExpertAlignM-aligned expert segments (block_expert,
//                      num_blocks, row_src = -1 on padding rows) and zeroes the counters (the
//                      fill counts and GEMM tile counters for this call, its own for the next).
//   4. route_fill      per (source rank, token): claim one pool row per slot routed here, record
//                      row_src/row_weight, pull the token's fp8 row and scales from the source's
//                      staging once and write them into every claimed row.
//   5. L1, 6. L2       launch_l1 / launch_l2; L2 stores bf16 rows into the owning rank's combine
//                      slot [k][token] through the header's peer table of combine bases. With
//                      the whole device as budget, L2 is L1's programmatic dependent: its CTAs
//                      take the SMs L1's finished CTAs leave and start a tile once L1 has
//                      counted every N tile of its row blocks (block_stored, zeroed by
//                      route_count). No L1 CTA waits for L2, and every L1 CTA is resident
//                      before any L2 CTA starts, so these waits cannot deadlock.
//   7. sync combine    one thread: write r's call state into combine_status[r] of every peer;
//                      fence; release combine_flag[r] = epoch into every peer's header; wait for
//                      combine_flag[d] >= epoch of every d in r's own header, and read every
//                      combine_status[d]: a peer that did not run sent no rows.
//   8. combine         y[m] = bf16(sum over valid k, k = 0..K-1 in order, of f32(combine[k][m])).
//
// With one rank (R = 1) steps 1, 2 and 7 are not launched: there is no peer to stage for,
// publish to or wait for. route_count's first thread opens the epoch, checks the call's axis
// index (it must be 0) and sets the call state (comm::open_call_alone), and the route kernels and
// combine read the call's inputs (token_source). At M = 8 the three launches took ~11 µs of the
// layer's ~465. While each token can have a block, steps 3 and 4 are one launch, route_alone,
// whose first thread opens the call instead (route phase 9.7 -> 5.5 µs at M = 8). While the
// local experts average at most kGatherRowsPerExpert rows (constants.h), route_alone copies no
// row into the pool either: L1 reads each pool row's token row of x itself (L1Params::x), and the
// layer gains 7-12 µs at M <= 256 on DeepSeek-V3's shape. L1's gather warps keep up with blocks
// of a few rows but not with full ones: the gather lost at M = 320 under skewed routing and made
// L1 1.4x slower at M = 2048 (benchmarks/RESULTS.md, 2026-12-03), so fuller experts keep the pool.
//
// Only the two one-thread sync launches spin; the kernels after them are ordered behind the wait
// by the stream (the on-stream wait NVSHMEM uses), so no spinning grid ever competes for SMs with
// a peer's work, even when several ranks share one GPU.
//
// Why this cannot deadlock, and why buffer reuse is safe (calls n and n+1, any skew):
// - Each sync launch releases its own flags before it waits, and what it releases depends only on
//   earlier work of its own stream, never on a peer. So every rank's step-2 flags for epoch n
//   get published, every step-2 wait ends, every rank runs its L2 and publishes its step-7
//   flags, and every step-7 wait ends.
// - r's staging is rewritten by r's stage of call n+1, which follows r's combine wait of call n,
//   which needs combine_flag[d] = n from every d; d releases that after its own L2 of call n,
//   which follows d's route_fill of call n, the last reader of r's staging. Peers read r's
//   staged ids and M only in route_count/route_fill, so they never see a half-written staging.
// - r's combine buffer is written by d's L2 of call n+1, which follows d's dispatch wait of call
//   n+1, which needs dispatch_flag[r] = n+1, released after r's stage of call n+1, which follows
//   r's combine kernel of call n, the only reader of that buffer.
// - Pool, act and routing state of r are touched only by r's own stream.
// - Epochs: every rank increments its own counter once per call, so counters agree as long as
//   all ranks issue the same call sequence on the buffer; flags are compared with >= and never
//   reset, so a skewed (faster) peer's newer value still satisfies an older wait.
// - Statuses: a status is stored before its flag's release and read after the flag's acquire,
//   and no peer can publish call n+1's status before r has read call n's (a dispatch status
//   needs r's combine flag of call n, a combine status r's dispatch flag of call n+1; r releases
//   each after those reads), so r reads exactly call n's statuses.
//
// Aborted calls (HeaderFixed::call_state; the first cause goes to the host-mapped error record,
// comm/error_record.h, which the handler and SymmBuffer.check() turn into exceptions):
// - Device order. Every rank reads every rank's axis index after the same dispatch wait, so
//   all of them see the same mismatch and abort the same call. An aborted call still runs both
//   syncs in full, so the epochs stay in step and no peer waits in vain; it does no routing or
//   GEMM work (route_count publishes num_blocks = 0, route_fill returns) and combine writes NaN.
//   No rank reads a peer's staging or writes a peer's combine buffer in that call, so the reuse
//   arguments above hold trivially. Every rank records the error, so from then on the buffer
//   is refused and skipped on every rank alike, as after a timeout (below).
// - Timeout. A wait that passes the header's timeout records the error and returns: r does no
//   further work in the call (combine writes NaN) and waits no more. It still releases its
//   combine flag, with its state as the status, so a late peer is not left waiting and learns
//   that r sent it no rows: that peer aborts too (kErrorPeerAborted) instead of summing an
//   incomplete combine. After a timeout the epochs may disagree, so the protocol above no
//   longer holds for this buffer: the record is sticky, the handler refuses every later call,
//   and calls already enqueued (graph replays, later layers) find error_code set and skip
//   everything, stage included, so a late peer still reads r's staging of the failed call
//   intact. A skipped call publishes nothing; a peer that waits for it times out and fails too,
//   after at most one timeout. The buffer must be closed and created anew.
// - Launch failure. A launch of steps 3-6 that returns an error comes after r's dispatch sync,
//   when the peers already count on r's rows. r then launches launch_failed_kernel, which records
//   the error and marks the call aborted, and its combine sync (close_failed_call), and returns
//   the error to XLA: the epochs stay in step, the peers abort at once (kErrorPeerAborted) and
//   their output is NaN, and r's buffer is refused from then on, as after a timeout. Not covered,
//   so the peers wait out their timeout: a failed launch of the stage or a sync kernel (before
//   the dispatch sync's release, or the combine sync itself), a fault inside a running kernel
//   (it leaves the CUDA context unusable), and a failure under stream capture (the capture is
//   discarded: nothing of the call runs on r).
#include "jax_megamoe/comm/sync.cuh"
#include "jax_megamoe/impls/runtime_args.cuh"
#include "jax_megamoe/impls/sm90_combine.cuh"
#include "jax_megamoe/impls/sm90_dispatch_route.cuh"
#include "jax_megamoe/impls/sm90_dispatch_stage.cuh"
#include "jax_megamoe/launch.h"
#include "jax_megamoe/layout/workspace.h"
#include "jax_megamoe/runtime.h"

namespace jax_megamoe {
namespace {

using comm::epoch_sync_kernel;
using sm90::combine_kernel;
using sm90::KernelArgs;
using sm90::kThreads;
using sm90::kWarps;
using sm90::route_alone_kernel;
using sm90::route_count_kernel;
using sm90::route_fill_kernel;
using sm90::stage_kernel;

// At most kRouteBlocksPerSm blocks per budgeted SM (constants.h).
int grid_for(size_t work_items, int items_per_block, int sm_budget) {
  const size_t blocks = (work_items + items_per_block - 1) / items_per_block;
  const size_t cap = size_t(sm_budget) * kRouteBlocksPerSm;
  return int(blocks < 1 ? 1 : blocks > cap ? cap : blocks);
}

// Dynamic shared memory of the route kernels: route_count keeps two ints per local expert,
// route_alone three. A launch gets 48 KiB of shared memory, static and dynamic together, unless
// its kernel opts in to more: route_count stays under that at kMaxLocalExperts (32 KiB + ~1.2 KiB
// static), route_alone does not (48 KiB + ~1.3 KiB static), so prepare_runtime_kernels raises
// its limit to what kMaxLocalExperts needs.
size_t route_count_smem_bytes(int local_experts) {
  return 2 * size_t(local_experts) * sizeof(int32_t);
}
size_t route_alone_smem_bytes(int local_experts) {
  return 3 * size_t(local_experts) * sizeof(int32_t);
}

// L1's parameters for this call; with `gather`, A is read from the tokens' own rows.
L1Params l1_params(const MegaMoeArgs& args, const WorkspaceLayout& l, bool gather) {
  const WorkspaceConfig& c = args.config;
  uint8_t* ws = static_cast<uint8_t*>(args.workspace);
  L1Params p1{};
  p1.row_weight = at<float>(ws, l.row_weight);
  p1.row_src = at<int32_t>(ws, l.row_src);
  p1.block_expert = at<int32_t>(ws, l.block_expert);
  p1.num_blocks = &at<RouteScalars>(ws, l.route_scalars)->num_blocks;
  p1.w1 = static_cast<const uint8_t*>(args.w1);
  p1.w1_scale = args.w1_scale;
  p1.act = at<uint8_t>(ws, l.act);
  p1.act_scale = at<float>(ws, l.act_scale);
  p1.num_experts = l.local_experts;
  p1.hidden = c.hidden;
  p1.intermediate = c.intermediate;
  p1.max_blocks = l.max_blocks;
  p1.clamp = args.activation_clamp;
  p1.num_ctas = args.sm_budget * gemm_ctas_per_sm();
  p1.tile_claims = &at<RouteScalars>(ws, l.route_scalars)->l1_claims;
  // L2 overlaps L1's last tiles: a programmatic dependent that waits per row block.
  p1.block_stored = args.whole_device ? at<int32_t>(ws, l.block_stored) : nullptr;
  if (gather) {
    p1.x = static_cast<const uint8_t*>(args.x);
    p1.x_scale = args.x_scale;
    p1.topk = c.topk;
  } else {
    p1.a = at<uint8_t>(ws, l.pool_a);
    p1.a_scale = at<float>(ws, l.pool_a_scale);
  }
  return p1;
}

// L2's parameters for this call, reading what L1 (p1) writes.
L2Params l2_params(const MegaMoeArgs& args, const WorkspaceLayout& l, const L1Params& p1) {
  const WorkspaceConfig& c = args.config;
  uint8_t* ws = static_cast<uint8_t*>(args.workspace);
  L2Params p2{};
  p2.act = p1.act;
  p2.act_scale = p1.act_scale;
  p2.row_src = p1.row_src;
  p2.block_expert = p1.block_expert;
  p2.num_blocks = p1.num_blocks;
  p2.w2 = static_cast<const uint8_t*>(args.w2);
  p2.w2_scale = args.w2_scale;
  p2.combine = at<uint16_t*>(ws, l.combine_base);
  p2.num_experts = l.local_experts;
  p2.hidden = c.hidden;
  p2.intermediate = c.intermediate;
  p2.topk = c.topk;
  p2.max_tokens = c.max_tokens;
  p2.max_blocks = l.max_blocks;
  p2.num_ctas = p1.num_ctas;
  p2.tile_claims = &at<RouteScalars>(ws, l.route_scalars)->l2_claims;
  p2.block_stored = p1.block_stored;
  p2.l1_n_tiles = c.intermediate / kQuantBlock;
  return p2;
}

// A launch between this rank's dispatch and combine syncs returned `err` (an error the launch
// reports, not a fault of a running kernel, which leaves the context unusable). Its kernels
// enqueued before it still run. The peers count on this rank's combine sync: launched after
// launch_failed_kernel, which records the error and marks the call aborted, it tells them that
// this rank sent no rows, so they abort with kErrorPeerAborted at once instead of waiting out
// their timeout. No combine: the handler returns `err`, so XLA fails the call and y is never
// read. Under stream capture (XLA command buffers) the failed capture is discarded with these two
// launches, nothing of the call runs on this rank, and the peers time out as for a missing rank.
// Errors of these launches are dropped: `err` is the cause.
void close_failed_call(uint8_t* ws, const WorkspaceLayout& l, const MegaMoeArgs& args,
                       cudaError_t err, cudaStream_t stream) {
  cudaGetLastError();  // clear a launch error left set, so it is not reported again elsewhere
  comm::launch_failed_kernel<<<1, 1, 0, stream>>>(ws, l, int32_t(err));
  epoch_sync_kernel<<<1, 1, 0, stream>>>(ws, l, args.rank, args.config.num_ranks, Phase::kCombine,
                                         args.expected_rank);
  cudaGetLastError();
}

}  // namespace

cudaError_t launch_mega_moe(const MegaMoeArgs& args, cudaStream_t stream) {
  const WorkspaceConfig& c = args.config;
  const WorkspaceLayout l = WorkspaceLayout::make(c);
  uint8_t* ws = static_cast<uint8_t*>(args.workspace);
  const int m = args.num_tokens;

  KernelArgs k{};
  k.layout = l;
  k.ws = ws;
  k.rank = args.rank;
  k.num_ranks = c.num_ranks;
  k.num_experts = c.num_experts;
  k.local_experts = l.local_experts;
  k.hidden = c.hidden;
  k.topk = c.topk;
  k.max_tokens = c.max_tokens;
  k.num_tokens = m;
  k.x = static_cast<const uint8_t*>(args.x);
  k.x_scale = args.x_scale;
  k.topk_ids = args.topk_ids;
  k.topk_weights = args.topk_weights;
  k.y = static_cast<uint16_t*>(args.y);
  k.expected_rank = args.expected_rank;
  const bool peers = c.num_ranks > 1;  // else no sync launches (see above)

  // Peers may stage a different M; size the pull grids for the case where all match.
  const size_t all_tokens = size_t(c.num_ranks) * m;
  const int budget = args.sm_budget;

  // A block per token while the tokens do not fill the budget's blocks, else a warp per token.
  const bool block_per_token = all_tokens <= size_t(budget) * kRouteBlocksPerSm;
  const bool alone = !peers && block_per_token;  // steps 3 and 4 in one launch
  const bool gather =
      alone && all_tokens * c.topk <= size_t(kGatherRowsPerExpert) * l.local_experts;

  const L1Params p1 = l1_params(args, l, gather);
  const L2Params p2 = l2_params(args, l, p1);

  cudaError_t err;
  // The GEMMs' tensor maps are encoded before the first launch, so that an encoding error
  // returns before any peer counts on this rank (a failed launch is handled below).
  GemmTensorMaps maps1, maps2;
  if ((err = encode_l1(p1, &maps1)) != cudaSuccess || (err = encode_l2(p2, &maps2)) != cudaSuccess)
    return err;

  // Tests: y and the regions this call's kernels fill (pool, act, combine: the workspace's last
  // regions) start as NaN. At R > 1 peers write this rank's combine rows only after its dispatch
  // flag, which the sync kernel publishes after this, and wrote the last call's before its
  // combine sync, so the fill races with no write.
  if ((err = poison(args.y, size_t(m) * c.hidden * sizeof(uint16_t), stream)) != cudaSuccess ||
      (err = poison(ws + l.pool_a, l.total_bytes - l.pool_a, stream)) != cudaSuccess) {
    return err;
  }
  if (peers) {
    stage_kernel<<<grid_for(size_t(m) * c.hidden / 16, kThreads, budget), kThreads, 0, stream>>>(k);
    if ((err = cudaGetLastError()) != cudaSuccess) return err;
    epoch_sync_kernel<<<1, 1, 0, stream>>>(ws, l, args.rank, c.num_ranks, Phase::kDispatch,
                                           args.expected_rank);
    if ((err = cudaGetLastError()) != cudaSuccess) return err;
  }
  // Steps 3 to 6. Their launches follow this rank's dispatch sync, so the peers now count on its
  // combine sync: if one of them returns an error, close_failed_call still closes the call.
  const auto route_and_gemms = [&]() -> cudaError_t {
    if (alone) {
      const int grid = grid_for(all_tokens, 1, budget);
      const size_t smem = route_alone_smem_bytes(l.local_experts);
      if (gather) {
        route_alone_kernel<false><<<grid, kThreads, smem, stream>>>(k);
      } else {
        route_alone_kernel<true><<<grid, kThreads, smem, stream>>>(k);
      }
    } else {
      route_count_kernel<<<grid_for(all_tokens * c.topk, kThreads, budget), kThreads,
                           route_count_smem_bytes(l.local_experts), stream>>>(k);
      if (cudaError_t e = cudaGetLastError(); e != cudaSuccess) return e;
      if (block_per_token) {
        route_fill_kernel<kWarps><<<grid_for(all_tokens, 1, budget), kThreads, 0, stream>>>(k);
      } else {
        route_fill_kernel<1><<<grid_for(all_tokens, kWarps, budget), kThreads, 0, stream>>>(k);
      }
    }
    if (cudaError_t e = cudaGetLastError(); e != cudaSuccess) return e;
    if (args.fail_l1_launch) {  // the test hook: a launch that fails as a real one can
      combine_kernel<<<0, kThreads, 0, stream>>>(k);  // an empty grid: CUDA 13 refuses it
      return cudaGetLastError();
    }
    if (cudaError_t e = launch_l1(p1, maps1, stream); e != cudaSuccess) return e;
    return launch_l2(p2, maps2, stream);
  };
  if ((err = route_and_gemms()) != cudaSuccess) {
    if (peers) close_failed_call(ws, l, args, err, stream);
    return err;
  }

  if (peers) {
    epoch_sync_kernel<<<1, 1, 0, stream>>>(ws, l, args.rank, c.num_ranks, Phase::kCombine,
                                           args.expected_rank);
    if ((err = cudaGetLastError()) != cudaSuccess) return err;
  }
  combine_kernel<<<grid_for(size_t(m) * c.hidden / (8 * sm90::kCombineVecs), kThreads, budget),
                   kThreads, 0, stream>>>(k);
  return cudaGetLastError();
}

cudaError_t prepare_runtime_kernels() {
  for (const void* kernel : {reinterpret_cast<const void*>(route_alone_kernel<false>),
                             reinterpret_cast<const void*>(route_alone_kernel<true>)}) {
    const int bytes = int(route_alone_smem_bytes(kMaxLocalExperts));
    if (cudaError_t err =
            cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
        err != cudaSuccess) {
      return err;
    }
  }
  // cudaFuncGetAttributes loads the kernel's module on the current device (CUDA lazy loading
  // would otherwise do it inside the first execute).
  const void* kernels[] = {
      reinterpret_cast<const void*>(stage_kernel),
      reinterpret_cast<const void*>(epoch_sync_kernel),
      reinterpret_cast<const void*>(comm::launch_failed_kernel),
      reinterpret_cast<const void*>(route_alone_kernel<false>),
      reinterpret_cast<const void*>(route_alone_kernel<true>),
      reinterpret_cast<const void*>(route_count_kernel),
      reinterpret_cast<const void*>(route_fill_kernel<1>),
      reinterpret_cast<const void*>(route_fill_kernel<kWarps>),
      reinterpret_cast<const void*>(combine_kernel),
  };
  for (const void* kernel : kernels) {
    cudaFuncAttributes attributes;
    if (cudaError_t err = cudaFuncGetAttributes(&attributes, kernel); err != cudaSuccess) {
      return err;
    }
  }
  return prepare_gemm_kernels();
}

}  // namespace jax_megamoe
