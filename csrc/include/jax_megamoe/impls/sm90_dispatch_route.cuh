// Dispatch steps 3 and 4, run by each rank over every rank's staging once the dispatch sync has
// passed: route_count lays out this rank's kExpertAlignM-aligned expert segments of the pool,
// route_fill claims one pool row per slot routed here and pulls the token's fp8 row and scales
// from the source rank's staging into it. With one rank and few tokens, route_alone does both in
// one launch (runtime.cu chooses).
#pragma once

#include <cstdint>
#include <cub/block/block_scan.cuh>

#include "jax_megamoe/comm/sync.cuh"
#include "jax_megamoe/constants.h"
#include "jax_megamoe/impls/runtime_args.cuh"

namespace jax_megamoe::sm90 {

// 16-byte vectors each lane keeps in flight while pulling a token row from a peer.
constexpr int kPullUnroll = 4;

// Whether this call runs. With peers the dispatch sync decided it (call_state). With one rank
// there is no sync launch: this kernel's first thread opens the call (comm::open_call_alone),
// and every thread reaches the same answer from what that thread reads. A wrong axis index
// fails the call whether or not error_code was set yet; a failed workspace fails it anyway.
__device__ __forceinline__ bool call_runs(const KernelArgs& a, HeaderFixed* header) {
  if (a.num_ranks > 1) return header->call_state == kCallRun;
  if (blockIdx.x == 0 && threadIdx.x == 0) comm::open_call_alone(header, a.expected_rank);
  return *static_cast<volatile int32_t*>(&header->error_code) == kErrorNone &&
         *a.expected_rank == a.rank;
}

// A call that does not run gives L1 and L2 no row blocks, and zeroes their tile counters as a
// call that runs does: each of their CTAs still claims once, and on a failed workspace whose
// skipped calls go on (graph replays) the counters would otherwise grow by the grid every call.
__device__ __forceinline__ void skip_gemms(RouteScalars* scalars) {
  scalars->num_blocks = 0;
  scalars->l1_claims = 0;
  scalars->l2_claims = 0;
}

// Lays out the expert segments from the slots per local expert (`counts`, shared memory): the
// first row block of each expert's kExpertAlignM-aligned segment into `first_block` (shared
// memory). Returns the number of row blocks. Every thread of the block calls it.
template <class BlockScan>
__device__ int lay_out_segments(typename BlockScan::TempStorage& scan_storage,
                                const int32_t* counts, int32_t* first_block, int num_local) {
  constexpr int kAlignBlocks = kExpertAlignM / kBlockM;
  int total_blocks = 0;
  for (int base = 0; base < num_local; base += kThreads) {
    const int e = base + threadIdx.x;
    const int count = e < num_local ? counts[e] : 0;
    const int segment_blocks = (count + kExpertAlignM - 1) / kExpertAlignM * kAlignBlocks;
    int first, chunk_blocks;
    BlockScan(scan_storage).ExclusiveSum(segment_blocks, first, chunk_blocks);
    if (e < num_local) first_block[e] = total_blocks + first;
    total_blocks += chunk_blocks;
    __syncthreads();
  }
  return total_blocks;
}

// Writes the part of the segment layout that L1 and L2 read, split into `parts` shares of which
// this block writes share `part`: per row block its expert (block_expert) and a zero stored-tile
// count (block_stored), and row_src = -1 on the padding rows of each expert's segment.
__device__ void publish_segments(const KernelArgs& a, const int32_t* counts,
                                 const int32_t* first_block, int total_blocks, int part,
                                 int parts) {
  const WorkspaceLayout& l = a.layout;
  const int num_local = a.local_experts;
  const int first = part * kThreads + threadIdx.x;
  const int stride = parts * kThreads;
  int32_t* block_expert = at<int32_t>(a.ws, l.block_expert);
  int32_t* block_stored = at<int32_t>(a.ws, l.block_stored);
  for (int b = first; b < total_blocks; b += stride) {
    block_stored[b] = 0;  // L1 counts this call's stored tiles from here (L1Params)
    // The last expert whose segment starts at or before b owns b (empty segments share their
    // start with the next expert, which is later, so they are never picked).
    int lo = 0, hi = num_local - 1;
    while (lo < hi) {
      const int mid = (lo + hi + 1) / 2;
      if (first_block[mid] <= b) {
        lo = mid;
      } else {
        hi = mid - 1;
      }
    }
    // A block past the expert's rows holds only padding: no GEMM work, never stored.
    const bool holds_rows = (b - first_block[lo]) * kBlockM < counts[lo];
    block_expert[b] = holds_rows ? lo : -1;
  }

  int32_t* row_src = at<int32_t>(a.ws, l.row_src);
  for (int i = first; i < num_local * kExpertAlignM; i += stride) {
    const int e = i / kExpertAlignM;
    const int row = counts[e] + i % kExpertAlignM;  // within the expert's segment
    if (row < (counts[e] + kExpertAlignM - 1) / kExpertAlignM * kExpertAlignM) {
      row_src[first_block[e] * kBlockM + row] = -1;
    }
  }
}

// Counts slots routed to this rank per local expert; the last block to finish turns the counts
// into kExpertAlignM-aligned segments. Dynamic shared memory: 2 * local_experts ints.
// Counters: expert_count and count_done are zero when it starts (zero-filled at creation, and
// its last block zeroes them again once read); the last block also zeroes expert_fill and the
// GEMMs' tile counters for this call's route_fill, L1 and L2. A call that does not run leaves
// them all zero.
__global__ void __launch_bounds__(kThreads) route_count_kernel(KernelArgs a) {
  using BlockScan = cub::BlockScan<int, kThreads>;
  __shared__ typename BlockScan::TempStorage scan_storage;
  __shared__ bool is_last_block;
  extern __shared__ int32_t smem[];
  int32_t* counts = smem;                         // per-block histogram, then the global counts
  int32_t* first_block = smem + a.local_experts;  // first row block of each expert's segment

  const WorkspaceLayout& l = a.layout;
  if (!call_runs(a, header_of(a.ws, l))) {  // aborted or skipped: no rows, so L1/L2 do nothing
    if (blockIdx.x == 0 && threadIdx.x == 0) skip_gemms(at<RouteScalars>(a.ws, l.route_scalars));
    return;
  }
  const int num_local = a.local_experts;
  const int first_expert = a.rank * num_local;
  for (int e = threadIdx.x; e < num_local; e += kThreads) counts[e] = 0;
  __syncthreads();

  for (int s = 0; s < a.num_ranks; ++s) {
    const TokenSource src = token_source(a, s);
    const int num_slots = src.num_tokens * a.topk;
    const int32_t* ids = src.ids;
    for (int i = blockIdx.x * kThreads + threadIdx.x; i < num_slots; i += gridDim.x * kThreads) {
      const unsigned e = unsigned(ids[i] - first_expert);
      if (e < unsigned(num_local)) atomicAdd(&counts[e], 1);
    }
  }
  __syncthreads();

  int32_t* expert_count = at<int32_t>(a.ws, l.expert_count);
  for (int e = threadIdx.x; e < num_local; e += kThreads) {
    if (counts[e] != 0) atomicAdd(&expert_count[e], counts[e]);
  }
  __threadfence();
  __syncthreads();
  RouteScalars* scalars = at<RouteScalars>(a.ws, l.route_scalars);
  if (threadIdx.x == 0) is_last_block = atomicAdd(&scalars->count_done, 1u) == gridDim.x - 1;
  __syncthreads();
  if (!is_last_block) return;
  if (threadIdx.x == 0) {
    scalars->count_done = 0;
    scalars->l1_claims = 0;
    scalars->l2_claims = 0;
  }

  int32_t* expert_fill = at<int32_t>(a.ws, l.expert_fill);
  for (int e = threadIdx.x; e < num_local; e += kThreads) {
    // L2 reads: the other blocks' atomics never went through this SM's L1.
    counts[e] = __ldcg(expert_count + e);
    expert_count[e] = 0;  // for the next call
    expert_fill[e] = 0;   // for this call's route_fill
  }
  __syncthreads();
  const int total_blocks =
      lay_out_segments<BlockScan>(scan_storage, counts, first_block, num_local);
  int32_t* expert_offset = at<int32_t>(a.ws, l.expert_offset);
  for (int e = threadIdx.x; e < num_local; e += kThreads) {
    expert_offset[e] = first_block[e] * kBlockM;
  }
  if (threadIdx.x == 0) scalars->num_blocks = total_blocks;
  publish_segments(a, counts, first_block, total_blocks, 0, 1);
}

// One pass of a team over a token row: this thread's kPullUnroll 16-byte vectors from column c0.
template <int kTeamThreads>
__device__ __forceinline__ void load_row_pass(const uint4* x_row, int vecs, int c0,
                                              uint4 (&v)[kPullUnroll]) {
#pragma unroll
  for (int u = 0; u < kPullUnroll; ++u) {
    if (c0 + u * kTeamThreads < vecs) v[u] = x_row[c0 + u * kTeamThreads];
  }
}

// Writes token t of `src` (its fp8 row and scales) into the n pool rows listed in `rows`: a team
// of kTeamThreads threads, `tid` this thread's index in it, `v` its first pass over the row
// (load_row_pass at c0 = tid), loaded by the caller as early as it could. One read of the row
// (over NVLink at R > 1), however many of its slots landed on this rank.
template <int kTeamThreads>
__device__ __forceinline__ void copy_token_rows(const KernelArgs& a, const TokenSource& src, int t,
                                                const int32_t* rows, int n, int tid,
                                                uint4 (&v)[kPullUnroll]) {
  const WorkspaceLayout& l = a.layout;
  const int vecs = a.hidden / 16;
  const int scales = a.hidden / kQuantBlock;
  uint4* pool = at<uint4>(a.ws, l.pool_a);
  float* pool_scale = at<float>(a.ws, l.pool_a_scale);
  const uint4* x_row = src.row(t, vecs);
  for (int c0 = tid; c0 < vecs; c0 += kTeamThreads * kPullUnroll) {
    if (c0 != tid) load_row_pass<kTeamThreads>(x_row, vecs, c0, v);
    for (int j = 0; j < n; ++j) {
      uint4* dst = pool + size_t(rows[j]) * vecs;
#pragma unroll
      for (int u = 0; u < kPullUnroll; ++u) {
        if (c0 + u * kTeamThreads < vecs) dst[c0 + u * kTeamThreads] = v[u];
      }
    }
  }
  for (int c = tid; c < scales; c += kTeamThreads) {
    const float v = src.x_scale[size_t(t) * scales + c];
    for (int j = 0; j < n; ++j) pool_scale[size_t(rows[j]) * scales + c] = v;
  }
}

// One team of kTeamWarps warps per (source rank, token): its first warp claims the token's rows,
// then the whole team copies the row into each. A warp per token keeps many tokens in flight at
// large M; at small M a whole block per token spreads the copies over as many SMs as there are
// tokens instead of leaving them to the warps of one block (runtime.cu chooses).
// Row claims are atomic, so row order within a segment varies run to run; results do not, since
// GEMM rows never mix and each row has one output slot.
template <int kTeamWarps>
__global__ void __launch_bounds__(kThreads) route_fill_kernel(KernelArgs a) {
  static_assert(kTeamWarps == 1 || kTeamWarps == kWarps, "a team is one warp or the block");
  constexpr int kTeams = kWarps / kTeamWarps;
  constexpr int kTeamThreads = kTeamWarps * 32;
  __shared__ int32_t claimed_rows[kTeams][kMaxTopk];
  __shared__ int32_t claimed_count[kTeams];
  const WorkspaceLayout& l = a.layout;
  if (header_of(a.ws, l)->call_state != kCallRun) return;  // aborted or skipped: pull nothing
  const int lane = threadIdx.x % 32;
  const int team_in_block = threadIdx.x / kTeamThreads;
  const int tid = threadIdx.x % kTeamThreads;  // thread within the team
  const bool claimer = tid < 32;
  int32_t* rows = claimed_rows[team_in_block];
  const int team = blockIdx.x * kTeams + team_in_block;
  const int num_teams = gridDim.x * kTeams;
  const auto team_sync = [] {
    if constexpr (kTeamWarps == 1) {
      __syncwarp();
    } else {
      __syncthreads();
    }
  };
  const int num_local = a.local_experts;
  const int first_expert = a.rank * num_local;

  const int32_t* expert_offset = at<int32_t>(a.ws, l.expert_offset);
  int32_t* expert_fill = at<int32_t>(a.ws, l.expert_fill);
  int32_t* row_src = at<int32_t>(a.ws, l.row_src);
  float* row_weight = at<float>(a.ws, l.row_weight);

  for (int s = 0; s < a.num_ranks; ++s) {
    const TokenSource src = token_source(a, s);
    for (int t = team; t < src.num_tokens; t += num_teams) {
      if (claimer) {
        const size_t slot = size_t(t) * a.topk + lane;
        const int32_t id = lane < a.topk ? src.ids[slot] : -1;
        const unsigned e = unsigned(id - first_expert);
        const bool mine = e < unsigned(num_local);
        const unsigned mask = __ballot_sync(~0u, mine);
        if (mine) {
          const int row = expert_offset[e] + atomicAdd(&expert_fill[e], 1);
          row_src[row] = (s * a.max_tokens + t) * a.topk + lane;
          row_weight[row] = src.weights[slot];
          rows[__popc(mask & ((1u << lane) - 1))] = row;
        }
        if (lane == 0) claimed_count[team_in_block] = __popc(mask);
      }
      team_sync();
      const int n = claimed_count[team_in_block];
      if (n > 0) {
        const int vecs = a.hidden / 16;
        uint4 v[kPullUnroll];
        load_row_pass<kTeamThreads>(src.row(t, vecs), vecs, tid, v);
        copy_token_rows<kTeamThreads>(a, src, t, rows, n, tid, v);
      }
      team_sync();  // the next token's claims overwrite rows
    }
  }
}

// Slot ids each thread of route_alone loads before it counts any: the loads of one pass are all
// in flight together (a load per count put M x K / 256 latencies in a row: at M = 512 the kernel
// took 17.6 us against 16.3 for route_count + route_fill).
constexpr int kCountUnroll = 16;

// route_alone's pass over the slot ids from slot i0: this thread's kCountUnroll ids, and an id
// below `first_expert` (no local expert) past the last slot.
__device__ __forceinline__ void load_id_pass(const int32_t* ids, int num_slots, int i0,
                                             int first_expert, int32_t (&id)[kCountUnroll]) {
#pragma unroll
  for (int u = 0; u < kCountUnroll; ++u) {
    const int i = i0 + u * kThreads;
    id[u] = i < num_slots ? ids[i] : first_expert - 1;
  }
}

// route_count and route_fill in one launch, for one rank (R = 1, nothing staged) while each
// token can have a block (runtime.cu chooses): block t takes token t. Every block counts all the
// call's slots itself (M x K ids, a few KB read from L2) and lays out the same segments, and
// ranks its token's slots after the earlier tokens' slots of the same expert, so it knows its
// rows without an atomic, a counter or another block. Each block publishes a share of the layout
// (publish_segments); block 0 the scalars. Rows within a segment are in (token, k) order, the
// same every call. With kCopyRows the block copies its token's row and scales into each of its
// pool rows; without, it copies nothing and L1 reads the token's row itself (L1Params::x;
// runtime.cu chooses). Reads are issued before the decision to run and before the count, so
// their latencies overlap: inputs are read whatever the call state, nothing is written unless it
// runs.
// Dynamic shared memory: 3 * local_experts ints. Touches none of route_count's counters, which
// stay zero for a later call that takes the two-launch path.
template <bool kCopyRows>
__global__ void __launch_bounds__(kThreads) route_alone_kernel(KernelArgs a) {
  using BlockScan = cub::BlockScan<int, kThreads>;
  __shared__ typename BlockScan::TempStorage scan_storage;
  __shared__ int32_t claimed_rows[kMaxTopk];
  __shared__ int32_t claimed_count;
  extern __shared__ int32_t smem[];
  const int num_local = a.local_experts;
  int32_t* counts = smem;                       // slots per local expert
  int32_t* earlier = smem + num_local;          // of those, slots of tokens before token t
  int32_t* first_block = smem + 2 * num_local;  // first row block of each expert's segment

  const WorkspaceLayout& l = a.layout;
  const int first_expert = a.rank * num_local;
  const TokenSource src = token_source(a, 0);
  const int t = blockIdx.x;
  const bool has_token = t < src.num_tokens;  // M = 0 still gets one block, for the layout
  const int first_slot = t * a.topk;
  const int lane = threadIdx.x % 32;
  const bool claimer = threadIdx.x < 32 && lane < a.topk && has_token;
  const int32_t my_id = claimer ? src.ids[first_slot + lane] : first_expert - 1;
  const float my_weight = claimer ? src.weights[first_slot + lane] : 0.0f;
  const int vecs = a.hidden / 16;
  uint4 v[kPullUnroll];
  if (kCopyRows && has_token) {
    load_row_pass<kThreads>(src.row(t, vecs), vecs, threadIdx.x, v);
  }
  const int num_slots = src.num_tokens * a.topk;
  int32_t id[kCountUnroll];
  load_id_pass(src.ids, num_slots, threadIdx.x, first_expert, id);

  RouteScalars* scalars = at<RouteScalars>(a.ws, l.route_scalars);
  if (!call_runs(a, header_of(a.ws, l))) {  // aborted or skipped: no rows, so L1/L2 do nothing
    if (blockIdx.x == 0 && threadIdx.x == 0) skip_gemms(scalars);
    return;
  }
  for (int e = threadIdx.x; e < num_local; e += kThreads) counts[e] = earlier[e] = 0;
  __syncthreads();
  for (int i0 = threadIdx.x; i0 < num_slots; i0 += kCountUnroll * kThreads) {
    if (i0 != threadIdx.x) load_id_pass(src.ids, num_slots, i0, first_expert, id);
#pragma unroll
    for (int u = 0; u < kCountUnroll; ++u) {
      const unsigned e = unsigned(id[u] - first_expert);
      if (e < unsigned(num_local)) {
        atomicAdd(&counts[e], 1);
        if (i0 + u * kThreads < first_slot) atomicAdd(&earlier[e], 1);
      }
    }
  }
  __syncthreads();
  const int total_blocks =
      lay_out_segments<BlockScan>(scan_storage, counts, first_block, num_local);
  if (blockIdx.x == 0 && threadIdx.x == 0) {
    scalars->num_blocks = total_blocks;
    scalars->l1_claims = 0;
    scalars->l2_claims = 0;
  }
  publish_segments(a, counts, first_block, total_blocks, blockIdx.x, gridDim.x);
  if (!has_token) return;

  if (threadIdx.x < 32) {
    const unsigned e = unsigned(my_id - first_expert);
    const bool mine = claimer && e < unsigned(num_local);
    const unsigned mask = __ballot_sync(~0u, mine);
    const unsigned same = __match_any_sync(~0u, my_id);  // a repeated id takes the next row
    const unsigned lower = (1u << lane) - 1;
    if (mine) {
      const int row = first_block[e] * kBlockM + earlier[e] + __popc(same & lower);
      at<int32_t>(a.ws, l.row_src)[row] = first_slot + lane;
      at<float>(a.ws, l.row_weight)[row] = my_weight;
      if constexpr (kCopyRows) claimed_rows[__popc(mask & lower)] = row;
    }
    if (kCopyRows && lane == 0) claimed_count = __popc(mask);
  }
  if constexpr (kCopyRows) {
    __syncthreads();
    if (claimed_count > 0) {
      copy_token_rows<kThreads>(a, src, t, claimed_rows, claimed_count, threadIdx.x, v);
    }
  }
}

}  // namespace jax_megamoe::sm90
