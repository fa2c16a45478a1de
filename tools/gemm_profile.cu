// The grouped GEMM kernels (csrc/launch/gemm.cu) at the DeepSeek-V3 layer shape, from a host
// program without Python or JAX: for Nsight Compute (which segfaulted on 2026-12-02 when it
// attached to bench_gemm.py's process) and for quick timings of a kernel change. Each L1 and L2
// launch is timed with events (tile counters reset before each, outside the timed span) and the
// median printed with TFLOPS over real rows. Build and run as benchmarks/device_run.sh's
// `ncu` and `abprof` modes do (its build_tool): without --no-compress and tools/sass_yield.py
// the binary keeps ptxas's yield hints, not the extension's, and L1 runs 1.5-2.2 % slower.
//
//   nvcc -std=c++17 -O3 -gencode=arch=compute_90a,code=sm_90a --expt-relaxed-constexpr \
//     --no-compress -I csrc/include tools/gemm_profile.cu csrc/launch/gemm.cu -o gemm_profile
//   python3 tools/sass_yield.py gemm_profile
//   ./gemm_profile --tokens 8192 --iters 20
//
// Routing: each token picks topk distinct experts uniformly at random (the benchmarks' uniform
// routing), rows laid out per expert and padded to kExpertAlignM as the dispatch lays them out.
// Operands are random bytes and scales filled on the device; no numerics are checked here
// (tests/test_gpu_gemm.py does that), but the outputs' checksums are printed: two builds that
// must agree bitwise (a change of scheduling hints only, tools/sass_yield.py) print the same.
// Also printed: the timed loop's energy and average power (NVML), to see whether it ran at the
// card's power cap. `--zero padding` zeroes the padding rows of both GEMMs' A operands (pool
// and act, with their scales), `--zero a` all of L1's A: at the cap, a GEMM's speed depends on
// how many bits its operands toggle. `--kernels l1` (or `l2`) launches only that GEMM, so that
// its time at the cap does not depend on the energy the other one spends (the one left out
// prints 0 us; with `l2`, L2 reads act as poisoned, not as L1 would write it).
// GEMM_PROFILE_OVERLAP=1 in the environment launches the GEMMs as the layer does when it has the
// whole device: L1 counts its stored tiles per row block (a release per tile and warpgroup) and
// L2 runs as its programmatic dependent, waiting for those counts (zeroed before each L1).
#include <cuda_runtime_api.h>
#include <dlfcn.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

#include "gemm_host.h"

namespace {

using namespace gemm_tools;

// A hash of (i, seed): the operands are filled on the device (host-side random fills of the
// 2.8 GB of weights took most of a run).
__device__ uint32_t hash(size_t i, uint32_t seed) {
  uint32_t h = static_cast<uint32_t>(i) * 2654435761u ^ seed;
  h ^= h >> 15;
  h *= 2246822519u;
  return h ^ (h >> 13);
}

// Finite e4m3 bytes (exponent field below 15: never the NaN pattern).
__global__ void fill_e4m3(uint8_t* p, size_t n, uint32_t seed) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n;
       i += size_t(gridDim.x) * blockDim.x)
    p[i] = static_cast<uint8_t>(hash(i, seed) & 0xF7);
}

// Scales in [1/128, 1/32).
__global__ void fill_scales(float* p, size_t n, uint32_t seed) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n;
       i += size_t(gridDim.x) * blockDim.x)
    p[i] = (1.f + 3.f * static_cast<float>(hash(i, seed) >> 8) / 16777216.f) / 128.f;
}

// An order-independent checksum of n bytes (n a multiple of 8): the sum of a hash of each 8-byte
// word and its index. Two builds whose kernels must agree bitwise (a change of scheduling hints
// only) print the same checksums.
__global__ void checksum(const uint64_t* p, size_t n, unsigned long long* sum) {
  unsigned long long s = 0;
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n / 8;
       i += size_t(gridDim.x) * blockDim.x) {
    uint64_t h = (p[i] ^ (i * 0x9e3779b97f4a7c15ull)) * 0xbf58476d1ce4e5b9ull;
    s += h ^ (h >> 31);
  }
  atomicAdd(sum, s);
}

unsigned long long device_checksum(const void* p, size_t bytes) {
  unsigned long long* sum = nullptr;
  unsigned long long host = 0;
  if (cudaMalloc(&sum, sizeof(*sum)) != cudaSuccess) return 0;
  cudaMemset(sum, 0, sizeof(*sum));
  checksum<<<1024, 256>>>(static_cast<const uint64_t*>(p), bytes, sum);
  cudaMemcpy(&host, sum, sizeof(host), cudaMemcpyDeviceToHost);
  cudaFree(sum);
  return host;
}

