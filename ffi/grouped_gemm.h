// The two grouped FP8 GEMM kernels exposed on their own (GEMM benchmarks and GEMM-level tests):
// their XLA FFI handlers, the target names they are registered under (Python reads them as
// jax_megamoe._C.L1_GEMM_TARGET / L2_GEMM_TARGET), and their per-device setup.
#pragma once

#include "xla/ffi/api/api.h"

XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxMegamoeL1Gemm);
XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxMegamoeL2Gemm);

namespace jax_megamoe {

inline constexpr char kL1GemmTarget[] = "jax_megamoe_l1_gemm";
inline constexpr char kL2GemmTarget[] = "jax_megamoe_l2_gemm";

// Loads the standalone kernels on CUDA device `device_ordinal` and records its SM count; the
// handlers refuse to run on a device that was not prepared. Idempotent; may sync; throws
// std::invalid_argument / std::runtime_error (ValueError / RuntimeError through nanobind).
void prepare_standalone(int device_ordinal);

}  // namespace jax_megamoe
