// SwiGLU with the optional DeepSeek activation clamp (clamp = +inf disables it).
#pragma once

#include "jax_megamoe/ptx/approx_math.cuh"

namespace jax_megamoe::epilogue {

// silu(g) = g / (1 + 2^(-g log2 e)) with the hardware's approximate exp2 and reciprocal. The
// numerics contract fixes no rounding for SiLU (the reference takes XLA's sigmoid), and the IEEE
// expf and division cost ~25 instructions per value with their range checks and slow-path
// calls: a fifth of L1's epilogue. The error this adds, up to |g| * 2^-24 relative in e^-g
// (the rounding of -g log2 e) plus a few ulp from the approximations, is far below the e4m3 step
// that the value meets next. Limits: large g gives g; below g = -87.3 (1 + e^-g > 2^126: the
// reciprocal flushes to zero) it gives 0 with g's sign instead of a |silu| under 1e-36.
__device__ __forceinline__ float swiglu(float gate, float up) {
  constexpr float kLog2e = 1.4426950408889634f;
  return gate * ptx::rcp_approx_ftz(1.f + ptx::ex2_approx_ftz(gate * -kLog2e)) * up;
}

// With the clamp: gate <= clamp, |up| <= clamp. swiglu(gate, up) above is this one at clamp =
// +inf for every value but NaN, without its three FMNMX.
__device__ __forceinline__ float swiglu(float gate, float up, float clamp) {
  return swiglu(fminf(gate, clamp), fminf(fmaxf(up, -clamp), clamp));
}

}  // namespace jax_megamoe::epilogue
