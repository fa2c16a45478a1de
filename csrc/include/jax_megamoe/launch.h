// Host-side contract between the FFI layer (ffi/*.cc, host compiler) and the CUDA launchers
// (csrc/launch/*.cu). Plain C++ types only, so ffi/ builds without nvcc.
#pragma once

#include <cuda.h>
#include <cuda_runtime_api.h>

#include <cstdint>
#include <string>
#include <vector>

#include "jax_megamoe/constants.h"

namespace jax_megamoe {

// L1: pool tokens x W1[e]^T with per-128 scale promotion, SwiGLU (optional clamp), x routing
// weight, 1x128 e4m3 requant. Persistent over (row block, N tile) pairs; blocks at or past
// *num_blocks are skipped.
struct L1Params {
  const uint8_t* a;             // [pool_rows, hidden] e4m3, row-major
  const float* a_scale;         // [pool_rows, hidden / 128]
  const float* row_weight;      // [pool_rows] routing weight of the (token, slot) in that row
  const int32_t* row_src;       // [pool_rows] encoded source slot, -1 = padding (not stored)
  const int32_t* block_expert;  // [max_blocks] local expert of each row block
  const int32_t* num_blocks;    // device scalar: valid row blocks this call
  const uint8_t* w1;      // [local_experts, 2 * intermediate, hidden] e4m3 (gate rows, then up)
  const float* w1_scale;  // [local_experts, 2 * intermediate / 128, hidden / 128]
  uint8_t* act;           // [pool_rows, intermediate] e4m3
  float* act_scale;       // [pool_rows, intermediate / 128]
  int num_experts;        // local experts: w1's dimension 0
  int hidden;
  int intermediate;
  int max_blocks;
  float clamp;   // +inf disables the clamp
  int num_ctas;  // persistent grid size (SM budget x CTAs per SM)
  // Device counter, zero at launch, from which the CTAs claim tiles in order; null: each CTA
  // walks a static sequence. Whether it is used is the launcher's choice (gemm.cu's table).
  int32_t* tile_claims;
  // [max_blocks], zero at launch, or null: each working warpgroup adds 1 to its row block's
  // count, with release, once it has stored the block's act rows and scales of a tile (an L2
  // launched as its programmatic dependent waits for them; L2Params::block_stored).
  int32_t* block_stored;
  // Null, or A read from the tokens themselves (one rank): pool row r is token row_src[r] / topk
  // of x [tokens, hidden] e4m3 with scales x_scale [tokens, hidden / 128], and `a`, `a_scale`
  // are not read (nobody need fill them).
  const uint8_t* x;
  const float* x_scale;
  int topk;
};

// L2: act x W2[e]^T with per-128 scale promotion; each valid row is rounded to bf16 and stored
// straight into the owning rank's combine slot [k][token][hidden] (unique writer, no atomics).
struct L2Params {
  const uint8_t* act;           // [pool_rows, intermediate] e4m3
  const float* act_scale;       // [pool_rows, intermediate / 128]
  const int32_t* row_src;       // [pool_rows] (src_rank * max_tokens + token) * topk + k, or -1
  const int32_t* block_expert;  // [max_blocks]
  const int32_t* num_blocks;    // device scalar
  const uint8_t* w2;            // [local_experts, hidden, intermediate] e4m3
  const float* w2_scale;        // [local_experts, hidden / 128, intermediate / 128]
  uint16_t* const* combine;     // device array [num_ranks] of bf16 combine bases (peer pointers)
  int num_experts;              // local experts: w2's dimension 0
  int hidden;
  int intermediate;
  int topk;
  int max_tokens;
  int max_blocks;
  int num_ctas;
  int32_t* tile_claims;  // as in L1Params
  // L1's counters, or null. Non-null: L2 is launched as a programmatic dependent of L1, which
  // must be the kernel just before it on the stream, and starts a tile once every L1 tile of
  // its row blocks has stored (l1_n_tiles per block, twice that for a block L1 ran alone).
  const int32_t* block_stored;
  int l1_n_tiles;
};

// The TMA tensor maps of one L1 or L2 launch (GroupedFp8TmaMainloop's constructor says what each
// views); passed in kernel parameter space.
struct GemmTensorMaps {
  CUtensorMap a;       // a row block of the pool
  CUtensorMap a_pair;  // a pair of row blocks
  CUtensorMap b;       // both B groups of an N tile
  CUtensorMap tail;    // a swap-AB tail's rows (unused without tails)
};

// A launch in two steps: encode_l1/encode_l2 check the parameters and encode the launch's tensor
// maps (host only: no stream work, no allocation), launch_l1/launch_l2 enqueue the kernel with
// the maps encode_* made from the same parameters. The layer encodes both GEMMs' maps before its
// first kernel, so that an encode failure returns before its dispatch sync: past it, an error
// returned before the combine sync is enqueued leaves the peers waiting out their timeout (what
// can still fail there is a launch itself). The launchers without maps do both (the standalone
// GEMMs, tools/).
cudaError_t encode_l1(const L1Params& p, GemmTensorMaps* maps);
cudaError_t encode_l2(const L2Params& p, GemmTensorMaps* maps);
cudaError_t launch_l1(const L1Params& p, const GemmTensorMaps& maps, cudaStream_t stream);
cudaError_t launch_l2(const L2Params& p, const GemmTensorMaps& maps, cudaStream_t stream);
cudaError_t launch_l1(const L1Params& p, cudaStream_t stream);
cudaError_t launch_l2(const L2Params& p, cudaStream_t stream);
// Loads the GEMM kernels and raises their shared-memory limits on the current device. Called at
// workspace setup, never from execute (module loading while a peer kernel spins can deadlock).
cudaError_t prepare_gemm_kernels();
// CTAs per SM the persistent GEMM kernels are sized for.
int gemm_ctas_per_sm();
// JAX_MEGAMOE_POISON_OUTPUTS=1, for tests (tests/conftest.py sets it): before their kernels run,
// the layer and the standalone GEMMs fill every byte those kernels must write with 0xFF, a NaN
// in bf16, e4m3 and f32, so a row a kernel fails to write shows as NaN rather than as a fresh
// buffer's zeros or an earlier call's values. Read once per process.
bool poison_outputs();
// cudaMemsetAsync(p, 0xFF, bytes, stream) where poison_outputs() holds, else nothing.
cudaError_t poison(void* p, size_t bytes, cudaStream_t stream);
// A range of a GEMM kernel's shared memory, as offsets from its aligned base, that no two
// threads share but through a barrier (bar.sync), which racecheck follows (it follows no
// mbarrier): a racecheck report on it is a race (tools/racecheck_sass.py). `kernel` names the
// instance as c++filt does, without its parameters.
struct SmemRange {
  std::string kernel, what;
  int begin, end;
};
std::vector<SmemRange> gemm_private_smem();

}  // namespace jax_megamoe
