// Host-side pieces of the tool programs that launch the grouped GEMM kernels without JAX
// (gemm_sanitize.cu, gemm_profile.cu): CUDA error reports, device arrays, the pool layout the
// dispatch produces, and one L1 + L2 launch's buffers and parameters.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>
#include <limits>
#include <vector>

#include "cuda_check.h"
#include "jax_megamoe/launch.h"

namespace gemm_tools {

using jax_megamoe::kBlockM;
using jax_megamoe::kExpertAlignM;
using jax_megamoe::kQuantBlock;

using cuda_check::ok;

// `count` elements of device memory (ptr null if the allocation failed), freed with the object.
template <class T>
struct DeviceArray {
  T* ptr = nullptr;
  size_t count = 0;
  explicit DeviceArray(size_t n) : count(n) {
    ok(cudaMalloc(&ptr, count * sizeof(T)), "cudaMalloc");
  }
  explicit DeviceArray(const std::vector<T>& host) : DeviceArray(host.size()) { upload(host); }
  DeviceArray(const DeviceArray&) = delete;
  DeviceArray& operator=(const DeviceArray&) = delete;
  ~DeviceArray() { cudaFree(ptr); }
  // host.size() must be count.
  void upload(const std::vector<T>& host) {
    if (ptr) ok(cudaMemcpy(ptr, host.data(), count * sizeof(T), cudaMemcpyHostToDevice), "copy in");
  }
  std::vector<T> read() const {
    std::vector<T> host(count);
    ok(cudaMemcpy(host.data(), ptr, count * sizeof(T), cudaMemcpyDeviceToHost), "copy out");
    return host;
  }
};

struct Pool {
  std::vector<int32_t> block_expert;  // per 64-row block; -1: no expert
  std::vector<int32_t> row_src;       // per row: the row's combine slot, -1 = padding
  int num_blocks = 0;                 // blocks the kernels see (the device-side count)
  int slots = 0;                      // combine slots in use
};

// rows_per_expert[e] real rows of expert e, each expert starting on a kExpertAlignM boundary
// (as the dispatch lays it out), then `extra_blocks` blocks past the device-side count.
inline Pool make_pool(const std::vector<int>& rows_per_expert, int extra_blocks) {
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

// Everything one L1 and one L2 launch over `pool` read or write, for `experts` experts at
// hidden size H and intermediate size I. The pool's layout is uploaded; the caller fills the
// inputs (a, scales, weights) and, where it checks or compares them, poisons the outputs
// (poison_outputs). L2 writes row s of the pool's slots into row s of y (one rank, topk 1).
struct GemmBuffers {
  const int experts, hidden, intermediate;
  const size_t rows;  // pool rows
  DeviceArray<uint8_t> a;
  DeviceArray<float> a_scale, row_weight;
  DeviceArray<int32_t> row_src, block_expert, num_blocks;
  DeviceArray<uint8_t> w1;
  DeviceArray<float> w1_scale;
  DeviceArray<uint8_t> w2;
  DeviceArray<float> w2_scale;
  DeviceArray<uint8_t> act;
  DeviceArray<float> act_scale;
  DeviceArray<uint16_t> y;
  DeviceArray<uint16_t*> table;
  DeviceArray<int32_t> claims;        // L1's and L2's tile counters, zero at each launch
  DeviceArray<int32_t> block_stored;  // L1's per-block counters, zero at launch

  GemmBuffers(const Pool& pool, int experts_, int hidden_, int intermediate_)
      : experts(experts_),
        hidden(hidden_),
        intermediate(intermediate_),
        rows(pool.row_src.size()),
        a(rows * hidden),
        a_scale(rows * hidden / kQuantBlock),
        row_weight(rows),
        row_src(pool.row_src),
        block_expert(pool.block_expert),
        num_blocks(std::vector<int32_t>{pool.num_blocks}),
        w1(size_t(experts) * 2 * intermediate * hidden),
        w1_scale(size_t(experts) * 2 * intermediate / kQuantBlock * hidden / kQuantBlock),
        w2(size_t(experts) * hidden * intermediate),
        w2_scale(size_t(experts) * hidden / kQuantBlock * intermediate / kQuantBlock),
        act(rows * intermediate),
        act_scale(rows * intermediate / kQuantBlock),
        y(size_t(pool.slots) * hidden),
        table(std::vector<uint16_t*>{y.ptr}),
        claims(std::vector<int32_t>{0, 0}),
        block_stored(std::vector<int32_t>(rows / kBlockM, 0)) {}

  bool allocated() const {
    return a.ptr && a_scale.ptr && row_weight.ptr && row_src.ptr && block_expert.ptr &&
           num_blocks.ptr && w1.ptr && w1_scale.ptr && w2.ptr && w2_scale.ptr && act.ptr &&
           act_scale.ptr && y.ptr && table.ptr && claims.ptr && block_stored.ptr;
  }
  int max_blocks() const { return static_cast<int>(rows / kBlockM); }

  // Every byte of the outputs (act, act_scale, y) set to kPoisonByte: NaN in e4m3, f32 and bf16
  // alike, so what the kernels leave unwritten is recognizable, and the same in every run.
  static constexpr uint8_t kPoisonByte = 0xFF;
  bool poison_outputs() {
    return ok(cudaMemset(act.ptr, kPoisonByte, act.count), "poison act") &&
           ok(cudaMemset(act_scale.ptr, kPoisonByte, act_scale.count * sizeof(float)),
              "poison act_scale") &&
           ok(cudaMemset(y.ptr, kPoisonByte, y.count * sizeof(uint16_t)), "poison y");
  }

  // With `overlap`, L1 counts its stored tiles per row block for an L2 launched as its
  // programmatic dependent (l2() then waits for them).
  jax_megamoe::L1Params l1(int num_ctas, bool overlap) const {
    jax_megamoe::L1Params p{};
    p.a = a.ptr;
    p.a_scale = a_scale.ptr;
    p.row_weight = row_weight.ptr;
    p.row_src = row_src.ptr;
    p.block_expert = block_expert.ptr;
    p.num_blocks = num_blocks.ptr;
    p.w1 = w1.ptr;
    p.w1_scale = w1_scale.ptr;
    p.act = act.ptr;
    p.act_scale = act_scale.ptr;
    p.num_experts = experts;
    p.hidden = hidden;
    p.intermediate = intermediate;
    p.max_blocks = max_blocks();
    p.clamp = std::numeric_limits<float>::infinity();
    p.num_ctas = num_ctas;
    p.tile_claims = claims.ptr;
    p.block_stored = overlap ? block_stored.ptr : nullptr;
    return p;
  }

  jax_megamoe::L2Params l2(int num_ctas, bool overlap) const {
    jax_megamoe::L2Params p{};
    p.act = act.ptr;
    p.act_scale = act_scale.ptr;
    p.row_src = row_src.ptr;
    p.block_expert = block_expert.ptr;
    p.num_blocks = num_blocks.ptr;
    p.w2 = w2.ptr;
    p.w2_scale = w2_scale.ptr;
    p.combine = table.ptr;
    p.num_experts = experts;
    p.hidden = hidden;
    p.intermediate = intermediate;
    p.topk = 1;
    p.max_tokens = static_cast<int>(y.count / hidden);
    p.max_blocks = max_blocks();
    p.num_ctas = num_ctas;
    p.tile_claims = claims.ptr + 1;
    p.block_stored = overlap ? block_stored.ptr : nullptr;
    p.l1_n_tiles = intermediate / kQuantBlock;
    return p;
  }
};

}  // namespace gemm_tools
