// Host launchers of the standalone grouped GEMM calls' helpers (ffi/grouped_gemm.cc).
#include "jax_megamoe/impls/store_pointer.cuh"
#include "jax_megamoe/launch.h"
#include "jax_megamoe/standalone.h"

namespace jax_megamoe {

cudaError_t launch_store_pointer(void** slot, void* value, cudaStream_t stream) {
  store_pointer_kernel<<<1, 1, 0, stream>>>(slot, value);
  return cudaGetLastError();
}

cudaError_t prepare_standalone_kernels() {
  // cudaFuncGetAttributes loads the kernel's module now rather than at its first launch.
  cudaFuncAttributes attributes;
  cudaError_t err =
      cudaFuncGetAttributes(&attributes, reinterpret_cast<const void*>(store_pointer_kernel));
  if (err != cudaSuccess) return err;
  return prepare_gemm_kernels();
}

}  // namespace jax_megamoe
