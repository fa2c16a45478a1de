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
// block, a lone block (its partner names no expert), L1's tails (an expert's last block of at
// most 16 rows, computed with its last pair), an expert with no rows, and blocks past the
// device-side block count. Each pool runs twice: L2 after L1 has finished, then L2 as L1's
// programmatic dependent waiting for L1's per-block counters, as the layer launches them when
// it has the whole device (on a grid smaller than the device, L2's CTAs wait beside L1's). After
// the first, L1 runs once more with A gathered from a token matrix (L1Params::x, the layer's
// one-rank path): slot s's token row is pool row s's, so act must come out bitwise the same.
// Last, L1 and L2 once with tile counters a few claims short of 2^31 (run_wrapped_claims).
// Exit status 0 when every check passed.
#include <cuda_runtime_api.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "gemm_host.h"

namespace {

using namespace gemm_tools;

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

// L1 again on `buf`, whose act holds the pool path's result, with A gathered from a token
// matrix (token s = the pool row whose slot is s, topk 1); returns the bytes of act and act_scale
// that differ (or 1 if a step failed).
int run_gathered(GemmBuffers& buf, const Pool& pool, const std::vector<uint8_t>& a,
                 const std::vector<float>& a_scale, int num_ctas, cudaStream_t stream) {
  const size_t H = buf.hidden, scales = H / kQuantBlock;
  std::vector<uint8_t> x(size_t(pool.slots) * H);
  std::vector<float> x_scale(size_t(pool.slots) * scales);
  for (size_t r = 0; r < buf.rows; ++r) {
    const int s = pool.row_src[r];
    if (s < 0) continue;
    std::memcpy(&x[s * H], &a[r * H], H);
    std::memcpy(&x_scale[s * scales], &a_scale[r * scales], scales * sizeof(float));
  }
  DeviceArray<uint8_t> x_dev(x);
  DeviceArray<float> x_scale_dev(x_scale);
  const auto act_pool = buf.act.read();
  const auto act_scale_pool = buf.act_scale.read();
  jax_megamoe::L1Params p = buf.l1(num_ctas, /*overlap=*/false);
  p.x = x_dev.ptr;
  p.x_scale = x_scale_dev.ptr;
  p.topk = 1;
  if (!x_dev.ptr || !x_scale_dev.ptr || !buf.poison_outputs() ||
      !ok(cudaMemset(buf.claims.ptr, 0, buf.claims.count * sizeof(int32_t)), "claims") ||
      !ok(jax_megamoe::launch_l1(p, stream), "launch_l1 (gathered)") ||
      !ok(cudaStreamSynchronize(stream), "L1 (gathered)")) {
    return 1;
  }
  const auto act = buf.act.read();
  const auto act_scale = buf.act_scale.read();
  int differ = 0;
  for (size_t i = 0; i < act.size(); ++i) differ += act[i] != act_pool[i];
  for (size_t i = 0; i < act_scale.size(); ++i)
    differ += std::memcmp(&act_scale[i], &act_scale_pool[i], sizeof(float)) != 0;
  return differ;
}

// Fresh random inputs of one L1 and one L2 launch, uploaded into `buf`; A and its scales are
// returned too (the gathered L1 copies them into a token matrix).
struct HostA {
  std::vector<uint8_t> a;
  std::vector<float> a_scale;
};
HostA upload_random_inputs(GemmBuffers& buf, std::mt19937& rng) {
  HostA host{random_e4m3(buf.a.count, rng), random_scales(buf.a_scale.count, rng)};
  buf.a.upload(host.a);
  buf.a_scale.upload(host.a_scale);
  buf.row_weight.upload(random_scales(buf.row_weight.count, rng));
  buf.w1.upload(random_e4m3(buf.w1.count, rng));
  buf.w1_scale.upload(random_scales(buf.w1_scale.count, rng));
  buf.w2.upload(random_e4m3(buf.w2.count, rng));
  buf.w2_scale.upload(random_scales(buf.w2_scale.count, rng));
  return host;
}

// One L1 then one L2 launch on `pool`; returns the number of failed checks.
int run_case(const char* name, int hidden, int intermediate, const std::vector<int>& rows,
             int extra_blocks, int num_ctas, bool overlap, cudaStream_t stream, std::mt19937& rng) {
  const Pool pool = make_pool(rows, extra_blocks);
  const int E = static_cast<int>(rows.size()), H = hidden, I = intermediate;
  GemmBuffers buf(pool, E, H, I);
  if (!buf.allocated()) return 1;
  const HostA host = upload_random_inputs(buf, rng);
  constexpr uint8_t kPoisonE4m3 = GemmBuffers::kPoisonByte;             // NaN
  constexpr uint16_t kPoisonBf16 = GemmBuffers::kPoisonByte * 0x0101u;  // NaN
  if (!buf.poison_outputs()) return 1;

  if (!ok(jax_megamoe::launch_l1(buf.l1(num_ctas, overlap), stream), "launch_l1") ||
      (!overlap && !ok(cudaStreamSynchronize(stream), "L1"))) {
    return 1;
  }
  // L2 reads what L1 wrote; the rows L1 left poisoned are padding, which L2 must skip.
  if (!ok(jax_megamoe::launch_l2(buf.l2(num_ctas, overlap), stream), "launch_l2") ||
      !ok(cudaStreamSynchronize(stream), "L2")) {
    return 1;
  }

  // A pool row is real when its block is below num_blocks, names an expert, and it has a slot.
  const auto act_out = buf.act.read();
  const auto y_out = buf.y.read();
  int act_bad = 0, y_bad = 0;
  std::vector<bool> slot_used(pool.slots, false);
  for (size_t r = 0; r < buf.rows; ++r) {
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
  const int gathered_bad =
      overlap ? 0 : run_gathered(buf, pool, host.a, host.a_scale, num_ctas, stream);
  std::printf("%-22s %-12s H %5d I %4d E %2d pool %5zu rows, %3d of %3d blocks: L1 %s, L2 %s%s\n",
              name, overlap ? "L2 under L1" : "L2 after L1", H, I, E, buf.rows, pool.num_blocks,
              buf.max_blocks(), act_bad ? "WRONG ROWS" : "ok", y_bad ? "WRONG ROWS" : "ok",
              overlap        ? ""
              : gathered_bad ? ", gathered L1 DIFFERS"
                             : ", gathered L1 same");
  return (act_bad != 0) + (y_bad != 0) + (gathered_bad != 0);
}

// L1 and L2 with tile counters that were not zero at launch but a few claims short of 2^31, as
// a workspace's counters would be after ~16 million calls that zeroed none (the layer's skipped
// calls did not, before 2026-12-05). All but the first three claims pass 2^31 and read as
// negative (so the check needs more than three CTAs; both of device_run.sh's grids have them);
// the scheduler compares them unsigned, so each CTA ends at once. Returns the number of failed
// checks: a launch error or fault (a negative index names a block before the table), or a
// written byte.
int run_wrapped_claims(int num_ctas, cudaStream_t stream, std::mt19937& rng) {
  const Pool pool = make_pool({256, 0, 70, 30}, 2);
  GemmBuffers buf(pool, 4, 512, 256);
  if (!buf.allocated()) return 1;
  upload_random_inputs(buf, rng);
  constexpr int32_t kNearWrap = std::numeric_limits<int32_t>::max() - 2;
  buf.claims.upload(std::vector<int32_t>{kNearWrap, kNearWrap});
  if (!buf.poison_outputs() ||
      !ok(jax_megamoe::launch_l1(buf.l1(num_ctas, false), stream), "launch_l1 (wrapped)") ||
      !ok(jax_megamoe::launch_l2(buf.l2(num_ctas, false), stream), "launch_l2 (wrapped)") ||
      !ok(cudaStreamSynchronize(stream), "L1 and L2 (wrapped claims)")) {
    return 1;
  }
  int written = 0;
  for (const uint8_t b : buf.act.read()) written += b != GemmBuffers::kPoisonByte;
  for (const uint16_t v : buf.y.read()) written += v != GemmBuffers::kPoisonByte * 0x0101u;
  std::printf("%-35s %d CTAs: %s\n", "claims past 2^31 at launch", num_ctas,
              written ? "BYTES WRITTEN" : "ok, nothing written");
  return written != 0;
}

}  // namespace

int main(int argc, char** argv) {
  // --private-smem: the shared-memory ranges where a racecheck report is a race, one per line
  // (kernel, begin, end, what), for tools/racecheck_sass.py; needs no GPU.
  if (argc == 2 && std::strcmp(argv[1], "--private-smem") == 0) {
    for (const auto& r : jax_megamoe::gemm_private_smem())
      std::printf("%s\t%#x\t%#x\t%s\n", r.kernel.c_str(), r.begin, r.end, r.what.c_str());
    return 0;
  }
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
  // L1's swap-AB tails: experts 0, 2 and 3 end in a block of 16, 15 and 1 rows after a full
  // pair, which L1 computes inside that pair's tiles; expert 4's 30 rows stay a lone block.
  const std::vector<int> tails = {144, 0, 271, 129, 30};
  for (const bool overlap : {false, true}) {
    failed += run_case("mixed, wide L2", 512, 256, mixed, 2, num_ctas, overlap, stream, rng);
    failed += run_case("mixed, narrow L2", 384, 256, mixed, 2, num_ctas, overlap, stream, rng);
    failed +=
        run_case("lone blocks only", 512, 384, {5, 1, 64, 17}, 0, num_ctas, overlap, stream, rng);
    failed += run_case("L1 tails", 512, 256, tails, 1, num_ctas, overlap, stream, rng);
  }
  // Last: on a scheduler that compares signed it would fault, which ends the context.
  failed += run_wrapped_claims(num_ctas, stream, rng);
  cudaStreamDestroy(stream);
  std::printf("%s\n", failed ? "FAILED" : "all checks passed");
  return failed ? 1 : 0;
}
