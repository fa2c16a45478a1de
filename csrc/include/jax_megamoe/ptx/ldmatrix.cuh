// ldmatrix: four 8x8 b16 matrices (8 rows of 16 bytes each) from shared memory into registers.
#pragma once

#include <cstdint>

namespace jax_megamoe::ptx {

// Lane l supplies the row address of row (l % 8) of matrix (l / 8). Lane l receives, of every
// matrix i, row l / 4 bytes [4 * (l % 4), +4) in r[i]: for 8-bit data this is exactly the
// m16n8k32 A/B fragment granule (row groupID, k = 4 * threadID_in_group .. +3).
__device__ __forceinline__ void ldmatrix_x4(uint32_t addr, uint32_t (&r)[4]) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

}  // namespace jax_megamoe::ptx
