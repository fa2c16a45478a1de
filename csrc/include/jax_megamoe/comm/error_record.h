// The error record of one workspace (one per buffer and device): what the sync kernels write when
// a call fails on this rank, instead of trapping (a trap is a sticky CUDA error that kills the
// process's context). It lives in host-mapped pinned memory, so the host reads it with a plain
// load and no sync: the FFI handler refuses the next call on the buffer, and
// SymmBuffer.check() raises (ffi/error_record.cc formats both messages). Plain C++ (host and
// device compilers).
#pragma once

#include <cstdint>

#include "jax_megamoe/host_device.h"

namespace jax_megamoe {

enum ErrorCode : int32_t {
  kErrorNone = 0,
  // The call's axis index on some rank differs from that rank's workspace rank: the buffer was
  // made for another device order than the mesh the call runs under.
  kErrorDeviceOrder = 1,
  // A cross-rank wait ran past the workspace's timeout.
  kErrorTimeout = 2,
  // A peer failed this call (timed out, had failed before, or a launch failed there) and sent
  // this rank no rows.
  kErrorPeerAborted = 3,
  // A kernel launch between this rank's dispatch and combine syncs returned an error (the FFI
  // handler returned it to XLA too); the rank closed the call so its peers abort at once.
  kErrorLaunchFailed = 4,
};

enum class Phase : int32_t {
  kDispatch = 0,  // after stage: peers may read this rank's staging
  kCombine = 1,   // after L2: this rank's rows are in every peer's combine buffer
};

// The phase as the error messages name it (device printf on a timeout, the host's exceptions).
JMM_HOST_DEVICE constexpr const char* phase_name(int32_t phase) {
  return phase == int32_t(Phase::kDispatch)  ? "dispatch"
         : phase == int32_t(Phase::kCombine) ? "combine"
                                             : "unknown";
}

// Written once per workspace, by one thread (the sync kernels of one rank run in stream order):
// the fields, a system fence, then `code`. A reader that sees code != 0 sees the fields too.
struct ErrorRecord {
  uint64_t epoch;         // the call that failed (calls issued on this rank, from 1)
  uint64_t seen;          // timeout: what the peer's flag held (its last published epoch)
  int32_t code;           // ErrorCode; written last
  int32_t rank;           // this workspace's rank
  int32_t phase;          // Phase
  int32_t peer;           // the rank waited for / that ran at the wrong index / that failed
  int32_t expected_rank;  // device order: the axis index `peer` ran as; else -1
  int32_t cuda_error;     // launch failure: the cudaError_t the launch returned; else 0
};

}  // namespace jax_megamoe
