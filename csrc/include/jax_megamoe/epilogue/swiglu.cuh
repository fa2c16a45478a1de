// SwiGLU times the routing weight, with the optional DeepSeek activation clamp (clamp = +inf
// disables it), two values of one row at a time.
#pragma once

#include "jax_megamoe/ptx/approx_math.cuh"

namespace jax_megamoe::epilogue {

// silu(g) u w = g u w / d, d = 1 + 2^(-g log2 e), for two (gate, up) pairs of one row, whose
// routing weight is w, with the hardware's approximate exp2 and one approximate reciprocal for
// both quotients: w / d0 = d1 (w / (d0 d1)) and w / d1 = d0 (w / (d0 d1)). Why: the
// special-function unit takes 8 cycles per warp-wide MUFU on each scheduler, and with an exp2
// and a reciprocal per value it paced L1's epilogue (ptxas spaced the MUFU 8 cycles apart),
// which the tensor cores idle through; two more FMUL and two FMNMX per pair are cheaper than
// the second MUFU. The numerics contract fixes no rounding for SiLU (the reference takes XLA's
// sigmoid) nor the order of the products, and the IEEE expf and division cost ~25 instructions
// a value with their range checks and slow-path calls.
//
// Error: up to |g| 2^-24 relative in 2^(-g log2 e) (the rounding of -g log2 e), ~2 ulp from the
// exp2, 1 ulp from the reciprocal and a few roundings of the products: far below the e4m3 step
// that the value meets next. Limits: the exponent is capped at 63 so that d0 d1 <= 2^126 stays
// finite and its reciprocal normal; below g = -43.6 the result is g u w / (1 + 2^63), under
// |g u w| 2^-63, where silu(g) u w is under |g u w| e^g (both round to a zero e4m3 unless the
// whole row is that small). Large g gives g u w (within a few ulp); g = -inf gives -inf u w,
// not the reference's NaN; a NaN gate or up stays in its own value.
__device__ __forceinline__ float2 swiglu_x2(float2 gate, float2 up, float weight) {
  constexpr float kMinusLog2e = -1.4426950408889634f;
  constexpr float kMaxExponent = 63.f;
  const float d0 = 1.f + ptx::ex2_approx_ftz(fminf(gate.x * kMinusLog2e, kMaxExponent));
  const float d1 = 1.f + ptx::ex2_approx_ftz(fminf(gate.y * kMinusLog2e, kMaxExponent));
  const float rw = ptx::rcp_approx_ftz(d0 * d1) * weight;
  return {gate.x * (d1 * rw) * up.x, gate.y * (d0 * rw) * up.y};
}

// With the clamp: gate <= clamp, |up| <= clamp. swiglu_x2(gate, up, weight) above is this one
// at clamp = +inf for every value but NaN, without its three FMNMX a value.
__device__ __forceinline__ float2 swiglu_x2(float2 gate, float2 up, float weight, float clamp) {
  const auto clip = [clamp](float u) { return fminf(fmaxf(u, -clamp), clamp); };
  return swiglu_x2({fminf(gate.x, clamp), fminf(gate.y, clamp)}, {clip(up.x), clip(up.y)}, weight);
}

}  // namespace jax_megamoe::epilogue
