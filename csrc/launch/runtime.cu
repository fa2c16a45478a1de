// Per-call runtime: pull dispatch, the two GEMM launches (launch.h), push combine.
//
// Kernels enqueued on rank r's stream, identical on every rank:
//   1. stage           copy this call's x, x_scale, sanitized topk ids, weights and M into r's
//                      staging; reset r's routing counters.
//   2. sync_dispatch   one thread: epoch = ++header.epoch; fence; release dispatch_flag[r] = epoch
//                      into every peer's header; then wait (acquire) for dispatch_flag[s] >= epoch
//                      of every s in r's own header.
//   3. route_count     count the slots of every rank's staged tokens that go to r's experts; the
//                      last block lays out kBlockM-aligned expert segments (block_expert,
//                      num_blocks, row_src = -1 on padding rows).
//   4. route_fill      per (source rank, token): claim one pool row per slot routed here, record
//                      row_src/row_weight, pull the token's fp8 row and scales from the source's
//                      staging once and write them into every claimed row.
//   5. L1, 6. L2       launch_l1 / launch_l2; L2 stores bf16 rows into the owning rank's combine
//                      slot [k][token] through the header's peer table of combine bases.
//   7. sync_combine    one thread: fence; release combine_flag[r] = epoch into every peer's
//                      header; wait for combine_flag[d] >= epoch of every d in r's own header.
//   8. combine         y[m] = bf16(sum over valid k, k = 0..K-1 in order, of f32(combine[k][m])).
//
// Only the two one-thread sync kernels spin; the kernels after them are ordered behind the wait
// by the stream (the on-stream wait NVSHMEM uses), so no spinning grid ever competes for SMs with
// a peer's work, even when several ranks share one GPU.
//
// Why this cannot deadlock, and why buffer reuse is safe (calls n and n+1, any skew):
// - Each sync kernel releases its own flags before it waits, and what it releases depends only on
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
#include <cuda_bf16.h>

#include <cub/block/block_scan.cuh>

#include "jax_megamoe/comm/flags.cuh"
#include "jax_megamoe/launch.h"
#include "jax_megamoe/layout/workspace.h"
#include "jax_megamoe/runtime.h"

