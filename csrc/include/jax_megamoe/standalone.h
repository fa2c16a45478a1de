// Host entry points for running the grouped GEMM kernels (launch.h) on their own, outside the
// fused layer: the FFI handlers of ffi/grouped_gemm.cc. Plain C++ types only (host compiler).
#pragma once

#include <cuda_runtime_api.h>

namespace jax_megamoe {

// Enqueues one thread that stores `value` at `*slot` (device memory). The standalone L2 call
// uses it to build its one-entry table of combine bases from XLA's output buffer, in stream
// order, so the handler neither syncs nor copies from host memory.
cudaError_t launch_store_pointer(void** slot, void* value, cudaStream_t stream);

// Loads the GEMM kernels and the pointer store on the current device and raises the GEMMs'
// shared-memory limits. Call once per device before the first standalone launch, never from
// an FFI execute (module loading there can deadlock against a spinning fused kernel).
cudaError_t prepare_standalone_kernels();

}  // namespace jax_megamoe
