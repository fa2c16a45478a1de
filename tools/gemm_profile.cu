// The grouped GEMM kernels (csrc/launch/gemm.cu) at the DeepSeek-V3 layer shape, from a host
// program without Python or JAX: for Nsight Compute (which segfaulted on 2026-12-02 when it
// attached to bench_gemm.py's process) and for quick timings of a kernel change. Each L1 and L2
// launch is timed with events (tile counters reset before each, outside the timed span) and the
// median printed with TFLOPS over real rows. Build and run as benchmarks/device_run.sh's
// `profile` mode does:
//
//   nvcc -std=c++17 -O3 -gencode=arch=compute_90a,code=sm_90a --expt-relaxed-constexpr \
//     -I csrc/include tools/gemm_profile.cu csrc/launch/gemm.cu -o gemm_profile
//   ./gemm_profile --tokens 8192 --iters 20
//
// Routing: each token picks topk distinct experts uniformly at random (the benchmarks' uniform
// routing), rows laid out per expert and padded to kExpertAlignM as the dispatch lays them out.
// Operands are random bytes and scales filled on the device; no numerics are checked here
// (tests/test_gpu_gemm.py does that).
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "jax_megamoe/launch.h"

namespace {

using jax_megamoe::kBlockM;
using jax_megamoe::kExpertAlignM;
using jax_megamoe::kQuantBlock;

bool ok(cudaError_t err, const char* what) {
  if (err == cudaSuccess) return true;
  std::fprintf(stderr, "gemm_profile: %s: %s\n", what, cudaGetErrorString(err));
  return false;
}

// Finite e4m3 bytes from a hash of the index (exponent field below 15: never the NaN pattern).
__global__ void fill_e4m3(uint8_t* p, size_t n, uint32_t seed) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n;
       i += size_t(gridDim.x) * blockDim.x) {
    uint32_t h = static_cast<uint32_t>(i) * 2654435761u ^ seed;
    h ^= h >> 15;
    h *= 2246822519u;
    h ^= h >> 13;
    p[i] = static_cast<uint8_t>(h & 0xF7);
  }
}

// Scales in [1/128, 1/32).
__global__ void fill_scales(float* p, size_t n, uint32_t seed) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n;
       i += size_t(gridDim.x) * blockDim.x) {
    uint32_t h = static_cast<uint32_t>(i) * 2654435761u ^ seed;
    h ^= h >> 16;
    h *= 2246822519u;
    p[i] = (1.f + 3.f * static_cast<float>(h >> 8) / 16777216.f) / 128.f;
  }
}

template <class T>
T* device_alloc(size_t count) {
  T* p = nullptr;
  return ok(cudaMalloc(&p, count * sizeof(T)), "cudaMalloc") ? p : nullptr;
}

template <class T>
T* device_copy(const std::vector<T>& host) {
  T* p = device_alloc<T>(host.size());
  if (p) ok(cudaMemcpy(p, host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice), "copy");
  return p;
}

