#include "error_record.h"

#include <cuda_runtime_api.h>

namespace jax_megamoe {
namespace {

// "300", "2.5": seconds without trailing zeros.
std::string seconds_str(uint64_t ns) {
  if (ns % 1000000000u == 0) return std::to_string(ns / 1000000000u);
  std::string s = std::to_string(double(ns) * 1e-9);
  while (s.back() == '0') s.pop_back();
  if (s.back() == '.') s.pop_back();
  return s;
}

constexpr char kRecreate[] =
    " This buffer refuses every further call: close() it and create a new SymmBuffer.";

}  // namespace

ErrorRecord read_error_record(const ErrorRecord* record) {
  ErrorRecord copy{};
  // The kernel writes the fields, fences, then the code: fields read after an acquire of a
  // non-zero code are complete.
  copy.code = __atomic_load_n(&record->code, __ATOMIC_ACQUIRE);
  if (copy.code == kErrorNone) return copy;
  const volatile ErrorRecord* r = record;
  copy.epoch = r->epoch;
  copy.seen = r->seen;
  copy.rank = r->rank;
  copy.phase = r->phase;
  copy.peer = r->peer;
  copy.expected_rank = r->expected_rank;
  copy.cuda_error = r->cuda_error;
  return copy;
}

const char* error_kind(int32_t code) {
  switch (code) {
    case kErrorNone:
      return "none";
    case kErrorDeviceOrder:
      return "device_order";
    case kErrorTimeout:
      return "timeout";
    case kErrorPeerAborted:
      return "peer_aborted";
    case kErrorLaunchFailed:
      return "launch_failed";
    default:
      return "unknown";
  }
}

std::string error_record_message(const ErrorRecord& r, int64_t buffer_id, int device_ordinal,
                                 uint64_t timeout_ns) {
  const std::string peer = std::to_string(r.peer);
  std::string where = "SymmBuffer " + std::to_string(buffer_id) + " on device " +
                      std::to_string(device_ordinal) + " (rank " + std::to_string(r.rank) +
                      "), call " + std::to_string(r.epoch) + ", phase '" + phase_name(r.phase) +
                      "': ";
  switch (r.code) {
    case kErrorDeviceOrder:
      return where + "device order mismatch: rank " + peer +
             " of the buffer ran this call as index " + std::to_string(r.expected_rank) +
             " along the expert axis. The buffer was created for another order of the devices "
             "than the mesh the call runs under, so tokens would have gone to the wrong peers; "
             "the call was aborted on every rank and its output is NaN. Create the buffer with "
             "the mesh the call runs under: SymmBuffer.create(mesh, axis_name, ...) with the "
             "shard_map's mesh." +
             kRecreate;
    case kErrorTimeout:
      return where + "timed out after " + seconds_str(timeout_ns) + " s waiting for rank " + peer +
             " (its flag holds epoch " + std::to_string(r.seen) +
             "); its output is NaN. Every rank must issue the same sequence of "
             "fp8_mega_moe calls on a buffer; if rank " +
             peer +
             " is only slow (compiling, loading), raise the timeout with "
             "SymmBuffer.create(..., timeout_s=...) or JAX_MEGAMOE_TIMEOUT_S. The ranks' epochs "
             "may now disagree." +
             kRecreate;
    case kErrorPeerAborted:
      return where + "rank " + peer +
             " failed this call (it timed out, a kernel launch failed there, or it had failed "
             "before) and sent this rank no rows; its output is NaN. The cause is recorded on "
             "rank " +
             peer + "'s device (SymmBuffer.check() in the process that drives it)." + kRecreate;
    case kErrorLaunchFailed: {
      const cudaError_t err = static_cast<cudaError_t>(r.cuda_error);
      return where + "a kernel launch of this call failed on this rank (" + cudaGetErrorName(err) +
             ": " + cudaGetErrorString(err) +
             "); the FFI handler raised it, and the peers were told that this rank sent them "
             "no rows (their output is NaN)." +
             kRecreate;
    }
    default:
      return where + "unknown error code " + std::to_string(r.code) + "." + kRecreate;
  }
}

}  // namespace jax_megamoe
