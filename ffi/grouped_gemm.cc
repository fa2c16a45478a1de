// XLA FFI handlers that run the fused layer's grouped FP8 GEMMs alone, on a caller-built pool:
//   kL1GemmTarget: act = quant_1x128(swiglu(a x W1[e]^T) * row_weight)   (launch_l1)
//   kL2GemmTarget: y[row_src[r]] = bf16(act[r] x W2[e]^T)                 (launch_l2)
// Row block b (kBlockM rows) belongs to local expert block_expert[b] (< 0: skipped); blocks at
// or past num_blocks[0] are skipped; rows with row_src < 0 are padding and never stored.
// Execute only validates shapes and enqueues kernels (no sync, allocation or module loading), so
// both handlers are command-buffer compatible; prepare_standalone must have run on the device.
#include "grouped_gemm.h"

#include <cuda_runtime_api.h>

#include <array>
#include <atomic>
#include <climits>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "ffi_common.h"
#include "jax_megamoe/launch.h"
#include "jax_megamoe/standalone.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace jax_megamoe {
namespace {

constexpr int kMaxDevices = 64;
// SM count of each prepared device; 0 = prepare_standalone has not run there.
std::array<std::atomic<int>, kMaxDevices> g_num_sms{};

// The tile counter of launch_l1/launch_l2 (launch.h) in the call's scratch output: zero it on
// the stream before the kernel claims from it.
cudaError_t zero_claims(int32_t* claims, cudaStream_t stream) {
  return cudaMemsetAsync(claims, 0, sizeof(int32_t), stream);
}

// Persistent grid size: `num_ctas`, or every SM of the device x gemm_ctas_per_sm() for 0.
ffi::Error grid_size(const char* target, int32_t device_ordinal, int64_t num_ctas, int* out) {
  const int sms = device_ordinal >= 0 && device_ordinal < kMaxDevices
                      ? g_num_sms[device_ordinal].load(std::memory_order_acquire)
                      : 0;
  if (sms == 0) {
    return ffi::Error(
        ffi::ErrorCode::kFailedPrecondition,
        std::string(target) + ": the standalone kernels were not prepared on device " +
            std::to_string(device_ordinal) +
            "; call jax_megamoe._ffi.prepare_standalone() (the grouped_gemm wrappers do) first");
  }
  if (num_ctas < 0 || num_ctas > kMaxGemmCtas) {
    return ffi::Error::InvalidArgument(
        std::string(target) + ": num_ctas " + std::to_string(num_ctas) + " must be in [0, " +
        std::to_string(kMaxGemmCtas) + "] (0 = every SM of the device)");
  }
  *out = num_ctas == 0 ? sms * gemm_ctas_per_sm() : static_cast<int>(num_ctas);
  return ffi::Error::Success();
}

ffi::Error L1GemmExecute(cudaStream_t stream, int32_t device_ordinal, ffi::AnyBuffer a,
                         ffi::Buffer<ffi::F32> a_scale, ffi::Buffer<ffi::F32> row_weight,
                         ffi::Buffer<ffi::S32> row_src, ffi::Buffer<ffi::S32> block_expert,
                         ffi::Buffer<ffi::S32> num_blocks, ffi::AnyBuffer w1,
                         ffi::Buffer<ffi::F32> w1_scale, ffi::Result<ffi::AnyBuffer> act,
                         ffi::Result<ffi::Buffer<ffi::F32>> act_scale,
                         ffi::Result<ffi::Buffer<ffi::S32>> claims, float activation_clamp,
                         int64_t num_ctas) {
  const int64_t P = dim(a.dimensions(), 0), H = dim(a.dimensions(), 1);
  const int64_t E = dim(w1.dimensions(), 0), I = dim(w1.dimensions(), 1) / 2;
  const int64_t q = kQuantBlock;
  OperandCheck s(kL1GemmTarget);
  s.require(is_e4m3(a) && is_e4m3(w1) && is_e4m3(*act), "a, w1 and act must be float8_e4m3fn");
  s.require(a.dimensions().size() == 2 && P > 0 && P % kBlockM == 0 && P <= INT_MAX,
            "a must be [P, H] with P a positive multiple of " + std::to_string(kBlockM));
  s.require(H > 0 && H % q == 0, "hidden (a's dimension 1) must be a positive multiple of 128");
  s.require(w1.dimensions().size() == 3 && E > 0 && I > 0 && I % q == 0,
            "w1 must be [E, 2I, H] with E >= 1 and I a positive multiple of 128");
  s.expect("a_scale", a_scale.dimensions(), {P, H / q});
  s.expect("row_weight", row_weight.dimensions(), {P});
  s.expect("row_src", row_src.dimensions(), {P});
  s.expect("block_expert", block_expert.dimensions(), {P / kBlockM});
  s.expect("num_blocks", num_blocks.dimensions(), {1});
  s.expect("w1", w1.dimensions(), {E, 2 * I, H});
  s.expect("w1_scale", w1_scale.dimensions(), {E, 2 * I / q, H / q});
  s.expect("act", act->dimensions(), {P, I});
  s.expect("act_scale", act_scale->dimensions(), {P, I / q});
  s.expect("claims", claims->dimensions(), {1});
  if (s.failed()) return s.error();
  if (ffi::Error err = check_aligned16(kL1GemmTarget, "a, w1 or act",
                                       {a.untyped_data(), w1.untyped_data(), act->untyped_data()});
      err.failure()) {
    return err;
  }
  int grid = 0;
  if (ffi::Error err = grid_size(kL1GemmTarget, device_ordinal, num_ctas, &grid); err.failure()) {
    return err;
  }

  L1Params p{};
  p.a = static_cast<const uint8_t*>(a.untyped_data());
  p.a_scale = a_scale.typed_data();
  p.row_weight = row_weight.typed_data();
  p.row_src = row_src.typed_data();
  p.block_expert = block_expert.typed_data();
  p.num_blocks = num_blocks.typed_data();
  p.w1 = static_cast<const uint8_t*>(w1.untyped_data());
  p.w1_scale = w1_scale.typed_data();
  p.act = static_cast<uint8_t*>(act->untyped_data());
  p.act_scale = act_scale->typed_data();
  p.num_experts = static_cast<int>(E);
  p.hidden = static_cast<int>(H);
  p.intermediate = static_cast<int>(I);
  p.max_blocks = static_cast<int>(P / kBlockM);
  p.clamp = activation_clamp;
  p.num_ctas = grid;
  p.tile_claims = claims->typed_data();
  if (cudaError_t err = zero_claims(p.tile_claims, stream); err != cudaSuccess) {
    return launch_error(kL1GemmTarget, device_ordinal, err);
  }
  if (cudaError_t err = poison(p.act, size_t(P) * I, stream); err != cudaSuccess) {
    return launch_error(kL1GemmTarget, device_ordinal, err);
  }
  if (cudaError_t err = poison(p.act_scale, size_t(P) * (I / kQuantBlock) * sizeof(float), stream);
      err != cudaSuccess) {
    return launch_error(kL1GemmTarget, device_ordinal, err);
  }
  if (cudaError_t err = launch_l1(p, stream); err != cudaSuccess) {
    return launch_error(kL1GemmTarget, device_ordinal, err);
  }
  return ffi::Error::Success();
}

ffi::Error L2GemmExecute(cudaStream_t stream, int32_t device_ordinal, ffi::AnyBuffer act,
                         ffi::Buffer<ffi::F32> act_scale, ffi::Buffer<ffi::S32> row_src,
                         ffi::Buffer<ffi::S32> block_expert, ffi::Buffer<ffi::S32> num_blocks,
                         ffi::AnyBuffer w2, ffi::Buffer<ffi::F32> w2_scale,
                         ffi::Result<ffi::Buffer<ffi::BF16>> y,
                         ffi::Result<ffi::Buffer<ffi::S64>> table,
                         ffi::Result<ffi::Buffer<ffi::S32>> claims, int64_t num_ctas) {
  const int64_t P = dim(act.dimensions(), 0), I = dim(act.dimensions(), 1);
  const int64_t E = dim(w2.dimensions(), 0), H = dim(w2.dimensions(), 1);
  const int64_t Y = dim(y->dimensions(), 0);
  const int64_t q = kQuantBlock;
  OperandCheck s(kL2GemmTarget);
  s.require(is_e4m3(act) && is_e4m3(w2), "act and w2 must be float8_e4m3fn");
  s.require(act.dimensions().size() == 2 && P > 0 && P % kBlockM == 0 && P <= INT_MAX,
            "act must be [P, I] with P a positive multiple of " + std::to_string(kBlockM));
  s.require(I > 0 && I % q == 0,
            "intermediate (act's dimension 1) must be a positive multiple of 128");
  s.require(w2.dimensions().size() == 3 && E > 0 && H > 0 && H % q == 0,
            "w2 must be [E, H, I] with E >= 1 and H a positive multiple of 128");
  s.require(y->dimensions().size() == 2 && Y > 0 && Y <= INT_MAX,
            "y must be [rows, H] with 1 <= rows < 2^31");
  s.expect("act_scale", act_scale.dimensions(), {P, I / q});
  s.expect("row_src", row_src.dimensions(), {P});
  s.expect("block_expert", block_expert.dimensions(), {P / kBlockM});
  s.expect("num_blocks", num_blocks.dimensions(), {1});
  s.expect("w2", w2.dimensions(), {E, H, I});
  s.expect("w2_scale", w2_scale.dimensions(), {E, H / q, I / q});
  s.expect("y", y->dimensions(), {Y, H});
  s.expect("table", table->dimensions(), {1});
  s.expect("claims", claims->dimensions(), {1});
  if (s.failed()) return s.error();
  if (ffi::Error err = check_aligned16(kL2GemmTarget, "act, w2 or y",
                                       {act.untyped_data(), w2.untyped_data(), y->untyped_data()});
      err.failure()) {
    return err;
  }
  int grid = 0;
  if (ffi::Error err = grid_size(kL2GemmTarget, device_ordinal, num_ctas, &grid); err.failure()) {
    return err;
  }

  // The kernel stores row r at combine[rank] + (k * max_tokens + token) * H for the slot code
  // row_src[r] = (rank * max_tokens + token) * topk + k. With one rank, topk 1 and max_tokens Y,
  // that is y + row_src[r] * H: a one-entry table holding y's address.
  void** slot = reinterpret_cast<void**>(table->typed_data());
  if (cudaError_t err = launch_store_pointer(slot, y->untyped_data(), stream); err != cudaSuccess) {
    return launch_error(kL2GemmTarget, device_ordinal, err);
  }
  L2Params p{};
  p.act = static_cast<const uint8_t*>(act.untyped_data());
  p.act_scale = act_scale.typed_data();
  p.row_src = row_src.typed_data();
  p.block_expert = block_expert.typed_data();
  p.num_blocks = num_blocks.typed_data();
  p.w2 = static_cast<const uint8_t*>(w2.untyped_data());
  p.w2_scale = w2_scale.typed_data();
  p.combine = reinterpret_cast<uint16_t* const*>(slot);
  p.num_experts = static_cast<int>(E);
  p.hidden = static_cast<int>(H);
  p.intermediate = static_cast<int>(I);
  p.topk = 1;
  p.max_tokens = static_cast<int>(Y);
  p.max_blocks = static_cast<int>(P / kBlockM);
  p.num_ctas = grid;
  p.tile_claims = claims->typed_data();
  if (cudaError_t err = zero_claims(p.tile_claims, stream); err != cudaSuccess) {
    return launch_error(kL2GemmTarget, device_ordinal, err);
  }
  if (cudaError_t err = poison(y->untyped_data(), size_t(Y) * H * sizeof(uint16_t), stream);
      err != cudaSuccess) {
    return launch_error(kL2GemmTarget, device_ordinal, err);
  }
  if (cudaError_t err = launch_l2(p, stream); err != cudaSuccess) {
    return launch_error(kL2GemmTarget, device_ordinal, err);
  }
  return ffi::Error::Success();
}

}  // namespace

