// The special-function unit's approximations (one MUFU each), with subnormals flushed to zero:
// the forms without .ftz add a range check and two multiplies per call to handle them.
#pragma once

namespace jax_megamoe::ptx {

// 2^x within ~2 ulp; subnormal results flush to +0.
__device__ __forceinline__ float ex2_approx_ftz(float x) {
  float r;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(r) : "f"(x));
  return r;
}

// 1/x within ~1 ulp; 1/inf = +0, and results below 2^-126 flush to 0.
__device__ __forceinline__ float rcp_approx_ftz(float x) {
  float r;
  asm("rcp.approx.ftz.f32 %0, %1;\n" : "=f"(r) : "f"(x));
  return r;
}

}  // namespace jax_megamoe::ptx
