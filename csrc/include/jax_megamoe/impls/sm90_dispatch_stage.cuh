// Dispatch step 1 (stage), launched only where there are peers (R > 1): copies this call's x,
// x_scale, sanitized top-k ids and weights and M into this rank's staging, where every peer's
// route kernels read them (unless the workspace has failed: then the call is skipped, see
// comm/sync.cuh). With one rank the route kernels read the call's inputs instead.
#pragma once

#include <cstdint>

#include "jax_megamoe/constants.h"
#include "jax_megamoe/impls/runtime_args.cuh"

namespace jax_megamoe::sm90 {

__global__ void __launch_bounds__(kThreads) stage_kernel(KernelArgs a) {
  const WorkspaceLayout& l = a.layout;
  HeaderFixed* header = header_of(a.ws, l);
  // The workspace failed in an earlier call and this one will be skipped: leave the staging of
  // the failed call as it is, a late peer may still be reading it.
  if (header->error_code != kErrorNone) return;
  if (blockIdx.x == 0 && threadIdx.x == 0) header->staged_tokens = a.num_tokens;
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

}  // namespace jax_megamoe::sm90
