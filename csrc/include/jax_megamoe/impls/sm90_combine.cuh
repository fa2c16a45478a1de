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

// Fixed summation order over k and no atomics: bitwise identical output run after run.
__global__ void __launch_bounds__(kThreads) combine_kernel(KernelArgs a) {
  const WorkspaceLayout& l = a.layout;
  const int vecs = a.hidden / 8;  // 8 bf16 per 16-byte vector
  const uint4* combine = at<uint4>(a.ws, l.combine);
  const int32_t* ids = at<int32_t>(a.ws, l.topk_ids);
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

}  // namespace jax_megamoe::sm90
