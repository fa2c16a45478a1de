// A host program that runs the grouped GEMM kernels (csrc/launch/gemm.cu) once each on small
// pools, without Python or JAX, for compute-sanitizer: under JAX the tools take minutes per call
// (racecheck did not finish in 80 s) or crash before the first kernel. Build and run it as
// benchmarks/device_run.sh's `sanitize` mode does:
//
//   nvcc -std=c++17 -O3 -gencode=arch=compute_90a,code=sm_90a --expt-relaxed-constexpr \
//     -I csrc/include tools/gemm_sanitize.cu csrc/launch/gemm.cu -o gemm_sanitize
//   compute-sanitizer --tool racecheck ./gemm_sanitize
//
// Numerics are the GPU tests' job (tests/test_gpu_gemm.py); this program checks what the
// sanitizers cannot see: which rows the kernels wrote. Outputs are poisoned first (NaN bytes);
// afterwards every real row of the pool must be written and nothing else. Each pool mixes the
// tile kinds of the schedule: pairs of row blocks of one expert, an expert's last partial
// block, a lone block (its partner names no expert), an expert with no rows, and blocks past
// the device-side block count. Each pool runs twice: L2 after L1 has finished, then L2 as L1's
// programmatic dependent waiting for L1's per-block counters, as the layer launches them when
// it has the whole device (on a grid smaller than the device, L2's CTAs wait beside L1's).
// Exit status 0 when every check passed.
#include <cuda_runtime_api.h>

#include <cmath>
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
  std::fprintf(stderr, "gemm_sanitize: %s: %s\n", what, cudaGetErrorString(err));
  return false;
}

template <class T>
struct DeviceArray {
  T* ptr = nullptr;
  size_t count = 0;
  explicit DeviceArray(const std::vector<T>& host) : count(host.size()) {
    if (ok(cudaMalloc(&ptr, count * sizeof(T)), "cudaMalloc"))
      ok(cudaMemcpy(ptr, host.data(), count * sizeof(T), cudaMemcpyHostToDevice), "copy in");
  }
  DeviceArray(const DeviceArray&) = delete;
  DeviceArray& operator=(const DeviceArray&) = delete;
  ~DeviceArray() { cudaFree(ptr); }
  std::vector<T> read() const {
    std::vector<T> host(count);
    ok(cudaMemcpy(host.data(), ptr, count * sizeof(T), cudaMemcpyDeviceToHost), "copy out");
    return host;
  }
};

// Finite e4m3 bytes (exponent field below 15, so never the NaN pattern 0x7F/0xFF).
std::vector<uint8_t> random_e4m3(size_t n, std::mt19937& rng) {
  std::vector<uint8_t> v(n);
  for (auto& b : v) b = static_cast<uint8_t>(rng() & 0xF7);
  return v;
}

std::vector<float> random_scales(size_t n, std::mt19937& rng) {
  std::uniform_real_distribution<float> d(0.5f, 2.f);
  std::vector<float> v(n);
  for (auto& x : v) x = d(rng) / 64.f;
  return v;
}

struct Pool {
  std::vector<int32_t> block_expert;  // per 64-row block; -1: no expert
  std::vector<int32_t> row_src;       // per row: the row's combine slot, -1 = padding
  int num_blocks = 0;                 // blocks the kernels see (the device-side count)
  int slots = 0;                      // combine slots in use
};

// rows_per_expert[e] real rows of expert e, each expert starting on a kExpertAlignM boundary
// (as the dispatch lays it out), then `extra_blocks` blocks past the device-side count.
Pool make_pool(const std::vector<int>& rows_per_expert, int extra_blocks) {
  Pool p;
  for (size_t e = 0; e < rows_per_expert.size(); ++e) {
    const int rows = rows_per_expert[e];
    const int padded = (rows + kExpertAlignM - 1) / kExpertAlignM * kExpertAlignM;
    for (int r = 0; r < padded; ++r) p.row_src.push_back(r < rows ? p.slots++ : -1);
    for (int b = 0; b < padded / kBlockM; ++b)  // a block with no real rows names no expert
      p.block_expert.push_back(b * kBlockM < rows ? static_cast<int>(e) : -1);
  }
  p.num_blocks = static_cast<int>(p.block_expert.size());
  for (int b = 0; b < extra_blocks; ++b) {  // past num_blocks: must be neither read nor written
    p.block_expert.push_back(0);
    for (int r = 0; r < kBlockM; ++r) p.row_src.push_back(p.slots++);
  }
  return p;
}

