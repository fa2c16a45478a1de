// What the FFI handler files (mega_moe.cc, grouped_gemm.cc, symm_buffer.cc) share: operand checks
// that become errors naming the target, CUDA errors as messages, and the device queries and guard
// of the setup calls. Execute-path helpers return ffi::Error; setup helpers throw
// (std::invalid_argument -> ValueError, std::runtime_error -> RuntimeError through nanobind).
#pragma once

#include <cuda.h>
#include <cuda_runtime_api.h>

#include <cstdint>
#include <cstdio>
#include <initializer_list>
#include <string>
#include <utility>

#include "xla/ffi/api/ffi.h"

namespace jax_megamoe {

namespace ffi = xla::ffi;

// Every handler runs on XLA's CUDA stream and finds its per-device state by the device ordinal.
inline auto bind_cuda_handler() {
  return ffi::Ffi::Bind().Ctx<ffi::PlatformStream<cudaStream_t>>().Ctx<ffi::DeviceOrdinal>();
}

// A handler as XLA calls it: the same execute function, but a failure's message also goes to
// stderr before it is returned. On jax 0.11.2 (GPU) a handler that returns an error has been seen
// to crash the process, so the message must not depend on XLA reporting it.
template <auto kExecute>
struct Reporting;
template <class... Args, ffi::Error (*kExecute)(Args...)>
struct Reporting<kExecute> {
  static ffi::Error execute(Args... args) {
    ffi::Error err = kExecute(std::move(args)...);
    if (err.failure()) std::fprintf(stderr, "%s\n", err.message().c_str());
    return err;
  }
};

// "[2, 128]"
std::string shape_str(ffi::AnyBuffer::Dimensions dims);
// Dimension i, or -1 when the buffer has fewer dimensions (then a later shape check fails).
int64_t dim(ffi::AnyBuffer::Dimensions dims, size_t i);
bool is_e4m3(const ffi::AnyBuffer& buffer);

// Checks a handler's operands in order; the first failure becomes an InvalidArgument error that
// starts with the target name.
class OperandCheck {
 public:
  // `expected_from` ends a shape mismatch message, e.g. " from the workspace configuration".
  explicit OperandCheck(const char* target, const char* expected_from = "")
      : target_(target), expected_from_(expected_from) {}

  void expect(const char* name, ffi::AnyBuffer::Dimensions dims,
              std::initializer_list<int64_t> want);
  void require(bool ok, const std::string& message);
  bool failed() const { return !error_.empty(); }
  ffi::Error error() const { return ffi::Error::InvalidArgument(error_); }

 private:
  const char* target_;
  const char* expected_from_;
  std::string error_;
};

// The kernels move 16-byte vectors; XLA's buffers are at least this aligned, so a miss is an
// internal error. `names` lists the buffers for the message ("a, w1 or act").
ffi::Error check_aligned16(const char* target, const char* names,
                           std::initializer_list<const void*> buffers);
ffi::Error launch_error(const char* target, int device_ordinal, cudaError_t err);

// Throws std::runtime_error "jax_megamoe: <what>: <CUDA message>" (setup calls only).
void check_cuda(cudaError_t err, const std::string& what);

// Visible CUDA devices; 0 without a driver or device (callers fall back to the reference).
int device_count();
std::pair<int, int> device_capability(int ordinal);
int device_sm_count(int ordinal);
// Throws std::runtime_error unless the device is SM90 (Hopper); `kernels` names what needs it.
void require_sm90(int ordinal, const char* kernels);

// Makes `ordinal` current for one setup call, then makes the thread's earlier context current
// again, or none if it had none; throws std::invalid_argument if the ordinal is not a visible
// device. Not cudaSetDevice back to cudaGetDevice's answer: on a thread with no context that
// answer is device 0, and setting it creates and binds device 0's primary context (hundreds of
// MB), e.g. after a SymmBuffer for device 1 was created from a worker thread. (The runtime may
// still take `ordinal` as the device of a later call on a thread left with no context; each
// setup call of the extension sets its own.)
class DeviceGuard {
 public:
  explicit DeviceGuard(int ordinal);
  ~DeviceGuard();
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  CUcontext previous_ = nullptr;
};

}  // namespace jax_megamoe
