// XLA FFI handler "jax_megamoe_fp8_mega_moe": validates shapes against the workspace the
// buffer_id attribute names on this device, then enqueues the runtime's kernels on XLA's stream.
// Execute never syncs, allocates or loads modules, so the handler is command-buffer compatible.
#include <cuda_runtime_api.h>

#include <cmath>
#include <cstdint>
#include <sstream>
#include <string>

#include "jax_megamoe/runtime.h"
#include "symm_buffer.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace jax_megamoe {
namespace {

std::string shape_str(ffi::AnyBuffer::Dimensions dims) {
  std::ostringstream s;
  s << "[";
  for (size_t i = 0; i < dims.size(); ++i) s << (i ? ", " : "") << dims[i];
  s << "]";
  return s.str();
}

// Checks one operand's shape; the first mismatch becomes the handler's InvalidArgument error.
class ShapeCheck {
 public:
  void expect(const char* name, ffi::AnyBuffer::Dimensions dims,
              std::initializer_list<int64_t> want) {
    if (!error_.empty()) return;
    bool ok = dims.size() == want.size();
    size_t i = 0;
    for (int64_t w : want) ok = ok && dims[i++] == w;
    if (ok) return;
    std::ostringstream s;
    s << "jax_megamoe: " << name << " has shape " << shape_str(dims) << ", expected [";
    i = 0;
    for (int64_t w : want) s << (i++ ? ", " : "") << w;
    s << "] from the workspace configuration";
    error_ = s.str();
  }
  const std::string& error() const { return error_; }

 private:
  std::string error_;
};

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

ffi::Error MegaMoeExecute(cudaStream_t stream, int32_t device_ordinal, ffi::AnyBuffer x,
                          ffi::Buffer<ffi::F32> x_scale, ffi::Buffer<ffi::S32> topk_ids,
                          ffi::Buffer<ffi::F32> topk_weights, ffi::AnyBuffer w1,
                          ffi::Buffer<ffi::F32> w1_scale, ffi::AnyBuffer w2,
                          ffi::Buffer<ffi::F32> w2_scale, ffi::Result<ffi::Buffer<ffi::BF16>> y,
                          int64_t buffer_id, float activation_clamp) {
  const std::optional<WorkspaceState> state = find_workspace(buffer_id, device_ordinal);
  if (!state) {
    return ffi::Error::InvalidArgument(
        "jax_megamoe: no workspace with buffer_id " + std::to_string(buffer_id) + " on device " +
        std::to_string(device_ordinal) + "; create the SymmBuffer on this device's mesh first");
  }
  if (!state->connected) {
    return ffi::Error::InvalidArgument("jax_megamoe: workspace " + std::to_string(buffer_id) +
                                       " on device " + std::to_string(device_ordinal) +
                                       " was created but its peers were never connected");
  }
  for (auto [name, buffer] : {std::pair{"x", &x}, {"w1", &w1}, {"w2", &w2}}) {
    if (buffer->element_type() != ffi::DataType::F8E4M3FN) {
      return ffi::Error::InvalidArgument(std::string("jax_megamoe: ") + name +
                                         " must be float8_e4m3fn");
    }
  }

  const WorkspaceConfig& c = state->config;
  const int64_t m = x.dimensions().size() == 2 ? x.dimensions()[0] : -1;
  if (m < 0 || m > c.max_tokens) {
    return ffi::Error::InvalidArgument(
        "jax_megamoe: x has shape " + shape_str(x.dimensions()) + "; expected [M, " +
        std::to_string(c.hidden) +
        "] with M <= max_tokens_per_rank = " + std::to_string(c.max_tokens) + " of the workspace");
  }
  const int64_t H = c.hidden, I = c.intermediate, K = c.topk, E_l = c.num_experts / c.num_ranks;
  const int64_t q = kQuantBlock;
  ShapeCheck check;
  check.expect("x", x.dimensions(), {m, H});
  check.expect("x_scale", x_scale.dimensions(), {m, H / q});
  check.expect("topk_ids", topk_ids.dimensions(), {m, K});
  check.expect("topk_weights", topk_weights.dimensions(), {m, K});
  check.expect("w1", w1.dimensions(), {E_l, 2 * I, H});
  check.expect("w1_scale", w1_scale.dimensions(), {E_l, 2 * I / q, H / q});
  check.expect("w2", w2.dimensions(), {E_l, H, I});
  check.expect("w2_scale", w2_scale.dimensions(), {E_l, H / q, I / q});
  check.expect("y", y->dimensions(), {m, H});
  if (!check.error().empty()) return ffi::Error::InvalidArgument(check.error());

  // The staging and combine copies move 16-byte vectors; XLA's buffers are at least this aligned.
  if (!aligned16(x.untyped_data()) || !aligned16(y->untyped_data()) ||
      !aligned16(w1.untyped_data()) || !aligned16(w2.untyped_data())) {
    return ffi::Error::Internal("jax_megamoe: an x, y, w1 or w2 buffer is not 16-byte aligned");
  }

  MegaMoeArgs args{};
  args.config = c;
  args.rank = state->rank;
  args.sm_budget = state->sm_budget;
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
  if (cudaError_t err = launch_mega_moe(args, stream); err != cudaSuccess) {
    return ffi::Error::Internal(std::string("jax_megamoe: kernel launch failed on device ") +
                                std::to_string(device_ordinal) + ": " + cudaGetErrorString(err));
  }
  return ffi::Error::Success();
}

}  // namespace
}  // namespace jax_megamoe

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxMegamoeFp8MegaMoe, jax_megamoe::MegaMoeExecute,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Ctx<ffi::DeviceOrdinal>()
                                  .Arg<ffi::AnyBuffer>()          // x
                                  .Arg<ffi::Buffer<ffi::F32>>()   // x_scale
                                  .Arg<ffi::Buffer<ffi::S32>>()   // topk_ids
                                  .Arg<ffi::Buffer<ffi::F32>>()   // topk_weights
                                  .Arg<ffi::AnyBuffer>()          // w1
                                  .Arg<ffi::Buffer<ffi::F32>>()   // w1_scale
                                  .Arg<ffi::AnyBuffer>()          // w2
                                  .Arg<ffi::Buffer<ffi::F32>>()   // w2_scale
                                  .Ret<ffi::Buffer<ffi::BF16>>()  // y
                                  .Attr<int64_t>("buffer_id")
                                  .Attr<float>("activation_clamp"),
                              {xla::ffi::Traits::kCmdBufferCompatible});
