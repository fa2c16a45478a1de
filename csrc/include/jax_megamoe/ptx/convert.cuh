// Packed conversions: f32 -> e4m3 / bf16 (round to nearest even).
#pragma once

#include <cstdint>

namespace jax_megamoe::ptx {

// Two f32 -> two e4m3 (lo in bits 0..7). satfinite maps out-of-range values to +-448, never inf.
__device__ __forceinline__ uint16_t cvt_e4m3x2(float lo, float hi) {
  uint16_t r;
  asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;\n" : "=h"(r) : "f"(hi), "f"(lo));
  return r;
}

// Two f32 -> two bf16 (lo in bits 0..15).
__device__ __forceinline__ uint32_t cvt_bf16x2(float lo, float hi) {
  uint32_t r;
  asm("cvt.rn.bf16x2.f32 %0, %1, %2;\n" : "=r"(r) : "f"(hi), "f"(lo));
  return r;
}

}  // namespace jax_megamoe::ptx
