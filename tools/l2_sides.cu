// Which SMs share a side of the L2 cache? Hopper's L2 is two partitions, each near half of the
// SMs; a tile order that meant to keep each side's CTAs on their own data would first need to
// know the sides, and %smid does not tell them. One CTA per SM, run one at a time (a turn
// counter), times a chain of dependent L2 hits (ld.global.cg) to each of kProbes lines spread
// over a buffer. Per line, the SMs split at the midpoint of their latencies into near and far;
// SMs with the same near/far pattern over all lines are listed together, with the first line's
// latency per %smid.
//
// Build and run (benchmarks/device_run.sh `l2sides` mode):
//   nvcc -std=c++17 -O3 -gencode=arch=compute_90a,code=sm_90a tools/l2_sides.cu -o l2_sides \
//     && ./l2_sides
// Answered on an H200 (2026-12-04, benchmarks/RESULTS.md "the H200's two L2 sides"): two
// complementary families of 62 and 70 SMs, ~260 against ~305 cycles per hit, interleaved over
// %smid in runs of 2-12. L1's tiles claimed per side (each side on half of the pairs) then ran
// 6-8 % slower: twice the experts in flight. With each side on half of every pair's N tiles
// instead, L1 moved the same DRAM bytes as with one counter: the sides do not duplicate lines
// (RESULTS.md 2026-12-04, "issue 11's method on one more H200 ..."). The probe may put a few SMs
// near the midpoint on one side or the other from one run to the next (66 + 66, then 70 + 62).
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <map>
#include <string>
#include <vector>

#include "cuda_check.h"

namespace {

using cuda_check::ok;

constexpr int kProbes = 48;
constexpr int kChain = 32;                         // dependent loads timed per line
constexpr size_t kBufferBytes = size_t(64) << 20;  // spread the lines over the address hash

// Line i's offset in 8-byte words: a fixed scatter over the buffer, 128-byte aligned.
__host__ __device__ size_t probe_word(int i) {
  return (static_cast<size_t>(i) * 2654435761u % (kBufferBytes / 128)) * 16;
}

__global__ void probe(const uint64_t* buf, int* turn, float* latency, int* sm_of, uint64_t zero) {
  if (threadIdx.x != 0) return;
  while (atomicAdd(turn, 0) != static_cast<int>(blockIdx.x)) {  // one SM at a time
  }
  uint32_t sm;
  asm volatile("mov.u32 %0, %%smid;" : "=r"(sm));
  sm_of[blockIdx.x] = static_cast<int>(sm);
  for (int i = 0; i < kProbes; ++i) {
    const uint64_t* line = buf + probe_word(i);
    uint64_t v;
    asm volatile("ld.global.cg.u64 %0, [%1];" : "=l"(v) : "l"(line));  // now in L2
    long long t0, t1;
    asm volatile("mov.u64 %0, %%clock64;" : "=l"(t0)::"memory");
    // Each address depends on the last value (`zero` is 0 at run time, unknown to the compiler).
    for (int r = 0; r < kChain; ++r)
      asm volatile("ld.global.cg.u64 %0, [%1];" : "=l"(v) : "l"(line + (v & zero)));
    asm volatile("add.u64 %1, %1, 0;\n\tmov.u64 %0, %%clock64;" : "=l"(t1), "+l"(v)::"memory");
    latency[blockIdx.x * kProbes + i] = float(t1 - t0) / kChain + float(v & zero);
  }
  __threadfence();
  atomicAdd(turn, 1);
}

}  // namespace

int main() {
  int sms = 0;
  if (!ok(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0), "device")) return 1;
  uint64_t* buf;
  int *turn, *sm_of;
  float* latency;
  if (!ok(cudaMalloc(&buf, kBufferBytes), "malloc") || !ok(cudaMalloc(&turn, 4), "malloc") ||
      !ok(cudaMalloc(&latency, sms * kProbes * sizeof(float)), "malloc") ||
      !ok(cudaMalloc(&sm_of, sms * sizeof(int)), "malloc"))
    return 1;
  cudaMemset(buf, 0, kBufferBytes);
  cudaMemset(turn, 0, 4);
  // All of shared memory per CTA: one CTA per SM, and every CTA resident (the turns need it).
  constexpr int kSmem = 200 * 1024;
  if (!ok(cudaFuncSetAttribute(probe, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem),
          "smem attribute"))
    return 1;
  probe<<<sms, 32, kSmem>>>(buf, turn, latency, sm_of, 0);
  if (!ok(cudaDeviceSynchronize(), "probe")) return 1;
  std::vector<float> lat(sms * kProbes);
  std::vector<int> sm(sms);
  cudaMemcpy(lat.data(), latency, lat.size() * sizeof(float), cudaMemcpyDeviceToHost);
  cudaMemcpy(sm.data(), sm_of, sm.size() * sizeof(int), cudaMemcpyDeviceToHost);

  std::printf("%d SMs, %d lines, L2 hit latency in SM cycles\n", sms, kProbes);
  std::vector<float> mid(kProbes);
  for (int i = 0; i < kProbes; ++i) {
    float lo = 1e9f, hi = 0.f;
    for (int b = 0; b < sms; ++b) {
      lo = std::min(lo, lat[b * kProbes + i]);
      hi = std::max(hi, lat[b * kProbes + i]);
    }
    mid[i] = 0.5f * (lo + hi);
    if (i < 4) std::printf("line %d: %.0f to %.0f\n", i, lo, hi);
  }
  // Per CTA, near (0) or far (1) on each line.
  std::vector<std::string> pattern(sms);
  std::map<std::string, std::vector<int>> families;  // pattern -> SMs
  for (int b = 0; b < sms; ++b) {
    for (int i = 0; i < kProbes; ++i) pattern[b] += lat[b * kProbes + i] > mid[i] ? '1' : '0';
    families[pattern[b]].push_back(sm[b]);
  }
  std::printf("SMs by near (0) / far (1) pattern over the lines:\n");
  for (auto& [pattern, ids] : families) {
    std::sort(ids.begin(), ids.end());
    std::printf("%s %3zu:", pattern.c_str(), ids.size());
    for (int id : ids) std::printf(" %d", id);
    std::printf("\n");
  }
  // Two sides: an SM is on CTA 0's side when its pattern differs from CTA 0's on fewer than
  // half of the lines.
  const int max_sm = *std::max_element(sm.begin(), sm.end());
  std::vector<int> side(max_sm + 1, -1);
  std::vector<float> first(max_sm + 1, 0.f);
  int count[2] = {0, 0};
  for (int b = 0; b < sms; ++b) {
    int differ = 0;
    for (int i = 0; i < kProbes; ++i) differ += pattern[b][i] != pattern[0][i];
    side[sm[b]] = differ > kProbes / 2 ? 1 : 0;
    ++count[side[sm[b]]];
    first[sm[b]] = lat[b * kProbes];
  }
  std::printf("sides: %d SMs with CTA 0's, %d on the other\n%%smid side line-0 cycles:", count[0],
              count[1]);
  for (int s = 0; s <= max_sm; ++s)
    if (side[s] >= 0) std::printf(" %d:%d:%.0f", s, side[s], first[s]);
  std::printf("\n");
  return 0;
}
