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

// Source rank s's tokens for this call: its staging (the stage kernel's copy, ids outside
// [0, E) stored as -1), or with one rank, where nothing is staged, the call's own inputs (raw
// ids: every reader tests unsigned(id - first expert) against its expert count, which rejects
// both).
struct TokenSource {
  int num_tokens;
  const int32_t* ids;
  const float* weights;
  const uint4* x;
  const float* x_scale;

  // Token t's fp8 row: `vecs` 16-byte vectors (hidden / 16).
  __device__ __forceinline__ const uint4* row(int t, int vecs) const {
    return x + size_t(t) * vecs;
  }
};

__device__ __forceinline__ TokenSource token_source(const KernelArgs& a, int s) {
  if (a.num_ranks == 1) {
    return {a.num_tokens, a.topk_ids, a.topk_weights, reinterpret_cast<const uint4*>(a.x),
            a.x_scale};
  }
  uint8_t* src = peer_base(a, s);
  const WorkspaceLayout& l = a.layout;
  return {header_of(src, l)->staged_tokens, at<int32_t>(src, l.topk_ids),
          at<float>(src, l.topk_weights), at<uint4>(src, l.x), at<float>(src, l.x_scale)};
}

}  // namespace jax_megamoe::sm90