void prepare_standalone(int device_ordinal) {
  if (device_ordinal >= kMaxDevices) {
    throw std::invalid_argument("jax_megamoe: device ordinal " + std::to_string(device_ordinal) +
                                " is out of range; the standalone GEMMs support " +
                                std::to_string(kMaxDevices) + " devices");
  }
  if (device_ordinal >= 0 && g_num_sms[device_ordinal].load(std::memory_order_acquire) != 0) {
    return;
  }
  DeviceGuard guard(device_ordinal);
  require_sm90(device_ordinal, "grouped GEMM kernels");
  const int num_sms = device_sm_count(device_ordinal);
  check_cuda(prepare_standalone_kernels(),
             "loading the grouped GEMM kernels on device " + std::to_string(device_ordinal));
  g_num_sms[device_ordinal].store(num_sms, std::memory_order_release);
}

}  // namespace jax_megamoe

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxMegamoeL1Gemm,
                              jax_megamoe::Reporting<jax_megamoe::L1GemmExecute>::execute,
                              jax_megamoe::bind_cuda_handler()
                                  .Arg<ffi::AnyBuffer>()         // a
                                  .Arg<ffi::Buffer<ffi::F32>>()  // a_scale
                                  .Arg<ffi::Buffer<ffi::F32>>()  // row_weight
                                  .Arg<ffi::Buffer<ffi::S32>>()  // row_src
                                  .Arg<ffi::Buffer<ffi::S32>>()  // block_expert
                                  .Arg<ffi::Buffer<ffi::S32>>()  // num_blocks
                                  .Arg<ffi::AnyBuffer>()         // w1
                                  .Arg<ffi::Buffer<ffi::F32>>()  // w1_scale
                                  .Ret<ffi::AnyBuffer>()         // act
                                  .Ret<ffi::Buffer<ffi::F32>>()  // act_scale
                                  .Ret<ffi::Buffer<ffi::S32>>()  // claims (scratch)
                                  .Attr<float>("activation_clamp")
                                  .Attr<int64_t>("num_ctas"),
                              {xla::ffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxMegamoeL2Gemm,
                              jax_megamoe::Reporting<jax_megamoe::L2GemmExecute>::execute,
                              jax_megamoe::bind_cuda_handler()
                                  .Arg<ffi::AnyBuffer>()          // act
                                  .Arg<ffi::Buffer<ffi::F32>>()   // act_scale
                                  .Arg<ffi::Buffer<ffi::S32>>()   // row_src
                                  .Arg<ffi::Buffer<ffi::S32>>()   // block_expert
                                  .Arg<ffi::Buffer<ffi::S32>>()   // num_blocks
                                  .Arg<ffi::AnyBuffer>()          // w2
                                  .Arg<ffi::Buffer<ffi::F32>>()   // w2_scale
                                  .Ret<ffi::Buffer<ffi::BF16>>()  // y
                                  .Ret<ffi::Buffer<ffi::S64>>()   // table (scratch)
                                  .Ret<ffi::Buffer<ffi::S32>>()   // claims (scratch)
                                  .Attr<int64_t>("num_ctas"),
                              {xla::ffi::Traits::kCmdBufferCompatible});
