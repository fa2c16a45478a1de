// The fused layer's XLA FFI handler (mega_moe.cc) and the target name it is registered under;
// Python reads the name as jax_megamoe._C.FP8_MEGA_MOE_TARGET.
#pragma once

#include "xla/ffi/api/api.h"

XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxMegamoeFp8MegaMoe);

namespace jax_megamoe {

inline constexpr char kFp8MegaMoeTarget[] = "jax_megamoe_fp8_mega_moe";

// Test hook (tests/test_gpu_errors.py; tests/mp_worker.py, scenario launch_failure): the next
// fused call on this device has L1's launch fail (MegaMoeArgs::fail_l1_launch). Throws
// std::invalid_argument for an ordinal outside [0, kMaxHookDevices).
inline constexpr int kMaxHookDevices = 64;
void inject_launch_failure(int device_ordinal);

}  // namespace jax_megamoe
