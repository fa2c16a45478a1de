// XLA FFI handler of the fused layer (kFp8MegaMoeTarget, mega_moe.h): refuses a workspace whose
// kernels recorded an error in an earlier call, validates shapes against the workspace the
// buffer_id attribute names on this device, then enqueues the runtime's kernels on XLA's stream.
// Execute never syncs, allocates or loads modules, so the handler is command-buffer compatible.
#include "mega_moe.h"

#include <cuda_runtime_api.h>

#include <array>
#include <atomic>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "error_record.h"
#include "ffi_common.h"
#include "jax_megamoe/runtime.h"
#include "symm_buffer.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace jax_megamoe {
namespace {

std::array<std::atomic<bool>, kMaxHookDevices> g_fail_next_l1_launch{};

// One shot: true once after inject_launch_failure(device_ordinal). A relaxed load first, so a
// call without the hook set costs no atomic write.
bool take_injected_failure(int device_ordinal) {
  if (device_ordinal < 0 || device_ordinal >= kMaxHookDevices) return false;
  std::atomic<bool>& flag = g_fail_next_l1_launch[device_ordinal];
  return flag.load(std::memory_order_relaxed) && flag.exchange(false);
}

ffi::Error MegaMoeExecute(cudaStream_t stream, int32_t device_ordinal, ffi::AnyBuffer x,
                          ffi::Buffer<ffi::F32> x_scale, ffi::Buffer<ffi::S32> topk_ids,
                          ffi::Buffer<ffi::F32> topk_weights, ffi::AnyBuffer w1,
                          ffi::Buffer<ffi::F32> w1_scale, ffi::AnyBuffer w2,
                          ffi::Buffer<ffi::F32> w2_scale, ffi::Buffer<ffi::S32> expected_rank,
                          ffi::Result<ffi::Buffer<ffi::BF16>> y, int64_t buffer_id,
                          float activation_clamp) {
  const std::optional<WorkspaceState> state = find_workspace(buffer_id, device_ordinal);
  if (!state) {
    return ffi::Error::InvalidArgument(
        std::string(kFp8MegaMoeTarget) + ": no workspace with buffer_id " +
        std::to_string(buffer_id) + " on device " + std::to_string(device_ordinal) +
        "; create the SymmBuffer on this device's mesh first");
  }
  if (!state->connected) {
    return ffi::Error::InvalidArgument(std::string(kFp8MegaMoeTarget) + ": workspace " +
                                       std::to_string(buffer_id) + " on device " +
                                       std::to_string(device_ordinal) +
                                       " was created but its peers were never connected");
  }
  // Sticky: after a failure the ranks' epochs may disagree, so no later call may run. The record
  // shows what kernels that have finished wrote; calls enqueued before they finished are skipped
  // on the device.
  if (const ErrorRecord record = read_error_record(state->error); record.code != kErrorNone) {
    return ffi::Error(
        ffi::ErrorCode::kFailedPrecondition,
        std::string(kFp8MegaMoeTarget) + ": refused, an earlier call failed. " +
            error_record_message(record, buffer_id, device_ordinal, state->timeout_ns));
  }
  const WorkspaceConfig& c = state->config;
  const int64_t m = dim(x.dimensions(), 0);
  OperandCheck check(kFp8MegaMoeTarget, " from the workspace configuration");
  for (auto [name, buffer] : {std::pair{"x", &x}, {"w1", &w1}, {"w2", &w2}}) {
    check.require(is_e4m3(*buffer), std::string(name) + " must be float8_e4m3fn");
  }
  if (x.dimensions().size() != 2 || m > c.max_tokens) {  // the message is built only on failure
    check.require(false, "x has shape " + shape_str(x.dimensions()) + "; expected [M, " +
                             std::to_string(c.hidden) + "] with M <= max_tokens_per_rank = " +
                             std::to_string(c.max_tokens) + " of the workspace");
  }
  const int64_t H = c.hidden, I = c.intermediate, K = c.topk, E_l = c.num_experts / c.num_ranks;
  const int64_t q = kQuantBlock;
  check.expect("x", x.dimensions(), {m, H});
  check.expect("x_scale", x_scale.dimensions(), {m, H / q});
  check.expect("topk_ids", topk_ids.dimensions(), {m, K});
  check.expect("topk_weights", topk_weights.dimensions(), {m, K});
  check.expect("w1", w1.dimensions(), {E_l, 2 * I, H});
  check.expect("w1_scale", w1_scale.dimensions(), {E_l, 2 * I / q, H / q});
  check.expect("w2", w2.dimensions(), {E_l, H, I});
  check.expect("w2_scale", w2_scale.dimensions(), {E_l, H / q, I / q});
  check.expect("expected_rank", expected_rank.dimensions(), std::initializer_list<int64_t>{});
  check.expect("y", y->dimensions(), {m, H});
  if (check.failed()) return check.error();
  // The staging and combine copies move 16-byte vectors.
  if (ffi::Error err = check_aligned16(
          kFp8MegaMoeTarget, "an x, y, w1 or w2 buffer",
          {x.untyped_data(), y->untyped_data(), w1.untyped_data(), w2.untyped_data()});
      err.failure()) {
    return err;
  }

  MegaMoeArgs args{};
  args.config = c;
  args.rank = state->rank;
  args.sm_budget = state->sm_budget;
  args.whole_device = state->whole_device;
  args.workspace = state->base;
  args.num_tokens = static_cast<int>(m);
  args.x = x.untyped_data();
  args.x_scale = x_scale.typed_data();
  args.topk_ids = topk_ids.typed_data();
  args.topk_weights = topk_weights.typed_data();
  args.w1 = w1.untyped_data();
  args.w1_scale = w1_scale.typed_data();
  args.w2 = w2.untyped_data();
  args.w2_scale = w2_scale.typed_data();
  args.y = y->untyped_data();
  args.activation_clamp = activation_clamp;
  args.expected_rank = expected_rank.typed_data();
  args.fail_l1_launch = take_injected_failure(device_ordinal);
  if (cudaError_t err = launch_mega_moe(args, stream); err != cudaSuccess) {
    return launch_error(kFp8MegaMoeTarget, device_ordinal, err);
  }
  return ffi::Error::Success();
}

}  // namespace

