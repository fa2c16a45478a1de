// Host entry points of the per-call runtime (csrc/launch/runtime.cu), called by the FFI layer.
// Plain C++ types only, so ffi/ builds with the host compiler.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "jax_megamoe/constants.h"
#include "jax_megamoe/layout/workspace.h"

namespace jax_megamoe {

struct MegaMoeArgs {
  WorkspaceConfig config;
  int rank;
  int sm_budget;  // SMs this op may occupy; every grid, spinning ones included, is sized to it
  // sm_budget is every SM: L2 may then start on the SMs L1 leaves (launch_mega_moe), where with
  // a smaller budget its waiting CTAs would take SMs the budget leaves to other work.
  bool whole_device;
  void* workspace;  // this rank's base; peers are reached through the header's peer table

  int num_tokens;  // M of this rank, <= config.max_tokens
  const void* x;   // [M, H] e4m3, 16-byte aligned
  const float* x_scale;
  const int32_t* topk_ids;
  const float* topk_weights;
  const void* w1;
  const float* w1_scale;
  const void* w2;
  const float* w2_scale;
  void* y;  // [M, H] bf16, 16-byte aligned
  float activation_clamp;
  // Device scalar: the call's index along the expert axis, checked on the device against `rank`.
  const int32_t* expected_rank;
  // Test hook (ffi/mega_moe.cc, inject_launch_failure): L1's launch is replaced by one that
  // fails (an empty grid: cudaErrorInvalidValue under CUDA 13), as a launch between the two
  // syncs might.
  bool fail_l1_launch;
};

// Enqueues one call's kernels on `stream`: no host sync, allocation or module loading.
cudaError_t launch_mega_moe(const MegaMoeArgs& args, cudaStream_t stream);

// Loads every runtime and GEMM kernel on the current device and sets their attributes, so that
// launch_mega_moe never triggers lazy module loading (a process-wide operation that can deadlock
// against a peer kernel spinning on this device's flags).
cudaError_t prepare_runtime_kernels();

}  // namespace jax_megamoe
