#include "ffi_common.h"

#include <cudaTypedefs.h>

#include <stdexcept>

namespace jax_megamoe {

namespace {

// "[a, b, c]". std::to_string, not an ostringstream: formatting a number through iostreams inside
// an FFI execute call crashed the process on jax 0.11.2 (GPU), in the stream's locale code.
template <class Range>
std::string bracketed(const Range& values) {
  std::string s = "[";
  size_t i = 0;
  for (int64_t v : values) s += (i++ ? ", " : "") + std::to_string(v);
  return s + "]";
}

// The driver's current-context calls, through the runtime (no link-time libcuda dependency).
struct ContextCalls {
  PFN_cuCtxGetCurrent_v4000 get = nullptr;
  PFN_cuCtxSetCurrent_v4000 set = nullptr;
};

// A driver function by name, or null where this driver lacks it.
void* driver_entry(const char* name) {
  void* fn = nullptr;
  cudaDriverEntryPointQueryResult found{};
  const cudaError_t err =
      cudaGetDriverEntryPointByVersion(name, &fn, 4000, cudaEnableDefault, &found);
  return err == cudaSuccess && found == cudaDriverEntryPointSuccess ? fn : nullptr;
}

const ContextCalls& context_calls() {
  static const ContextCalls calls{
      reinterpret_cast<PFN_cuCtxGetCurrent_v4000>(driver_entry("cuCtxGetCurrent")),
      reinterpret_cast<PFN_cuCtxSetCurrent_v4000>(driver_entry("cuCtxSetCurrent"))};
  return calls;
}

}  // namespace

std::string shape_str(ffi::AnyBuffer::Dimensions dims) { return bracketed(dims); }

int64_t dim(ffi::AnyBuffer::Dimensions dims, size_t i) { return i < dims.size() ? dims[i] : -1; }

bool is_e4m3(const ffi::AnyBuffer& buffer) {
  return buffer.element_type() == ffi::DataType::F8E4M3FN;
}

void OperandCheck::expect(const char* name, ffi::AnyBuffer::Dimensions dims,
                          std::initializer_list<int64_t> want) {
  if (failed()) return;
  bool ok = dims.size() == want.size();
  size_t i = 0;
  for (int64_t w : want) ok = ok && dims[i++] == w;
  if (ok) return;
  error_ = std::string(target_) + ": " + name + " has shape " + shape_str(dims) + ", expected " +
           bracketed(want) + expected_from_;
}

void OperandCheck::require(bool ok, const std::string& message) {
  if (!failed() && !ok) error_ = std::string(target_) + ": " + message;
}

ffi::Error check_aligned16(const char* target, const char* names,
                           std::initializer_list<const void*> buffers) {
  for (const void* p : buffers) {
    if (reinterpret_cast<uintptr_t>(p) % 16 != 0) {
      return ffi::Error::Internal(std::string(target) + ": " + names + " is not 16-byte aligned");
    }
  }
  return ffi::Error::Success();
}

ffi::Error launch_error(const char* target, int device_ordinal, cudaError_t err) {
  return ffi::Error::Internal(std::string(target) + ": kernel launch failed on device " +
                              std::to_string(device_ordinal) + ": " + cudaGetErrorString(err));
}

void check_cuda(cudaError_t err, const std::string& what) {
  if (err != cudaSuccess) {
    cudaGetLastError();  // clear a non-sticky error so later calls on this thread are not blamed
    throw std::runtime_error("jax_megamoe: " + what + ": " + cudaGetErrorString(err));
  }
}

int device_count() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return count;
}

std::pair<int, int> device_capability(int ordinal) {
  int major = 0, minor = 0;
  check_cuda(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, ordinal),
             "querying the compute capability of device " + std::to_string(ordinal));
  check_cuda(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, ordinal),
             "querying the compute capability of device " + std::to_string(ordinal));
  return {major, minor};
}

int device_sm_count(int ordinal) {
  int num_sms = 0;
  check_cuda(cudaDeviceGetAttribute(&num_sms, cudaDevAttrMultiProcessorCount, ordinal),
             "querying the SM count of device " + std::to_string(ordinal));
  return num_sms;
}

void require_sm90(int ordinal, const char* kernels) {
  const auto [major, minor] = device_capability(ordinal);
  if (major != 9) {
    throw std::runtime_error("jax_megamoe: device " + std::to_string(ordinal) +
                             " has compute capability " + std::to_string(major) + "." +
                             std::to_string(minor) + "; the " + kernels +
                             " are built for SM90 (Hopper) only");
  }
}

DeviceGuard::DeviceGuard(int ordinal) {
  const int count = device_count();
  if (ordinal < 0 || ordinal >= count) {
    throw std::invalid_argument("jax_megamoe: device ordinal " + std::to_string(ordinal) +
                                " is out of range; " + std::to_string(count) +
                                " CUDA devices are visible");
  }
  const ContextCalls& calls = context_calls();
  if (calls.get == nullptr || calls.set == nullptr) {
    throw std::runtime_error(
        "jax_megamoe: the CUDA driver's cuCtxGetCurrent/cuCtxSetCurrent were not found");
  }
  if (calls.get(&previous_) != CUDA_SUCCESS) {
    throw std::runtime_error("jax_megamoe: cuCtxGetCurrent failed");
  }
  check_cuda(cudaSetDevice(ordinal), "cudaSetDevice(" + std::to_string(ordinal) + ")");
}

DeviceGuard::~DeviceGuard() { context_calls().set(previous_); }

}  // namespace jax_megamoe
