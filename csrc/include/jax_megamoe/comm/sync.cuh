// The cross-rank barrier of one phase (dispatch or combine), run by a single thread on each
// rank's stream: release this rank's flag into every rank's workspace, then wait for every
// rank's flag in its own. csrc/launch/runtime.cu launches it as steps 2 and 7 of each call and
// argues there why the protocol cannot deadlock.
#pragma once

#include <cstdint>

#include "jax_megamoe/comm/flags.cuh"
#include "jax_megamoe/layout/workspace.h"

namespace jax_megamoe::comm {

enum class Phase : int {
  kDispatch,  // after stage: peers may read this rank's staging
  kCombine,   // after L2: this rank's rows are in every peer's combine buffer
};

__global__ void epoch_sync_kernel(uint8_t* ws, WorkspaceLayout l, int rank, int num_ranks,
                                  Phase phase) {
  const bool dispatch = phase == Phase::kDispatch;
  HeaderFixed* header = header_of(ws, l);
  // Dispatch opens the call's epoch; combine closes the same one.
  const uint64_t epoch = header->epoch + (dispatch ? 1 : 0);
  if (dispatch) header->epoch = epoch;
  const size_t flags = dispatch ? l.dispatch_flag : l.combine_flag;
  // Cumulative with everything this stream did before: the stage kernel's stores (dispatch), or
  // this rank's L2 stores into every peer's combine buffer (combine).
  __threadfence_system();
  uint8_t* const* peers = at<uint8_t*>(ws, l.peer_base);
  for (int d = 0; d < num_ranks; ++d) st_release_sys(at<uint64_t>(peers[d], flags) + rank, epoch);
  wait_all_ranks(at<uint64_t>(ws, flags), num_ranks, epoch, header->timeout_ns, rank,
                 dispatch ? "dispatch" : "combine");
}

}  // namespace jax_megamoe::comm