namespace jax_megamoe {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
// Blocks per budgeted SM of the grid-stride kernels: enough resident warps to cover NVLink and
// HBM latency without needing the whole device.
constexpr int kBlocksPerSm = 4;
// 16-byte vectors each lane keeps in flight while pulling a token row from a peer.
constexpr int kPullUnroll = 4;

struct KernelArgs {
  WorkspaceLayout layout;
  uint8_t* ws;
  int rank;
  int num_ranks;
  int num_experts;
  int local_experts;
  int hidden;
  int topk;
  int max_tokens;
  int num_tokens;
  const uint8_t* x;
  const float* x_scale;
  const int32_t* topk_ids;
  const float* topk_weights;
  uint16_t* y;
};

template <typename T>
__host__ __device__ __forceinline__ T* at(uint8_t* base, size_t offset) {
  return reinterpret_cast<T*>(base + offset);
}

__device__ __forceinline__ uint8_t* peer_base(const KernelArgs& a, int s) {
  return at<uint8_t*>(a.ws, a.layout.peer_base)[s];
}

__device__ __forceinline__ HeaderFixed* header_of(uint8_t* base, const WorkspaceLayout& l) {
  return at<HeaderFixed>(base, l.header);
}

__global__ void __launch_bounds__(kThreads) stage_kernel(KernelArgs a) {
  const WorkspaceLayout& l = a.layout;
  if (blockIdx.x == 0) {
    for (int e = threadIdx.x; e < a.local_experts; e += kThreads) {
      at<int32_t>(a.ws, l.expert_count)[e] = 0;
      at<int32_t>(a.ws, l.expert_fill)[e] = 0;
    }
    if (threadIdx.x == 0) {
      header_of(a.ws, l)->staged_tokens = a.num_tokens;
      at<RouteScalars>(a.ws, l.route_scalars)->count_done = 0;
    }
  }
  const size_t stride = size_t(gridDim.x) * kThreads;
  const size_t first = size_t(blockIdx.x) * kThreads + threadIdx.x;

  const size_t x_vecs = size_t(a.num_tokens) * a.hidden / 16;
  const uint4* x_src = reinterpret_cast<const uint4*>(a.x);
  uint4* x_dst = at<uint4>(a.ws, l.x);
  for (size_t i = first; i < x_vecs; i += stride) x_dst[i] = x_src[i];

  const size_t num_scales = size_t(a.num_tokens) * (a.hidden / kQuantBlock);
  float* scale_dst = at<float>(a.ws, l.x_scale);
  for (size_t i = first; i < num_scales; i += stride) scale_dst[i] = a.x_scale[i];

  // An id outside [0, E) belongs to no rank, so no L2 will write its combine slot: store it as
  // -1 (masked) so this rank's combine and every peer's routing agree on which slots were sent.
  const size_t num_slots = size_t(a.num_tokens) * a.topk;
  int32_t* ids_dst = at<int32_t>(a.ws, l.topk_ids);
  float* weights_dst = at<float>(a.ws, l.topk_weights);
  for (size_t i = first; i < num_slots; i += stride) {
    const int32_t id = a.topk_ids[i];
    ids_dst[i] = unsigned(id) < unsigned(a.num_experts) ? id : -1;
    weights_dst[i] = a.topk_weights[i];
  }
}

__global__ void sync_dispatch_kernel(KernelArgs a) {
  const WorkspaceLayout& l = a.layout;
  HeaderFixed* header = header_of(a.ws, l);
  const uint64_t epoch = header->epoch + 1;
  header->epoch = epoch;
  // Cumulative with the stage kernel's stores, which precede this kernel in stream order.
  __threadfence_system();
  for (int d = 0; d < a.num_ranks; ++d) {
    comm::st_release_sys(at<uint64_t>(peer_base(a, d), l.dispatch_flag) + a.rank, epoch);
  }
  comm::wait_all_ranks(at<uint64_t>(a.ws, l.dispatch_flag), a.num_ranks, epoch, header->timeout_ns,
                       a.rank, "dispatch");
}

__global__ void sync_combine_kernel(KernelArgs a) {
  const WorkspaceLayout& l = a.layout;
  HeaderFixed* header = header_of(a.ws, l);
  const uint64_t epoch = header->epoch;
  // Cumulative with this rank's L2 stores into every peer's combine buffer.
  __threadfence_system();
  for (int s = 0; s < a.num_ranks; ++s) {
    comm::st_release_sys(at<uint64_t>(peer_base(a, s), l.combine_flag) + a.rank, epoch);
  }
  comm::wait_all_ranks(at<uint64_t>(a.ws, l.combine_flag), a.num_ranks, epoch, header->timeout_ns,
                       a.rank, "combine");
}

// Counts slots routed to this rank per local expert; the last block to finish turns the counts
// into kBlockM-aligned segments. Dynamic shared memory: 2 * local_experts ints.
__global__ void __launch_bounds__(kThreads) route_count_kernel(KernelArgs a) {
  using BlockScan = cub::BlockScan<int, kThreads>;
  __shared__ typename BlockScan::TempStorage scan_storage;
  __shared__ bool is_last_block;
  extern __shared__ int32_t smem[];
  int32_t* counts = smem;                         // per-block histogram, then the global counts
  int32_t* first_block = smem + a.local_experts;  // first row block of each expert's segment

  const WorkspaceLayout& l = a.layout;
  const int num_local = a.local_experts;
  const int first_expert = a.rank * num_local;
  for (int e = threadIdx.x; e < num_local; e += kThreads) counts[e] = 0;
  __syncthreads();

  for (int s = 0; s < a.num_ranks; ++s) {
    uint8_t* src = peer_base(a, s);
    const int num_slots = header_of(src, l)->staged_tokens * a.topk;
    const int32_t* ids = at<int32_t>(src, l.topk_ids);
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

  int32_t* expert_offset = at<int32_t>(a.ws, l.expert_offset);
  int total_blocks = 0;
  for (int base = 0; base < num_local; base += kThreads) {
    const int e = base + threadIdx.x;
    // L2 reads: the other blocks' atomics never went through this SM's L1.
    const int count = e < num_local ? __ldcg(expert_count + e) : 0;
    int first, chunk_blocks;
    BlockScan(scan_storage).ExclusiveSum((count + kBlockM - 1) / kBlockM, first, chunk_blocks);
    if (e < num_local) {
      counts[e] = count;
      first_block[e] = total_blocks + first;
      expert_offset[e] = (total_blocks + first) * kBlockM;
    }
    total_blocks += chunk_blocks;
    __syncthreads();
  }
  if (threadIdx.x == 0) scalars->num_blocks = total_blocks;

  int32_t* block_expert = at<int32_t>(a.ws, l.block_expert);
  for (int b = threadIdx.x; b < total_blocks; b += kThreads) {
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
    block_expert[b] = lo;
  }

  int32_t* row_src = at<int32_t>(a.ws, l.row_src);
  for (int i = threadIdx.x; i < num_local * kBlockM; i += kThreads) {
    const int e = i / kBlockM;
    const int row = counts[e] + i % kBlockM;  // within the expert's segment
    if (row < (counts[e] + kBlockM - 1) / kBlockM * kBlockM) {
      row_src[first_block[e] * kBlockM + row] = -1;
    }
  }
}

// One warp per (source rank, token): row claims are atomic, so row order within a segment
// varies run to run; results do not, since GEMM rows never mix and each row has one output slot.
__global__ void __launch_bounds__(kThreads) route_fill_kernel(KernelArgs a) {
  __shared__ int32_t claimed_rows[kWarps][kMaxTopk];
  const WorkspaceLayout& l = a.layout;
  const int lane = threadIdx.x % 32;
  int32_t* rows = claimed_rows[threadIdx.x / 32];
  const int warp = blockIdx.x * kWarps + threadIdx.x / 32;
  const int num_warps = gridDim.x * kWarps;
  const int num_local = a.local_experts;
  const int first_expert = a.rank * num_local;
  const int vecs = a.hidden / 16;
  const int scales = a.hidden / kQuantBlock;

  const int32_t* expert_offset = at<int32_t>(a.ws, l.expert_offset);
  int32_t* expert_fill = at<int32_t>(a.ws, l.expert_fill);
  int32_t* row_src = at<int32_t>(a.ws, l.row_src);
  float* row_weight = at<float>(a.ws, l.row_weight);
  uint4* pool = at<uint4>(a.ws, l.pool_a);
  float* pool_scale = at<float>(a.ws, l.pool_a_scale);

  for (int s = 0; s < a.num_ranks; ++s) {
    uint8_t* src = peer_base(a, s);
    const int num_tokens = header_of(src, l)->staged_tokens;
    const int32_t* ids = at<int32_t>(src, l.topk_ids);
    const float* weights = at<float>(src, l.topk_weights);
    const uint4* x = at<uint4>(src, l.x);
    const float* x_scale = at<float>(src, l.x_scale);

    for (int t = warp; t < num_tokens; t += num_warps) {
      const size_t slot = size_t(t) * a.topk + lane;
      const int32_t id = lane < a.topk ? ids[slot] : -1;
      const unsigned e = unsigned(id - first_expert);
      const bool mine = e < unsigned(num_local);
      const unsigned mask = __ballot_sync(~0u, mine);
      if (mask == 0) continue;
      if (mine) {
        const int row = expert_offset[e] + atomicAdd(&expert_fill[e], 1);
        row_src[row] = (s * a.max_tokens + t) * a.topk + lane;
        row_weight[row] = weights[slot];
        rows[__popc(mask & ((1u << lane) - 1))] = row;
      }
      __syncwarp();
      const int n = __popc(mask);

      // One pull of the token over NVLink, however many of its slots landed on this rank.
      const uint4* x_row = x + size_t(t) * vecs;
      for (int c0 = lane; c0 < vecs; c0 += 32 * kPullUnroll) {
        uint4 v[kPullUnroll];
#pragma unroll
        for (int u = 0; u < kPullUnroll; ++u) {
          if (c0 + u * 32 < vecs) v[u] = x_row[c0 + u * 32];
        }
        for (int j = 0; j < n; ++j) {
          uint4* dst = pool + size_t(rows[j]) * vecs;
#pragma unroll
          for (int u = 0; u < kPullUnroll; ++u) {
            if (c0 + u * 32 < vecs) dst[c0 + u * 32] = v[u];
          }
        }
      }
      for (int c = lane; c < scales; c += 32) {
        const float v = x_scale[size_t(t) * scales + c];
        for (int j = 0; j < n; ++j) pool_scale[size_t(rows[j]) * scales + c] = v;
      }
      __syncwarp();
    }
  }
}

// Fixed summation order over k and no atomics: bitwise identical output run after run.
__global__ void __launch_bounds__(kThreads) combine_kernel(KernelArgs a) {
  const WorkspaceLayout& l = a.layout;
  const int vecs = a.hidden / 8;  // 8 bf16 per 16-byte vector
  const uint4* combine = at<uint4>(a.ws, l.combine);
  const int32_t* ids = at<int32_t>(a.ws, l.topk_ids);
  uint4* y = reinterpret_cast<uint4*>(a.y);

  for (int m = blockIdx.x; m < a.num_tokens; m += gridDim.x) {
    // Slots masked in the sanitized staging were sent nowhere: their combine rows are stale.
    unsigned valid = 0;
    for (int k = 0; k < a.topk; ++k) valid |= unsigned(ids[size_t(m) * a.topk + k] >= 0) << k;

    for (int c = threadIdx.x; c < vecs; c += kThreads) {
      float acc[8] = {};
      for (int k = 0; k < a.topk; ++k) {
        if (!(valid >> k & 1u)) continue;
        const uint4 v = combine[(size_t(k) * a.max_tokens + m) * vecs + c];
        const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&v);
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const float2 f = __bfloat1622float2(h[i]);
          acc[2 * i] += f.x;
          acc[2 * i + 1] += f.y;
        }
      }
      uint4 out;
      __nv_bfloat162* o = reinterpret_cast<__nv_bfloat162*>(&out);
#pragma unroll
      for (int i = 0; i < 4; ++i) o[i] = __floats2bfloat162_rn(acc[2 * i], acc[2 * i + 1]);
      y[size_t(m) * vecs + c] = out;
    }
  }
}

