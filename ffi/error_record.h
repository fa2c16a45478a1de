// Reading a workspace's device-side error record (comm/error_record.h) on the host, and the one
// message both the FFI handler (refusing the next call) and SymmBuffer.check() give for it.
#pragma once

#include <cstdint>
#include <string>

#include "jax_megamoe/comm/error_record.h"

namespace jax_megamoe {

// A copy of the record; code == kErrorNone while no error was recorded. A plain load with
// acquire ordering: no CUDA call, no sync, so execute may call it. It sees what kernels that
// have finished wrote.
ErrorRecord read_error_record(const ErrorRecord* record);

// "device_order", "timeout", "peer_aborted", "launch_failed" (phase names: comm/error_record.h's
// phase_name).
const char* error_kind(int32_t code);

// "SymmBuffer <id> on device <d> (rank <r>), call <epoch>, phase '<p>': ", what failed and the
// fix. Built with std::to_string only: formatting through iostreams inside an FFI execute call
// crashed the process on jax 0.11.2 (see ffi_common.cc).
std::string error_record_message(const ErrorRecord& record, int64_t buffer_id, int device_ordinal,
                                 uint64_t timeout_ns);

}  // namespace jax_megamoe
