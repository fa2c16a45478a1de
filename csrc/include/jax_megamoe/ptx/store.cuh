// Stores: wide global stores from registers; the fragment store into shared memory (stmatrix)
// and the bulk copies from shared to global memory that an epilogue stages its rows with. Peer
// (NVLink) pointers are ordinary global addresses under UVA.
#pragma once

#include <cstdint>
#include <cuda/ptx>

#include "jax_megamoe/ptx/shared.cuh"

namespace jax_megamoe::ptx {

// kWords consecutive 32-bit words (2 or 4) in one 8- or 16-byte store.
template <int kWords>
__device__ __forceinline__ void st_global_words(void* ptr, const uint32_t (&w)[kWords]) {
  static_assert(kWords == 2 || kWords == 4, "one vector store");
  if constexpr (kWords == 4) {
    asm volatile("st.global.v4.b32 [%0], {%1, %2, %3, %4};\n" ::"l"(ptr), "r"(w[0]), "r"(w[1]),
                 "r"(w[2]), "r"(w[3])
                 : "memory");
  } else {
    asm volatile("st.global.v2.b32 [%0], {%1, %2};\n" ::"l"(ptr), "r"(w[0]), "r"(w[1]) : "memory");
  }
}

// Four 8x8 b16 matrices from mma fragments (register i: matrix i, row lane / 4, columns
// 2 (lane % 4) + {0, 1}) into shared memory; lanes 8 i .. 8 i + 7 give the addresses of matrix
// i's eight 16-byte rows. CCCL's cuda::ptx has no stmatrix, hence our own PTX.
__device__ __forceinline__ void stmatrix_x4(uint32_t smem_row_addr, const uint32_t (&r)[4]) {
  asm volatile(
      "stmatrix.sync.aligned.m8n8.x4.shared.b16 [%0], {%1, %2, %3, %4};\n" ::"r"(smem_row_addr),
      "r"(r[0]), "r"(r[1]), "r"(r[2]), "r"(r[3])
      : "memory");
}

// Orders this thread's generic-proxy view of shared memory (its own writes, and those it has
// acquired through an mbarrier) before its later async-proxy accesses (bulk copies, wgmma).
__device__ __forceinline__ void fence_proxy_async_shared() {
  cuda::ptx::fence_proxy_async(cuda::ptx::space_shared);
}

// `bytes` (a multiple of 16; both addresses 16-byte aligned) from shared memory at 32-bit
// address `src` (ptx::smem_addr) to global memory, asynchronously, in this thread's current bulk
// group. CCCL's wrapper takes a generic source (smem_ptr).
__device__ __forceinline__ void bulk_store(void* dst, uint32_t src, uint32_t bytes) {
  cuda::ptx::cp_async_bulk(cuda::ptx::space_global, cuda::ptx::space_shared, dst, smem_ptr(src),
                           bytes);
}
__device__ __forceinline__ void bulk_commit() { cuda::ptx::cp_async_bulk_commit_group(); }
// Until this thread's committed bulk groups, but the newest kPending, have read their source.
template <int kPending>
__device__ __forceinline__ void bulk_wait_read() {
  cuda::ptx::cp_async_bulk_wait_group_read(cuda::ptx::n32_t<kPending>{});
}
// Until this thread's committed bulk groups have written their destination.
__device__ __forceinline__ void bulk_wait_all() {
  cuda::ptx::cp_async_bulk_wait_group(cuda::ptx::n32_t<0>{});
}

}  // namespace jax_megamoe::ptx
