// Regroups mma accumulator words inside a quad so that one lane owns 8 consecutive columns.
#pragma once

#include <cstdint>

namespace jax_megamoe::epilogue {

// In: lane t of a quad holds w[j] = columns (8 j + 2 t, +1) of one row (packed 2 x 16 bit), for the
// quad's four n8 tiles j. Out: lane t holds columns 8 t .. 8 t + 7, i.e. n8 tile t, as one 16-byte
// vector. Round r exchanges with lane t ^ r, which needs exactly the word this lane sends.
__device__ __forceinline__ uint4 quad_transpose(const uint32_t (&w)[4]) {
  const int t = threadIdx.x % 4;
  uint32_t out[4] = {w[0], w[1], w[2], w[3]};
#pragma unroll
  for (int r = 0; r < 4; ++r) {
    const int j = t ^ r;
    // Selects instead of w[j]: a runtime register index would spill the array to local memory.
    const uint32_t send = j == 0 ? w[0] : j == 1 ? w[1] : j == 2 ? w[2] : w[3];
    const uint32_t recv = r == 0 ? send : __shfl_xor_sync(0xffffffffu, send, r);
#pragma unroll
    for (int k = 0; k < 4; ++k) out[k] = k == j ? recv : out[k];
  }
  return make_uint4(out[0], out[1], out[2], out[3]);
}

}  // namespace jax_megamoe::epilogue