void inject_launch_failure(int device_ordinal) {
  if (device_ordinal < 0 || device_ordinal >= kMaxHookDevices) {
    throw std::invalid_argument("jax_megamoe: inject_launch_failure: device ordinal " +
                                std::to_string(device_ordinal) + " is outside [0, " +
                                std::to_string(kMaxHookDevices) + ")");
  }
  g_fail_next_l1_launch[device_ordinal].store(true);
}

}  // namespace jax_megamoe

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxMegamoeFp8MegaMoe,
                              jax_megamoe::Reporting<jax_megamoe::MegaMoeExecute>::execute,
                              jax_megamoe::bind_cuda_handler()
                                  .Arg<ffi::AnyBuffer>()          // x
                                  .Arg<ffi::Buffer<ffi::F32>>()   // x_scale
                                  .Arg<ffi::Buffer<ffi::S32>>()   // topk_ids
                                  .Arg<ffi::Buffer<ffi::F32>>()   // topk_weights
                                  .Arg<ffi::AnyBuffer>()          // w1
                                  .Arg<ffi::Buffer<ffi::F32>>()   // w1_scale
                                  .Arg<ffi::AnyBuffer>()          // w2
                                  .Arg<ffi::Buffer<ffi::F32>>()   // w2_scale
                                  .Arg<ffi::Buffer<ffi::S32>>()   // expected_rank (scalar)
                                  .Ret<ffi::Buffer<ffi::BF16>>()  // y
                                  .Attr<int64_t>("buffer_id")
                                  .Attr<float>("activation_clamp"),
                              {xla::ffi::Traits::kCmdBufferCompatible});
