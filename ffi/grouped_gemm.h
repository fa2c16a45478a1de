// The two grouped FP8 GEMM kernels exposed on their own (GEMM benchmarks and GEMM-level tests):
// XLA FFI handlers "jax_megamoe_l1_gemm" and "jax_megamoe_l2_gemm", and their per-device setup.
#pragma once

#include "xla/ffi/api/api.h"

XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxMegamoeL1Gemm);
XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxMegamoeL2Gemm);

namespace jax_megamoe {

// Loads the standalone kernels on CUDA device `device_ordinal` and records its SM count; the
// handlers refuse to run on a device that was not prepared. Idempotent; may sync; throws
// std::invalid_argument / std::runtime_error (ValueError / RuntimeError through nanobind).
void prepare_standalone(int device_ordinal);

}  // namespace jax_megamoe