// One L1 then one L2 launch on `pool`; returns the number of failed checks.
int run_case(const char* name, int hidden, int intermediate, const std::vector<int>& rows,
             int extra_blocks, int num_ctas, bool overlap, cudaStream_t stream, std::mt19937& rng) {
  const Pool pool = make_pool(rows, extra_blocks);
  const int E = static_cast<int>(rows.size()), H = hidden, I = intermediate;
  const size_t P = pool.row_src.size(), q = kQuantBlock;
  const int max_blocks = static_cast<int>(P / kBlockM);

  DeviceArray<uint8_t> a(random_e4m3(P * H, rng));
  DeviceArray<float> a_scale(random_scales(P * H / q, rng));
  DeviceArray<float> row_weight(random_scales(P, rng));
  DeviceArray<int32_t> row_src(pool.row_src);
  DeviceArray<int32_t> block_expert(pool.block_expert);
  DeviceArray<int32_t> num_blocks(std::vector<int32_t>{pool.num_blocks});
  DeviceArray<uint8_t> w1(random_e4m3(size_t(E) * 2 * I * H, rng));
  DeviceArray<float> w1_scale(random_scales(size_t(E) * 2 * I / q * H / q, rng));
  DeviceArray<uint8_t> w2(random_e4m3(size_t(E) * H * I, rng));
  DeviceArray<float> w2_scale(random_scales(size_t(E) * H / q * I / q, rng));
  constexpr uint8_t kPoisonE4m3 = 0xFF;     // NaN
  constexpr uint16_t kPoisonBf16 = 0xFFFF;  // NaN
  DeviceArray<uint8_t> act(std::vector<uint8_t>(P * I, kPoisonE4m3));
  DeviceArray<float> act_scale(
      std::vector<float>(P * I / q, std::numeric_limits<float>::quiet_NaN()));
  // One rank, topk 1: slot s of the combine buffer is row s of y.
  DeviceArray<uint16_t> y(std::vector<uint16_t>(size_t(pool.slots) * H, kPoisonBf16));
  DeviceArray<uint16_t*> table(std::vector<uint16_t*>{y.ptr});
  DeviceArray<int32_t> claims(std::vector<int32_t>{0, 0});  // L1's and L2's tile counters
  DeviceArray<int32_t> block_stored(std::vector<int32_t>(max_blocks, 0));

  jax_megamoe::L1Params p1{};
  p1.a = a.ptr;
  p1.a_scale = a_scale.ptr;
  p1.row_weight = row_weight.ptr;
  p1.row_src = row_src.ptr;
  p1.block_expert = block_expert.ptr;
  p1.num_blocks = num_blocks.ptr;
  p1.w1 = w1.ptr;
  p1.w1_scale = w1_scale.ptr;
  p1.act = act.ptr;
  p1.act_scale = act_scale.ptr;
  p1.num_experts = E;
  p1.hidden = H;
  p1.intermediate = I;
  p1.max_blocks = max_blocks;
  p1.clamp = std::numeric_limits<float>::infinity();
  p1.num_ctas = num_ctas;
  p1.tile_claims = claims.ptr;
  p1.block_stored = overlap ? block_stored.ptr : nullptr;
  if (!ok(jax_megamoe::launch_l1(p1, stream), "launch_l1") ||
      (!overlap && !ok(cudaStreamSynchronize(stream), "L1"))) {
    return 1;
  }
  // L2 reads what L1 wrote; the rows L1 left poisoned are padding, which L2 must skip.
  jax_megamoe::L2Params p2{};
  p2.act = act.ptr;
  p2.act_scale = act_scale.ptr;
  p2.row_src = row_src.ptr;
  p2.block_expert = block_expert.ptr;
  p2.num_blocks = num_blocks.ptr;
  p2.w2 = w2.ptr;
  p2.w2_scale = w2_scale.ptr;
  p2.combine = table.ptr;
  p2.num_experts = E;
  p2.hidden = H;
  p2.intermediate = I;
  p2.topk = 1;
  p2.max_tokens = pool.slots;
  p2.max_blocks = max_blocks;
  p2.num_ctas = num_ctas;
  p2.tile_claims = claims.ptr + 1;
  p2.block_stored = p1.block_stored;
  p2.l1_n_tiles = I / static_cast<int>(q);
  if (!ok(jax_megamoe::launch_l2(p2, stream), "launch_l2") ||
      !ok(cudaStreamSynchronize(stream), "L2")) {
    return 1;
  }

  // A pool row is real when its block is below num_blocks, names an expert, and it has a slot.
  const auto act_out = act.read();
  const auto y_out = y.read();
  int act_bad = 0, y_bad = 0;
  std::vector<bool> slot_used(pool.slots, false);
  for (size_t r = 0; r < P; ++r) {
    const size_t b = r / kBlockM;
    const bool real = int(b) < pool.num_blocks && pool.block_expert[b] >= 0 && pool.row_src[r] >= 0;
    if (real) slot_used[pool.row_src[r]] = true;
    for (int c = 0; c < I; ++c) {
      const bool poisoned = act_out[r * I + c] == kPoisonE4m3;
      act_bad += real == poisoned;  // real rows all written, the others all untouched
    }
  }
  for (int s = 0; s < pool.slots; ++s) {
    for (int c = 0; c < H; ++c) y_bad += slot_used[s] == (y_out[size_t(s) * H + c] == kPoisonBf16);
  }
  std::printf("%-22s %-12s H %5d I %4d E %2d pool %5zu rows, %3d of %3d blocks: L1 %s, L2 %s\n",
              name, overlap ? "L2 under L1" : "L2 after L1", H, I, E, P, pool.num_blocks,
              max_blocks, act_bad ? "WRONG ROWS" : "ok", y_bad ? "WRONG ROWS" : "ok");
  return (act_bad != 0) + (y_bad != 0);
}

}  // namespace