int grid_for(size_t work_items, int items_per_block, int sm_budget) {
  const size_t blocks = (work_items + items_per_block - 1) / items_per_block;
  const size_t cap = size_t(sm_budget) * kBlocksPerSm;
  return int(blocks < 1 ? 1 : blocks > cap ? cap : blocks);
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

  // Peers may stage a different M; size the pull grids for the case where all match.
  const size_t all_tokens = size_t(c.num_ranks) * m;
  const int budget = args.sm_budget;

  cudaError_t err;
  stage_kernel<<<grid_for(size_t(m) * c.hidden / 16, kThreads, budget), kThreads, 0, stream>>>(k);
  if ((err = cudaGetLastError()) != cudaSuccess) return err;
  sync_dispatch_kernel<<<1, 1, 0, stream>>>(k);
  if ((err = cudaGetLastError()) != cudaSuccess) return err;
  route_count_kernel<<<grid_for(all_tokens * c.topk, kThreads, budget), kThreads,
                       2 * l.local_experts * sizeof(int32_t), stream>>>(k);
  if ((err = cudaGetLastError()) != cudaSuccess) return err;
  route_fill_kernel<<<grid_for(all_tokens, kWarps, budget), kThreads, 0, stream>>>(k);
  if ((err = cudaGetLastError()) != cudaSuccess) return err;

  const int num_ctas = budget * gemm_ctas_per_sm();
  L1Params p1{};
  p1.a = at<uint8_t>(ws, l.pool_a);
  p1.a_scale = at<float>(ws, l.pool_a_scale);
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
  p1.num_ctas = num_ctas;
  if ((err = launch_l1(p1, stream)) != cudaSuccess) return err;

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
  p2.num_ctas = num_ctas;
  if ((err = launch_l2(p2, stream)) != cudaSuccess) return err;

  sync_combine_kernel<<<1, 1, 0, stream>>>(k);
  if ((err = cudaGetLastError()) != cudaSuccess) return err;
  combine_kernel<<<grid_for(m, 1, budget), kThreads, 0, stream>>>(k);
  return cudaGetLastError();
}

cudaError_t prepare_runtime_kernels() {
  // cudaFuncGetAttributes loads the kernel's module on the current device (CUDA lazy loading
  // would otherwise do it inside the first execute).
  const void* kernels[] = {
      reinterpret_cast<const void*>(stage_kernel),
      reinterpret_cast<const void*>(sync_dispatch_kernel),
      reinterpret_cast<const void*>(route_count_kernel),
      reinterpret_cast<const void*>(route_fill_kernel),
      reinterpret_cast<const void*>(sync_combine_kernel),
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