float median(std::vector<float> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
  int tokens = 8192, experts = 64, topk = 8, hidden = 7168, intermediate = 2048, iters = 20;
  for (int i = 1; i + 1 < argc; i += 2) {
    const int v = std::atoi(argv[i + 1]);
    if (!std::strcmp(argv[i], "--tokens"))
      tokens = v;
    else if (!std::strcmp(argv[i], "--experts"))
      experts = v;
    else if (!std::strcmp(argv[i], "--iters"))
      iters = v;
    else {
      std::fprintf(stderr, "usage: gemm_profile [--tokens M] [--experts E] [--iters N]\n");
      return 2;
    }
  }
  int sms = 0;
  if (!ok(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0), "SM count") ||
      !ok(jax_megamoe::prepare_gemm_kernels(), "prepare_gemm_kernels")) {
    return 2;
  }

  // Uniform routing, then the pool: each expert's rows padded to kExpertAlignM.
  std::mt19937 rng(7);
  std::vector<int> rows(experts, 0), pick(experts);
  for (int e = 0; e < experts; ++e) pick[e] = e;
  for (int t = 0; t < tokens; ++t) {
    for (int k = 0; k < topk; ++k) {  // partial Fisher-Yates: topk distinct experts
      std::swap(pick[k], pick[k + rng() % (experts - k)]);
      ++rows[pick[k]];
    }
  }
  std::vector<int32_t> block_expert, row_src;
  int slots = 0;
  for (int e = 0; e < experts; ++e) {
    const int padded = (rows[e] + kExpertAlignM - 1) / kExpertAlignM * kExpertAlignM;
    for (int r = 0; r < padded; ++r) row_src.push_back(r < rows[e] ? slots++ : -1);
    for (int b = 0; b < padded / kBlockM; ++b)
      block_expert.push_back(b * kBlockM < rows[e] ? e : -1);
  }
  const size_t P = row_src.size(), H = hidden, I = intermediate, q = kQuantBlock;
  const int blocks = static_cast<int>(block_expert.size());

  uint8_t* a = device_alloc<uint8_t>(P * H);
  float* a_scale = device_alloc<float>(P * H / q);
  float* row_weight = device_alloc<float>(P);
  uint8_t* w1 = device_alloc<uint8_t>(size_t(experts) * 2 * I * H);
  float* w1_scale = device_alloc<float>(size_t(experts) * 2 * I / q * H / q);
  uint8_t* w2 = device_alloc<uint8_t>(size_t(experts) * H * I);
  float* w2_scale = device_alloc<float>(size_t(experts) * H / q * I / q);
  uint8_t* act = device_alloc<uint8_t>(P * I);
  float* act_scale = device_alloc<float>(P * I / q);
  uint16_t* y = device_alloc<uint16_t>(size_t(slots) * H);
  int32_t* claims = device_alloc<int32_t>(2);
  int32_t* d_row_src = device_copy(row_src);
  int32_t* d_block_expert = device_copy(block_expert);
  int32_t* d_num_blocks = device_copy(std::vector<int32_t>{blocks});
  uint16_t** table = device_copy(std::vector<uint16_t*>{y});
  if (!a || !a_scale || !row_weight || !w1 || !w1_scale || !w2 || !w2_scale || !act || !act_scale ||
      !y || !claims || !d_row_src || !d_block_expert || !d_num_blocks || !table) {
    return 2;
  }
  fill_e4m3<<<1024, 256>>>(a, P * H, 1);
  fill_e4m3<<<1024, 256>>>(w1, size_t(experts) * 2 * I * H, 2);
  fill_e4m3<<<1024, 256>>>(w2, size_t(experts) * H * I, 3);
  fill_scales<<<256, 256>>>(a_scale, P * H / q, 4);
  fill_scales<<<256, 256>>>(row_weight, P, 5);
  fill_scales<<<256, 256>>>(w1_scale, size_t(experts) * 2 * I / q * H / q, 6);
  fill_scales<<<256, 256>>>(w2_scale, size_t(experts) * H / q * I / q, 7);
  if (!ok(cudaDeviceSynchronize(), "fill")) return 2;

  const int num_ctas = sms * jax_megamoe::gemm_ctas_per_sm();
  jax_megamoe::L1Params p1{};
  p1.a = a;
  p1.a_scale = a_scale;
  p1.row_weight = row_weight;
  p1.row_src = d_row_src;
  p1.block_expert = d_block_expert;
  p1.num_blocks = d_num_blocks;
  p1.w1 = w1;
  p1.w1_scale = w1_scale;
  p1.act = act;
  p1.act_scale = act_scale;
  p1.num_experts = experts;
  p1.hidden = hidden;
  p1.intermediate = intermediate;
  p1.max_blocks = blocks;
  p1.clamp = std::numeric_limits<float>::infinity();
  p1.num_ctas = num_ctas;
  p1.tile_claims = claims;
  jax_megamoe::L2Params p2{};
  p2.act = act;
  p2.act_scale = act_scale;
  p2.row_src = d_row_src;
  p2.block_expert = d_block_expert;
  p2.num_blocks = d_num_blocks;
  p2.w2 = w2;
  p2.w2_scale = w2_scale;
  p2.combine = table;
  p2.num_experts = experts;
  p2.hidden = hidden;
  p2.intermediate = intermediate;
  p2.topk = 1;  // one rank, slot s = row s of y
  p2.max_tokens = slots;
  p2.max_blocks = blocks;
  p2.num_ctas = num_ctas;
  p2.tile_claims = claims + 1;
  p2.l1_n_tiles = intermediate / kQuantBlock;

  cudaEvent_t start, stop;
  cudaEventCreate(&start);
  cudaEventCreate(&stop);
  std::vector<float> l1_ms, l2_ms;
  for (int it = 0; it < iters; ++it) {
    float ms = 0.f;
    for (int kernel = 0; kernel < 2; ++kernel) {
      if (!ok(cudaMemsetAsync(claims, 0, 2 * sizeof(int32_t)), "memset")) return 1;
      cudaEventRecord(start);
      const cudaError_t err =
          kernel == 0 ? jax_megamoe::launch_l1(p1, nullptr) : jax_megamoe::launch_l2(p2, nullptr);
      cudaEventRecord(stop);
      if (!ok(err, "launch") || !ok(cudaEventSynchronize(stop), "kernel")) return 1;
      cudaEventElapsedTime(&ms, start, stop);
      (kernel == 0 ? l1_ms : l2_ms).push_back(ms);
    }
  }
  const double real_rows = double(tokens) * topk;
  const double l1_flop = 2.0 * real_rows * 2 * I * H, l2_flop = 2.0 * real_rows * H * I;
  const float l1 = median(l1_ms), l2 = median(l2_ms);
  std::printf("M %d E %d: %zu pool rows (%d blocks), %d CTAs, %d iters\n", tokens, experts, P,
              blocks, num_ctas, iters);
  std::printf("L1 %.1f us %.0f TFLOPS | L2 %.1f us %.0f TFLOPS (medians, real rows)\n", l1 * 1e3,
              l1_flop / (l1 * 1e-3) / 1e12, l2 * 1e3, l2_flop / (l2 * 1e-3) / 1e12);
  return 0;
}
