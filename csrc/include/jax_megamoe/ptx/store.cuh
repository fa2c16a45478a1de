// Wide global stores. Peer (NVLink) pointers are ordinary global addresses under UVA.
#pragma once

#include <cstdint>

namespace jax_megamoe::ptx {

__device__ __forceinline__ void st_global_v4(void* ptr, const uint4& v) {
  asm volatile("st.global.v4.b32 [%0], {%1, %2, %3, %4};\n" ::"l"(ptr), "r"(v.x), "r"(v.y),
               "r"(v.z), "r"(v.w)
               : "memory");
}

}  // namespace jax_megamoe::ptx
