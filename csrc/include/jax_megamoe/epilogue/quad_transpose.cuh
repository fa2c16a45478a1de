// Regroups mma accumulator words inside a quad so that one lane owns consecutive columns, for
// 16-byte row stores straight from registers.
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

// The e4m3 form for one row of 8 * kTiles columns. In: lane t of a quad holds w[j] = e4m3
// columns (8 j + 2 t, +1) for the kTiles n8 tiles j. Out: lane t holds tiles [t T, t T + T) with
// T = kTiles / 4, i.e. 8 T consecutive bytes, as T / 2 16-byte vectors. Per vector h, one word
// transpose (tiles t T + 2 h and t T + 2 h + 1 paired in a word), then byte permutes put each
// tile's four lanes in column order.
template <int kTiles>
__device__ __forceinline__ void quad_transpose_e4m3(const uint16_t (&w)[kTiles],
                                                    uint4 (&out)[kTiles / 8]) {
  static_assert(kTiles % 8 == 0, "whole 16-byte vectors per lane");
  constexpr int kT = kTiles / 4;
#pragma unroll
  for (int h = 0; h < kTiles / 8; ++h) {
    uint32_t words[4];
#pragma unroll
    for (int g = 0; g < 4; ++g)
      words[g] = uint32_t(w[kT * g + 2 * h]) | (uint32_t(w[kT * g + 2 * h + 1]) << 16);
    // v.k from lane k: tile t T + 2 h in its low half, tile t T + 2 h + 1 in its high half.
    const uint4 v = quad_transpose(words);
    out[h] = make_uint4(__byte_perm(v.x, v.y, 0x5410), __byte_perm(v.z, v.w, 0x5410),
                        __byte_perm(v.x, v.y, 0x7632), __byte_perm(v.z, v.w, 0x7632));
  }
}

}  // namespace jax_megamoe::epilogue
