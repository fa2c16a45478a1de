// 1x128 e4m3 requantization, matching quantize_per_token in the numerics contract:
// s = max(amax, 1e-4) / 448, q = e4m3_rne(clip(v / s, -448, 448)).
#pragma once

#include <cstdint>

#include "jax_megamoe/ptx/convert.cuh"

namespace jax_megamoe::epilogue {

constexpr float kE4m3Max = 448.f;
constexpr float kMinAmax = 1e-4f;

__device__ __forceinline__ float e4m3_scale(float amax) {
  return __fdiv_rn(fmaxf(amax, kMinAmax), kE4m3Max);
}

// IEEE division, not a reciprocal multiply: the reference divides, and a 1-ulp difference can
// flip an e4m3 rounding.
__device__ __forceinline__ uint16_t quantize_e4m3x2(float lo, float hi, float scale) {
  const float ql = fminf(fmaxf(__fdiv_rn(lo, scale), -kE4m3Max), kE4m3Max);
  const float qh = fminf(fmaxf(__fdiv_rn(hi, scale), -kE4m3Max), kE4m3Max);
  return ptx::cvt_e4m3x2(ql, qh);
}

// Max over the 4 lanes of an mma quad (lanes 4g .. 4g+3 hold the same accumulator rows).
__device__ __forceinline__ float quad_max(float v) {
  v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
  return fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
}

}  // namespace jax_megamoe::epilogue
