// Combine (step 8): once every destination rank's L2 has stored its rows into this rank's
// combine slots and the combine sync has passed, sums each token's top-k rows into y; fills y
// with NaN instead when the call was aborted (comm/sync.cuh).
#pragma once

#include <cuda_bf16.h>

#include <cstdint>

#include "jax_megamoe/impls/runtime_args.cuh"

namespace jax_megamoe::sm90 {

// bf16 quiet NaN, twice per 32-bit word.
constexpr uint32_t kBf16NanPair = 0x7FC07FC0u;

// Combine rows a thread loads before it adds any.
constexpr int kCombineLoads = 8;
// 16-byte vectors of y per thread: two (32 contiguous bytes of each slot's row) made the kernel
// 12-17 % faster than one, within 5-7 % of XLA's own reduction over the same layout; four were
// slower than two (benchmarks/RESULTS.md, 2026-12-03).
constexpr int kCombineVecs = 2;

// Fixed summation order over k and no atomics: bitwise identical output run after run.
__global__ void __launch_bounds__(kThreads) combine_kernel(KernelArgs a) {
  const WorkspaceLayout& l = a.layout;
  const int vecs = a.hidden / 8;  // 8 bf16 per 16-byte vector
  const uint4* combine = at<uint4>(a.ws, l.combine);
  const int32_t* ids = token_source(a, a.rank).ids;  // staged, or the inputs at R = 1
  uint4* y = reinterpret_cast<uint4*>(a.y);

  // A call that did not run everywhere has no trustworthy row: every value is NaN, so nothing
  // downstream is silently wrong (the error record says why).
  if (header_of(a.ws, l)->call_state != kCallRun) {
    const uint4 nan = make_uint4(kBf16NanPair, kBf16NanPair, kBf16NanPair, kBf16NanPair);
    for (int m = blockIdx.x; m < a.num_tokens; m += gridDim.x) {
      for (int c = threadIdx.x; c < vecs; c += kThreads) y[size_t(m) * vecs + c] = nan;
    }
    return;
  }

  // One thread per kCombineVecs 16-byte vectors of y (hidden % 128 == 0, so a row holds a
  // whole number of them). Each issues the loads of up to kCombineLoads slots before it sums
  // any of them: with one load in flight per thread (the sum's loop over k) the kernel waited
  // out k memory latencies in a row, 16.5 us at M = 8 and 1.4x the HBM time at M = 8192. The
  // sum keeps k's order, so y is unchanged to the bit.
  const size_t num_vecs = size_t(a.num_tokens) * vecs;
  const size_t slot_stride = size_t(a.max_tokens) * vecs;
  for (size_t i = (size_t(blockIdx.x) * kThreads + threadIdx.x) * kCombineVecs; i < num_vecs;
       i += size_t(gridDim.x) * kThreads * kCombineVecs) {
    const size_t m = i / vecs;
    const uint4* slot = combine + i;  // [k][m][c]: slot k of this vector at k * slot_stride
    const int32_t* slot_ids = ids + m * a.topk;
    float acc[kCombineVecs][8] = {};
    for (int k0 = 0; k0 < a.topk; k0 += kCombineLoads) {
      // Every row is loaded, whatever its id says (a masked slot's row is stale but inside
      // the buffer; a k past topk reloads the last slot): a load that waited on its own id
      // would wait out one latency per slot again.
      uint4 v[kCombineLoads][kCombineVecs];
      int32_t id[kCombineLoads];
#pragma unroll
      for (int j = 0; j < kCombineLoads; ++j) {
        const int k = min(k0 + j, a.topk - 1);
#pragma unroll
        for (int u = 0; u < kCombineVecs; ++u) v[j][u] = slot[size_t(k) * slot_stride + u];
        id[j] = k0 + j < a.topk ? slot_ids[k] : -1;
      }
      // Slots with an id outside [0, E) (-1 in the staging) were sent nowhere: their rows are
      // not added.
#pragma unroll
      for (int j = 0; j < kCombineLoads; ++j) {
        if (unsigned(id[j]) >= unsigned(a.num_experts)) continue;
#pragma unroll
        for (int u = 0; u < kCombineVecs; ++u) {
          const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&v[j][u]);
#pragma unroll
          for (int q = 0; q < 4; ++q) {
            const float2 f = __bfloat1622float2(h[q]);
            acc[u][2 * q] += f.x;
            acc[u][2 * q + 1] += f.y;
          }
        }
      }
    }
#pragma unroll
    for (int u = 0; u < kCombineVecs; ++u) {
      uint4 out;
      __nv_bfloat162* o = reinterpret_cast<__nv_bfloat162*>(&out);
#pragma unroll
      for (int q = 0; q < 4; ++q) o[q] = __floats2bfloat162_rn(acc[u][2 * q], acc[u][2 * q + 1]);
      y[i + u] = out;
    }
  }
}

}  // namespace jax_megamoe::sm90