// The GPU's energy counter (NVML, millijoules since the driver loaded), read through dlopen so
// that the program needs neither NVML's header nor its library at build time. At M >= 2048 the
// GEMMs run at the card's power cap, where a change is faster only if it spends less energy per
// FLOP: the timed loop's energy and average power are printed for that. 0 when unavailable.
class EnergyMeter {
 public:
  EnergyMeter() {
    void* nvml = dlopen("libnvidia-ml.so.1", RTLD_NOW);
    if (nvml == nullptr) return;
    using Init = int (*)();
    using ByBusId = int (*)(const char*, void**);
    const auto init = reinterpret_cast<Init>(dlsym(nvml, "nvmlInit_v2"));
    const auto by_bus_id =
        reinterpret_cast<ByBusId>(dlsym(nvml, "nvmlDeviceGetHandleByPciBusId_v2"));
    energy_ = reinterpret_cast<Energy>(dlsym(nvml, "nvmlDeviceGetTotalEnergyConsumption"));
    char bus_id[32] = {};
    if (init == nullptr || by_bus_id == nullptr || energy_ == nullptr || init() != 0 ||
        cudaDeviceGetPCIBusId(bus_id, sizeof(bus_id), 0) != cudaSuccess ||
        by_bus_id(bus_id, &device_) != 0) {
      energy_ = nullptr;
    }
  }
  unsigned long long millijoules() const {
    unsigned long long mj = 0;
    return energy_ != nullptr && energy_(device_, &mj) == 0 ? mj : 0;
  }

 private:
  using Energy = int (*)(void*, unsigned long long*);
  Energy energy_ = nullptr;
  void* device_ = nullptr;
};

