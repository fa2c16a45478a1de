// Warp-level tensor-core MMA used for FP8 operands on SM90.
//
// SM90 has no native mma.sync for e4m3: ptxas lowers mma.m16n8k32.e4m3 to e4m3 -> f16 unpacks,
// two HMMA.16816 into a zero accumulator and four FADDs per MMA. We do the same unpack ourselves
// and chain the HMMAs into the accumulator, which drops the FADDs. The f16 products of e4m3
// values are exact, so numerics match a native FP8 MMA with f32 accumulation.
#pragma once

#include <cstdint>

#include "jax_megamoe/ptx/convert.cuh"

namespace jax_megamoe::ptx {

// m16n8k16, f16 inputs, f32 accumulate, D = A x B + D. A row-major, B "col" (N x K, K contiguous).
__device__ __forceinline__ void mma_m16n8k16_f16(float (&d)[4], const uint32_t (&a)[4],
                                                 const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
      "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// 8-bit m16n8k32 fragments (g = lane / 4, t = lane % 4; each register packs 4 consecutive k):
//   A: a[0] row g, k 4t..4t+3; a[1] row g+8, k 4t..; a[2] row g, k 16+4t..; a[3] row g+8, k 16+4t..
//   B: b[0] n g, k 4t..4t+3;   b[1] n g, k 16+4t..
// unpacked to f16 and fed to two m16n8k16 MMAs (k 0-15, then 16-31). The f16 fragment of thread t
// holds k {2t, 2t+1} and {8+2t, 9+2t}; feeding it real k {4t, 4t+1} and {4t+2, 4t+3} in both A and
// B permutes K identically for both operands, which leaves the dot product unchanged.
struct E4m3FragA {
  uint32_t lo[4], hi[4];  // f16 A fragments for k 0-15 and k 16-31
  __device__ __forceinline__ explicit E4m3FragA(const uint32_t (&a)[4]) {
    uint32_t x[4][2];
#pragma unroll
    for (int i = 0; i < 4; ++i) cvt_e4m3x4_to_f16x4(a[i], x[i][0], x[i][1]);
    lo[0] = x[0][0], lo[1] = x[1][0], lo[2] = x[0][1], lo[3] = x[1][1];
    hi[0] = x[2][0], hi[1] = x[3][0], hi[2] = x[2][1], hi[3] = x[3][1];
  }
};

struct E4m3FragB {
  uint32_t lo[2], hi[2];
  __device__ __forceinline__ explicit E4m3FragB(const uint32_t (&b)[2]) {
    cvt_e4m3x4_to_f16x4(b[0], lo[0], lo[1]);
    cvt_e4m3x4_to_f16x4(b[1], hi[0], hi[1]);
  }
};

// D(16x8) += A(16x32) x B(32x8)^T over one k32 step.
__device__ __forceinline__ void mma_k32_e4m3(float (&d)[4], const E4m3FragA& a,
                                             const E4m3FragB& b) {
  mma_m16n8k16_f16(d, a.lo, b.lo);
  mma_m16n8k16_f16(d, a.hi, b.hi);
}

}  // namespace jax_megamoe::ptx
