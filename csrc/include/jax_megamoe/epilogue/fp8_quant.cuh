// 1x128 e4m3 requantization, matching quantize_per_token in the numerics contract:
// s = max(amax, 1e-4) / 448, q = e4m3_rne(clip(v / s, -448, 448)), v / s an IEEE division.
#pragma once

#include <cstdint>

#include "jax_megamoe/ptx/convert.cuh"

namespace jax_megamoe::epilogue {

constexpr float kE4m3Max = 448.f;
constexpr float kMinAmax = 1e-4f;

__device__ __forceinline__ float e4m3_scale(float amax) {
  return __fdiv_rn(fmaxf(amax, kMinAmax), kE4m3Max);
}

// Divides every value of one 1x128 group by its scale s with the IEEE quotient, bit for bit (a
// 1-ulp difference can flip an e4m3 rounding), at three FFMA a value instead of a division's
// ~11 instructions with its range check and slow-path branch. y = RN(1 / s) once per group;
// q0 = RN(v y) is within an ulp of v / s; r = q0 s - v is exact in one FMA; RN(q0 - r y) is then
// the correctly rounded quotient (Markstein's theorem: y within half an ulp of 1 / s, q0 within
// an ulp of v / s, no overflow or underflow). Why the ranges hold: s >= 1e-4 / 448 and a finite
// s <= FLT_MAX / 448 keep y normal; |v| <= amax keeps |v / s| <= 448; the residual can underflow
// only where |v / s| < 2^-10, which rounds to a zero e4m3 either way. Signs of zero follow v
// (r is formed as q0 s - v so that v = -0 gives -0), and an infinite s (amax = inf) divides
// with y = 0 and s taken as 0: v * 0, as v / inf is. tests/test_exact_division.py checks all
// of this against exact rationals.
struct ScaleDivisor {
  float s;  // the scale, or 0 when it is infinite
  float y;  // RN(1 / scale)

  __device__ explicit ScaleDivisor(float scale) {
    s = scale < INFINITY ? scale : 0.f;
    y = __fdiv_rn(1.f, scale);
  }

  __device__ __forceinline__ float quotient(float v) const {
    const float q0 = v * y;
    const float r = fmaf(q0, s, -v);
    return fmaf(-r, y, q0);
  }
};

// The clip to [-448, 448] is the conversion's: satfinite maps every finite or infinite quotient
// beyond +-448 to +-448, as clip then round would (448 is e4m3's largest finite value). A clip
// in f32 first cost two FMNMX a value, an eighth of L1's epilogue instructions; it also turned a
// NaN into -448 (fmaxf drops NaN), where the conversion keeps it NaN.
__device__ __forceinline__ uint16_t quantize_e4m3x2(float lo, float hi, const ScaleDivisor& d) {
  return ptx::cvt_e4m3x2(d.quotient(lo), d.quotient(hi));
}

// Max over the 4 lanes of an mma quad (lanes 4g .. 4g+3 hold the same accumulator rows).
__device__ __forceinline__ float quad_max(float v) {
  v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
  return fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
}

}  // namespace jax_megamoe::epilogue
