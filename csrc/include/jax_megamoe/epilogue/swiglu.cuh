// SwiGLU with the optional DeepSeek activation clamp (clamp = +inf disables it).
#pragma once

namespace jax_megamoe::epilogue {

__device__ __forceinline__ float swiglu(float gate, float up, float clamp) {
  const float g = fminf(gate, clamp);
  const float u = fminf(fmaxf(up, -clamp), clamp);
  return g / (1.f + expf(-g)) * u;
}

}  // namespace jax_megamoe::epilogue
