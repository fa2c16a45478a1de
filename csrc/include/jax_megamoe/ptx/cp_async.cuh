// cp.async (SM80+) global -> shared copies, to 32-bit shared addresses (ptx/shared.cuh). The TMA
// main loop's producer uses the 4-byte form for the scale factors, which are strided in global
// memory (a TMA box needs 16-byte rows), and the 16-byte form to gather rows that no TMA box can
// name (one row each, scattered); it signals their completion on an mbarrier (ptx/mbarrier.cuh).
// L1's math threads prefetch their rows' routing weights and flags with the 4-byte form and wait
// with cp_async_wait_all.
#pragma once

#include <cstdint>

namespace jax_megamoe::ptx {

// 4 bytes (only .ca allows sizes below 16).
__device__ __forceinline__ void cp_async_4(uint32_t dst, const void* src) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(dst), "l"(src) : "memory");
}

// The zero-filling forms: `src_bytes` of the source (0 or the full size) are read, the rest of
// the destination is written with zeros, so src_bytes = 0 reads nothing.
__device__ __forceinline__ void cp_async_4_zfill(uint32_t dst, const void* src, int src_bytes) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes)
               : "memory");
}
// 16 bytes, cached in L2 only (.cg: every row is read once per CTA and K block).
__device__ __forceinline__ void cp_async_16_zfill(uint32_t dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src),
               "r"(src_bytes)
               : "memory");
}

// Waits until every cp.async this thread issued has landed (no groups: the math threads' only
// copies are L1's row prefetch, one batch per tile).
__device__ __forceinline__ void cp_async_wait_all() {
  asm volatile("cp.async.wait_all;\n" ::: "memory");
}

}  // namespace jax_megamoe::ptx