float median(std::vector<float> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
  int tokens = 8192, experts = 64, topk = 8, hidden = 7168, intermediate = 2048, iters = 20;
  const char* zero = "none";
  bool run[2] = {true, true};  // L1, L2
  for (int i = 1; i + 1 < argc; i += 2) {
    const int v = std::atoi(argv[i + 1]);
    if (!std::strcmp(argv[i], "--zero") &&
        (!std::strcmp(argv[i + 1], "none") || !std::strcmp(argv[i + 1], "padding") ||
         !std::strcmp(argv[i + 1], "a"))) {
      zero = argv[i + 1];
    } else if (!std::strcmp(argv[i], "--kernels") &&
               (!std::strcmp(argv[i + 1], "both") || !std::strcmp(argv[i + 1], "l1") ||
                !std::strcmp(argv[i + 1], "l2"))) {
      run[0] = std::strcmp(argv[i + 1], "l2") != 0;
      run[1] = std::strcmp(argv[i + 1], "l1") != 0;
    } else if (!std::strcmp(argv[i], "--tokens")) {
      tokens = v;
    } else if (!std::strcmp(argv[i], "--experts")) {
      experts = v;
    } else if (!std::strcmp(argv[i], "--iters")) {
      iters = v;
    } else {
      std::fprintf(stderr,
                   "usage: gemm_profile [--tokens M] [--experts E] [--iters N]"
                   " [--zero none|padding|a] [--kernels both|l1|l2]\n");
      return 2;
    }
  }
  int sms = 0;
  if (!ok(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0), "SM count") ||
      !ok(jax_megamoe::prepare_gemm_kernels(), "prepare_gemm_kernels")) {
    return 2;
  }

  // Uniform routing, then the pool as the dispatch lays it out.
  std::mt19937 rng(7);
  std::vector<int> rows(experts, 0), pick(experts);
  for (int e = 0; e < experts; ++e) pick[e] = e;
  for (int t = 0; t < tokens; ++t) {
    for (int k = 0; k < topk; ++k) {  // partial Fisher-Yates: topk distinct experts
      std::swap(pick[k], pick[k + rng() % (experts - k)]);
      ++rows[pick[k]];
    }
  }
  const Pool pool = make_pool(rows, 0);
  GemmBuffers buf(pool, experts, hidden, intermediate);
  if (!buf.allocated()) return 2;
  fill_e4m3<<<1024, 256>>>(buf.a.ptr, buf.a.count, 1);
  fill_e4m3<<<1024, 256>>>(buf.w1.ptr, buf.w1.count, 2);
  fill_e4m3<<<1024, 256>>>(buf.w2.ptr, buf.w2.count, 3);
  fill_scales<<<256, 256>>>(buf.a_scale.ptr, buf.a_scale.count, 4);
  fill_scales<<<256, 256>>>(buf.row_weight.ptr, buf.row_weight.count, 5);
  fill_scales<<<256, 256>>>(buf.w1_scale.ptr, buf.w1_scale.count, 6);
  fill_scales<<<256, 256>>>(buf.w2_scale.ptr, buf.w2_scale.count, 7);
  // Outputs poisoned once, so that what the kernels leave unwritten (padding rows) is the same
  // in every run and the checksums below compare builds.
  if (!buf.poison_outputs()) return 2;
  if (!std::strcmp(zero, "a") && !ok(cudaMemset(buf.a.ptr, 0, buf.a.count), "zero a")) return 2;
  if (!std::strcmp(zero, "padding")) {  // L1 never writes act's padding rows: they stay zero
    for (size_t r = 0; r < buf.rows; ++r) {
      if (pool.row_src[r] >= 0) continue;
      const size_t h = hidden, i = intermediate, q = kQuantBlock;
      if (!ok(cudaMemset(buf.a.ptr + r * h, 0, h), "zero padding") ||
          !ok(cudaMemset(buf.a_scale.ptr + r * h / q, 0, h / q * sizeof(float)), "zero") ||
          !ok(cudaMemset(buf.act.ptr + r * i, 0, i), "zero padding") ||
          !ok(cudaMemset(buf.act_scale.ptr + r * i / q, 0, i / q * sizeof(float)), "zero")) {
        return 2;
      }
    }
  }
  if (!ok(cudaDeviceSynchronize(), "fill")) return 2;

  const int num_ctas = sms * jax_megamoe::gemm_ctas_per_sm();
  const char* overlap_env = std::getenv("GEMM_PROFILE_OVERLAP");
  const bool overlap = overlap_env != nullptr && !std::strcmp(overlap_env, "1");
  const jax_megamoe::L1Params p1 = buf.l1(num_ctas, overlap);
  const jax_megamoe::L2Params p2 = buf.l2(num_ctas, overlap);
  cudaEvent_t start, stop;
  cudaEventCreate(&start);
  cudaEventCreate(&stop);
  std::vector<float> l1_ms, l2_ms;
  const EnergyMeter meter;
  const unsigned long long mj0 = meter.millijoules();
  const auto t0 = std::chrono::steady_clock::now();
  for (int it = 0; it < iters; ++it) {
    float ms = 0.f;
    for (int kernel = 0; kernel < 2; ++kernel) {
      if (!run[kernel]) continue;
      if (!ok(cudaMemsetAsync(buf.claims.ptr, 0, 2 * sizeof(int32_t)), "memset")) return 1;
      if (overlap && kernel == 0 &&
          !ok(cudaMemsetAsync(buf.block_stored.ptr, 0, buf.block_stored.count * sizeof(int32_t)),
              "memset")) {
        return 1;
      }
      cudaEventRecord(start);
      const cudaError_t err =
          kernel == 0 ? jax_megamoe::launch_l1(p1, nullptr) : jax_megamoe::launch_l2(p2, nullptr);
      cudaEventRecord(stop);
      if (!ok(err, "launch") || !ok(cudaEventSynchronize(stop), "kernel")) return 1;
      cudaEventElapsedTime(&ms, start, stop);
      (kernel == 0 ? l1_ms : l2_ms).push_back(ms);
    }
  }
  const double loop_s =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  const unsigned long long mj1 = meter.millijoules();
  const double real_rows = double(tokens) * topk, H = hidden, I = intermediate;
  const double l1_flop = 2.0 * real_rows * 2 * I * H, l2_flop = 2.0 * real_rows * H * I;
  const float l1 = run[0] ? median(l1_ms) : 0.f, l2 = run[1] ? median(l2_ms) : 0.f;
  std::printf("M %d E %d: %zu pool rows (%d blocks), %d CTAs, %d iters, zeroed: %s%s\n", tokens,
              experts, buf.rows, buf.max_blocks(), num_ctas, iters, zero,
              overlap ? ", overlap" : "");
  const auto tflops = [](double flop, float ms) {
    return ms > 0.f ? flop / (ms * 1e-3) / 1e12 : 0;
  };
  std::printf("L1 %.1f us %.0f TFLOPS | L2 %.1f us %.0f TFLOPS (medians, real rows)\n", l1 * 1e3,
              tflops(l1_flop, l1), l2 * 1e3, tflops(l2_flop, l2));
  if (mj0 != 0 && mj1 > mj0) {
    const double joules = (mj1 - mj0) * 1e-3;
    const double flop = (run[0] ? l1_flop : 0) + (run[1] ? l2_flop : 0);
    std::printf("energy: %.2f J over %.0f ms (%.0f W), %.0f mJ per iteration, %.2f pJ per FLOP\n",
                joules, loop_s * 1e3, joules / loop_s, joules / iters * 1e3,
                joules / iters / flop * 1e12);
  } else {
    std::printf("energy: not available (NVML)\n");
  }
  std::printf("checksums: L1 %016llx %016llx | L2 %016llx\n",
              device_checksum(buf.act.ptr, buf.act.count),
              device_checksum(buf.act_scale.ptr, buf.act_scale.count * sizeof(float)),
              device_checksum(buf.y.ptr, buf.y.count * sizeof(uint16_t)));
  return ok(cudaDeviceSynchronize(), "checksum") ? 0 : 1;
}
