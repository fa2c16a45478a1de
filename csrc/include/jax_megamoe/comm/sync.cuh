// The cross-rank barrier of one phase (dispatch or combine), run by a single thread on each
// rank's stream: publish this rank's status and release its flag into every rank's workspace,
// then wait for every rank's flag in its own and read their statuses. It also decides whether
// the call runs (HeaderFixed::call_state) and records why not (comm/error_record.h).
// csrc/launch/runtime.cu launches it as steps 2 and 7 of each call and argues there why the
// protocol cannot deadlock, aborted calls included. A workspace with no peers (R = 1) launches
// neither: its route_count kernel decides the call (open_call_alone).
#pragma once

#include <cstdint>

#include "jax_megamoe/comm/error_record.h"
#include "jax_megamoe/comm/flags.cuh"
#include "jax_megamoe/layout/workspace.h"

namespace jax_megamoe::comm {

// Records this workspace's first error (later ones are dropped: the first is the cause) into the
// host-mapped record, and sets the sticky error_code that makes every later call skip.
__device__ __forceinline__ void record_error(HeaderFixed* header, ErrorCode code, Phase phase,
                                             int peer, uint64_t epoch, uint64_t seen,
                                             int32_t expected_rank, int32_t cuda_error = 0) {
  if (atomicCAS(&header->error_code, kErrorNone, code) != kErrorNone) return;
  volatile ErrorRecord* record = header->error;
  record->epoch = epoch;
  record->seen = seen;
  record->rank = header->rank;
  record->phase = int32_t(phase);
  record->peer = peer;
  record->expected_rank = expected_rank;
  if (cuda_error != 0) record->cuda_error = cuda_error;  // else it stays as allocated: 0
  // The host reads the fields once it sees the code.
  __threadfence_system();
  record->code = code;
  __threadfence_system();
}

// Publishes `status` into every rank's `statuses[rank]`, then `epoch` into its `flags[rank]`.
__device__ __forceinline__ void publish(uint8_t* ws, const WorkspaceLayout& l, int rank,
                                        int num_ranks, size_t flags, size_t statuses,
                                        uint64_t epoch, int32_t status) {
  uint8_t* const* peers = at<uint8_t*>(ws, l.peer_base);
  for (int d = 0; d < num_ranks; ++d)
    st_relaxed_sys(at<int32_t>(peers[d], statuses) + rank, status);
  // Cumulative with everything this stream did before: the stage kernel's stores (dispatch), or
  // this rank's L2 stores into every peer's combine buffer (combine); and the statuses above.
  __threadfence_system();
  for (int d = 0; d < num_ranks; ++d) st_release_sys(at<uint64_t>(peers[d], flags) + rank, epoch);
}

// Waits until every rank's entry of this rank's `flags` holds `epoch`. On a timeout records the
// first late rank and marks the call timed out; returns whether every rank arrived.
__device__ __forceinline__ bool wait_or_time_out(uint8_t* ws, HeaderFixed* header, size_t flags,
                                                 int rank, int num_ranks, Phase phase,
                                                 uint64_t epoch) {
  uint64_t seen = 0;
  const int late = wait_all_ranks(at<uint64_t>(ws, flags), num_ranks, epoch, header->timeout_ns,
                                  rank, phase_name(int32_t(phase)), &seen);
  if (late < 0) return true;
  record_error(header, kErrorTimeout, phase, late, epoch, seen, -1);
  header->call_state = kCallTimedOut;
  return false;
}

// Opens the call's epoch (dispatch opens it, combine closes the same one) and returns it, or 0
// when the workspace failed before: the handler refuses such a workspace, and calls enqueued
// before that (later layers of the same program, graph replays) are skipped.
__device__ __forceinline__ uint64_t open_epoch(HeaderFixed* header) {
  if (header->error_code != kErrorNone) {
    header->call_state = kCallSkipped;
    return 0;
  }
  const uint64_t epoch = header->epoch + 1;
  header->epoch = epoch;
  return epoch;
}

// The dispatch phase's last step: the call runs only if rank s ran it as axis index s, for every
// s; otherwise it is aborted and the first mismatch recorded.
__device__ __forceinline__ void decide_call(HeaderFixed* header, uint64_t epoch,
                                            const int32_t* indices, int num_ranks) {
  for (int s = 0; s < num_ranks; ++s) {
    const int32_t ran_as = ld_relaxed_sys(indices + s);
    if (ran_as != s) {
      record_error(header, kErrorDeviceOrder, Phase::kDispatch, s, epoch, 0, ran_as);
      header->call_state = kCallAborted;
      return;
    }
  }
  header->call_state = kCallRun;
}

// The dispatch phase of a workspace with no peers (R = 1), run by one thread of route_count
// instead of epoch_sync_kernel's two launches (runtime.cu): nothing to publish or wait for, only
// the epoch and the call's index, which must be 0.
__device__ __forceinline__ void open_call_alone(HeaderFixed* header, const int32_t* expected_rank) {
  if (const uint64_t epoch = open_epoch(header); epoch != 0) {
    decide_call(header, epoch, expected_rank, 1);
  }
}

// `expected_rank` (read by the dispatch phase): the call's index along the expert axis
// (lax.axis_index), a device scalar; it must equal `rank`, the workspace's rank, or tokens would
// go to the wrong peers.
__global__ void epoch_sync_kernel(uint8_t* ws, WorkspaceLayout l, int rank, int num_ranks,
                                  Phase phase, const int32_t* expected_rank) {
  HeaderFixed* header = header_of(ws, l);
  if (phase == Phase::kDispatch) {
    const uint64_t epoch = open_epoch(header);
    if (epoch == 0) return;
    publish(ws, l, rank, num_ranks, l.dispatch_flag, l.dispatch_status, epoch, *expected_rank);
    if (!wait_or_time_out(ws, header, l.dispatch_flag, rank, num_ranks, phase, epoch)) return;
    // Every rank reads every rank's index, so a wrong device order aborts the call everywhere:
    // a rank that went on alone would compute with misrouted tokens from its peers.
    decide_call(header, epoch, at<int32_t>(ws, l.dispatch_status), num_ranks);
    return;
  }

  const int32_t state = header->call_state;
  if (state == kCallSkipped) return;  // no epoch was opened: nothing to close
  const uint64_t epoch = header->epoch;
  // A rank that did no work still releases, so no peer waits for it in vain, and tells the
  // peers so: they got no rows from it.
  publish(ws, l, rank, num_ranks, l.combine_flag, l.combine_status, epoch, state);
  // Having timed out once, this rank's output is NaN whatever comes: waiting again would only
  // stall it for another timeout.
  if (state == kCallTimedOut) return;
  if (!wait_or_time_out(ws, header, l.combine_flag, rank, num_ranks, phase, epoch)) return;
  if (state != kCallRun) return;  // aborted at dispatch: the cause is recorded already
  const int32_t* states = at<int32_t>(ws, l.combine_status);
  for (int s = 0; s < num_ranks; ++s) {
    if (ld_relaxed_sys(states + s) != kCallRun) {
      record_error(header, kErrorPeerAborted, phase, s, epoch, 0, -1);
      header->call_state = kCallAborted;
      return;
    }
  }
}

// Launched only when a launch between this rank's dispatch and combine syncs returned an error
// (runtime.cu, close_failed_call), just before the combine sync: the call becomes aborted, so
// that sync tells every peer this rank sent no rows and they abort at once (kErrorPeerAborted)
// instead of waiting out their timeout for rows that will not come. A call that was not running
// (skipped, timed out, aborted at dispatch) has its cause recorded already.
__global__ void launch_failed_kernel(uint8_t* ws, WorkspaceLayout l, int32_t cuda_error) {
  HeaderFixed* header = header_of(ws, l);
  if (header->call_state != kCallRun) return;
  record_error(header, kErrorLaunchFailed, Phase::kCombine, header->rank, header->epoch, 0, -1,
               cuda_error);
  header->call_state = kCallAborted;
}

}  // namespace jax_megamoe::comm