int main(int argc, char** argv) {
  int device = 0, sms = 0;
  if (!ok(cudaSetDevice(device), "cudaSetDevice") ||
      !ok(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device), "SM count") ||
      !ok(jax_megamoe::prepare_gemm_kernels(), "prepare_gemm_kernels")) {
    return 2;
  }
  // --ctas N: a smaller persistent grid, so each CTA walks several tiles (0: every SM).
  int num_ctas = sms * jax_megamoe::gemm_ctas_per_sm();
  if (argc == 3 && std::strcmp(argv[1], "--ctas") == 0 && std::atoi(argv[2]) > 0)
    num_ctas = std::atoi(argv[2]);
  cudaStream_t stream;
  if (!ok(cudaStreamCreate(&stream), "cudaStreamCreate")) return 2;
  std::mt19937 rng(7);
  int failed = 0;
  // Expert 1 has no rows; expert 2's 70 rows end in a partial block; expert 3's 30 rows are a
  // lone block (its partner names no expert); two blocks follow past num_blocks.
  const std::vector<int> mixed = {256, 0, 70, 30};
  for (const bool overlap : {false, true}) {
    failed += run_case("mixed, wide L2", 512, 256, mixed, 2, num_ctas, overlap, stream, rng);
    failed += run_case("mixed, narrow L2", 384, 256, mixed, 2, num_ctas, overlap, stream, rng);
    failed +=
        run_case("lone blocks only", 512, 384, {5, 1, 64, 17}, 0, num_ctas, overlap, stream, rng);
  }
  cudaStreamDestroy(stream);
  std::printf("%s\n", failed ? "FAILED" : "all checks passed");
  return failed ? 1 : 0;
}
