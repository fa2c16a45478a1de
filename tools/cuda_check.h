// CUDA error reports of the tool programs: ok() prints a failed call's error and returns false,
// for programs that unwind on their own; check() prints it and exits.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdio>
#include <cstdlib>

namespace cuda_check {

inline bool ok(cudaError_t e, const char* what) {
  if (e == cudaSuccess) return true;
  std::fprintf(stderr, "%s: %s\n", what, cudaGetErrorString(e));
  return false;
}

inline void check(cudaError_t e, const char* what) {
  if (!ok(e, what)) std::exit(1);
}

}  // namespace cuda_check
