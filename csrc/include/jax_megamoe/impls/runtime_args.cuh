// What every per-call runtime kernel (stage, route, combine; launched by csrc/launch/runtime.cu)
// receives: the call's scalars and pointers and this rank's workspace layout, by value.
#pragma once

#include <cstdint>

#include "jax_megamoe/layout/workspace.h"

namespace jax_megamoe::sm90 {

// Block size of the runtime kernels; their grids are grid-stride, sized by the launcher.
constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

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
  const int32_t* expected_rank;  // the call's axis index (a device scalar)
};

// Base of rank s's workspace, from the peer table that connect_workspace uploaded.
__device__ __forceinline__ uint8_t* peer_base(const KernelArgs& a, int s) {
  return at<uint8_t*>(a.ws, a.layout.peer_base)[s];
}

}  // namespace jax_megamoe::sm90
