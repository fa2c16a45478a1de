#include "symm_buffer.h"

#include <cuda_runtime_api.h>

#include <cerrno>
#include <climits>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <map>
#include <mutex>
#include <stdexcept>
#include <string>

#include "ffi_common.h"
#include "jax_megamoe/runtime.h"

namespace jax_megamoe {
namespace {

using Key = std::pair<int64_t, int>;  // (buffer_id, device_ordinal)

// XLA runs each device's calls on its own thread, so lookups from execute and setup calls from
// Python can interleave.
std::mutex& registry_mutex() {
  static std::mutex mutex;
  return mutex;
}

std::map<Key, WorkspaceState>& registry() {
  static std::map<Key, WorkspaceState> states;
  return states;
}

// Peer workspaces mapped into this process with cudaIpcOpenMemHandle, per workspace. Kept apart
// from WorkspaceState, which execute copies on every call.
std::map<Key, std::vector<void*>>& opened_handles() {
  static std::map<Key, std::vector<void*>> opened;
  return opened;
}

static_assert(sizeof(cudaIpcMemHandle_t) == kIpcHandleBytes, "cudaIpcMemHandle_t is 64 bytes");

std::string key_str(int64_t buffer_id, int device_ordinal) {
  return "workspace " + std::to_string(buffer_id) + " on device " + std::to_string(device_ordinal);
}

// Setup copies run on a private non-blocking stream: the legacy default stream would also wait
// for XLA's streams on this device.
template <typename Enqueue>
void run_sync(const std::string& what, Enqueue enqueue) {
  cudaStream_t stream;
  check_cuda(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), "cudaStreamCreate");
  cudaError_t err = enqueue(stream);
  if (err == cudaSuccess) err = cudaStreamSynchronize(stream);
  cudaStreamDestroy(stream);
  check_cuda(err, what);
}

uint64_t timeout_ns_from_env() {
  const char* text = std::getenv("JAX_MEGAMOE_TIMEOUT_S");
  if (text == nullptr || *text == '\0') return uint64_t(kDefaultTimeoutS) * 1000000000u;
  char* end = nullptr;
  errno = 0;
  const double seconds = std::strtod(text, &end);
  if (errno != 0 || *end != '\0' || !std::isfinite(seconds) || seconds <= 0 || seconds > 1e9) {
    throw std::invalid_argument(std::string("jax_megamoe: JAX_MEGAMOE_TIMEOUT_S='") + text +
                                "' must be a positive number of seconds");
  }
  return uint64_t(seconds * 1e9);
}

uint64_t timeout_ns_of(double timeout_s) {
  if (timeout_s == 0) return timeout_ns_from_env();
  if (!std::isfinite(timeout_s) || timeout_s < 0 || timeout_s > 1e9) {
    throw std::invalid_argument("jax_megamoe: timeout_s (" + std::to_string(timeout_s) +
                                ") must be a positive number of seconds, at most 1e9");
  }
  return uint64_t(timeout_s * 1e9);
}

// The error record: pinned, mapped into every device's address space (portable), zeroed.
ErrorRecord* allocate_error_record(ErrorRecord** device_ptr) {
  void* host = nullptr;
  check_cuda(cudaHostAlloc(&host, sizeof(ErrorRecord), cudaHostAllocMapped | cudaHostAllocPortable),
             "allocating the pinned error record");
  std::memset(host, 0, sizeof(ErrorRecord));
  void* device = nullptr;
  if (cudaError_t err = cudaHostGetDevicePointer(&device, host, 0); err != cudaSuccess) {
    cudaFreeHost(host);
    check_cuda(err, "mapping the error record into the device");
  }
  *device_ptr = static_cast<ErrorRecord*>(device);
  return static_cast<ErrorRecord*>(host);
}

void require(bool ok, const std::string& message) {
  if (!ok) throw std::invalid_argument("jax_megamoe: " + message);
}

}  // namespace

size_t workspace_nbytes(const WorkspaceConfig& c) {
  require(c.num_ranks >= 1, "num_ranks must be >= 1");
  require(c.num_experts >= 1 && c.num_experts % c.num_ranks == 0,
          "num_experts (" + std::to_string(c.num_experts) +
              ") must be a positive multiple of num_ranks (" + std::to_string(c.num_ranks) + ")");
  require(c.num_experts / c.num_ranks <= kMaxLocalExperts,
          "at most " + std::to_string(kMaxLocalExperts) + " experts per rank are supported");
  require(c.hidden > 0 && c.hidden % kQuantBlock == 0,
          "hidden (" + std::to_string(c.hidden) + ") must be a positive multiple of 128");
  require(
      c.intermediate > 0 && c.intermediate % kQuantBlock == 0,
      "intermediate (" + std::to_string(c.intermediate) + ") must be a positive multiple of 128");
  require(c.topk >= 1 && c.topk <= kMaxTopk,
          "topk (" + std::to_string(c.topk) + ") must be in [1, " + std::to_string(kMaxTopk) + "]");
  require(c.max_tokens >= 1, "max_tokens_per_rank must be >= 1");
  // Pool rows and the (rank, token, slot) code in row_src are int32 on the device. Checked in
  // 64 bits here, before WorkspaceLayout narrows the pool's block count to int (worst_rows is
  // read only once R * Mmax is known small, so its product cannot have wrapped).
  const uint64_t slots = uint64_t(c.num_ranks) * uint64_t(c.max_tokens);
  require(slots <= uint64_t(INT_MAX) &&
              WorkspaceLayout::worst_rows(c) <= uint64_t(INT_MAX / kExpertAlignM) * kExpertAlignM,
          "num_ranks * max_tokens_per_rank * topk is too large for int32 pool row indices");
  const WorkspaceLayout layout = WorkspaceLayout::make(c);
  // The regions' byte counts sum in size_t: refuse what could wrap it (no GPU holds 2^62 bytes).
  const double pool = double(layout.pool_rows) * (double(c.hidden) + double(c.intermediate));
  const double combine = double(c.topk) * double(c.max_tokens) * double(c.hidden) * 2;
  require(2 * (pool + combine) < 0x1p62,
          "the workspace would take more than 2^62 bytes: lower hidden, intermediate or "
          "max_tokens_per_rank");
  return layout.total_bytes;
}

uintptr_t create_workspace(int64_t buffer_id, int device_ordinal, int rank,
                           const WorkspaceConfig& config, int sm_budget, double timeout_s) {
  const size_t nbytes = workspace_nbytes(config);
  require(rank >= 0 && rank < config.num_ranks,
          "rank " + std::to_string(rank) +
              " is outside [0, num_ranks = " + std::to_string(config.num_ranks) + ")");
  require(sm_budget >= 0, "sm_budget must be >= 0 (0 = every SM of the device)");
  {
    std::lock_guard<std::mutex> lock(registry_mutex());
    if (registry().count({buffer_id, device_ordinal})) {
      throw std::runtime_error("jax_megamoe: " + key_str(buffer_id, device_ordinal) +
                               " already exists; destroy it first");
    }
  }
  const uint64_t timeout_ns = timeout_ns_of(timeout_s);

  DeviceGuard guard(device_ordinal);
  require_sm90(device_ordinal, "fused kernels");
  const int num_sms = device_sm_count(device_ordinal);
  require(sm_budget <= num_sms, "sm_budget " + std::to_string(sm_budget) + " exceeds the " +
                                    std::to_string(num_sms) + " SMs of device " +
                                    std::to_string(device_ordinal));

  size_t free_bytes = 0, total_bytes = 0;
  check_cuda(cudaMemGetInfo(&free_bytes, &total_bytes), "cudaMemGetInfo");
  void* base = nullptr;
  if (cudaError_t err = cudaMalloc(&base, nbytes); err != cudaSuccess) {
    cudaGetLastError();
    throw std::runtime_error(
        "jax_megamoe: cannot allocate the " + std::to_string(nbytes) +
        "-byte workspace on device " + std::to_string(device_ordinal) + " (" +
        std::to_string(free_bytes) + " bytes free of " + std::to_string(total_bytes) + "; " +
        cudaGetErrorString(err) +
        "). Create the buffer before JAX preallocates, lower XLA_PYTHON_CLIENT_MEM_FRACTION, or "
        "lower max_tokens_per_rank.");
  }

  ErrorRecord* error = nullptr;
  try {
    const WorkspaceLayout layout = WorkspaceLayout::make(config);
    HeaderFixed header{};
    error = allocate_error_record(&header.error);
    header.timeout_ns = timeout_ns;
    header.rank = rank;
    header.num_ranks = config.num_ranks;
    // Flags and epochs start at 0, and rows no call has written yet hold finite values.
    run_sync("zero-filling the workspace", [&](cudaStream_t stream) {
      cudaError_t err = cudaMemsetAsync(base, 0, nbytes, stream);
      if (err != cudaSuccess) return err;
      return cudaMemcpyAsync(static_cast<uint8_t*>(base) + layout.header, &header, sizeof(header),
                             cudaMemcpyHostToDevice, stream);
    });
    check_cuda(prepare_runtime_kernels(),
               "loading the kernels on device " + std::to_string(device_ordinal));
  } catch (...) {
    cudaFree(base);
    if (error != nullptr) cudaFreeHost(error);
    throw;
  }

  std::lock_guard<std::mutex> lock(registry_mutex());
  const int budget = sm_budget == 0 ? num_sms : sm_budget;
  if (!registry()
           .emplace(
               Key{buffer_id, device_ordinal},
               WorkspaceState{config, device_ordinal, rank, budget, static_cast<uint8_t*>(base),
                              nbytes, false, error, timeout_ns, budget == num_sms})
           .second) {
    cudaFree(base);
    cudaFreeHost(error);
    throw std::runtime_error("jax_megamoe: " + key_str(buffer_id, device_ordinal) +
                             " was created concurrently by another thread");
  }
  return reinterpret_cast<uintptr_t>(base);
}

void connect_workspace(int64_t buffer_id, int device_ordinal, const std::vector<int>& peer_ordinals,
                       const std::vector<uintptr_t>& peer_ptrs) {
  std::optional<WorkspaceState> state = find_workspace(buffer_id, device_ordinal);
  if (!state) {
    throw std::runtime_error("jax_megamoe: " + key_str(buffer_id, device_ordinal) +
                             " does not exist");
  }
  const int num_ranks = state->config.num_ranks;
  require(int(peer_ordinals.size()) == num_ranks && int(peer_ptrs.size()) == num_ranks,
          "connect_workspace needs one device ordinal and one base pointer per rank (" +
              std::to_string(num_ranks) + "), got " + std::to_string(peer_ordinals.size()) +
              " and " + std::to_string(peer_ptrs.size()));
  require(peer_ordinals[state->rank] == device_ordinal &&
              peer_ptrs[state->rank] == reinterpret_cast<uintptr_t>(state->base),
          "entry " + std::to_string(state->rank) +
              " of the peer tables must be this rank's own "
              "device and workspace pointer");

  DeviceGuard guard(device_ordinal);
  for (int s = 0; s < num_ranks; ++s) {
    const int peer = peer_ordinals[s];
    require(peer_ptrs[s] != 0, "the workspace pointer of rank " + std::to_string(s) + " is null");
    // -1: a rank of another process, mapped by open_ipc_handle (which enables peer access).
    if (peer == -1 || peer == device_ordinal) continue;
    require(peer >= 0 && peer < device_count(),
            "peer ordinal " + std::to_string(peer) + " of rank " + std::to_string(s) +
                " is neither -1 (another process) nor a visible device");
    if (!can_access_peer(device_ordinal, peer)) {
      throw std::runtime_error("jax_megamoe: device " + std::to_string(device_ordinal) +
                               " cannot access the memory of device " + std::to_string(peer) +
                               " (cudaDeviceCanAccessPeer is false); every rank of a buffer "
                               "must be a peer of every other");
    }
    cudaError_t err = cudaDeviceEnablePeerAccess(peer, 0);
    if (err == cudaErrorPeerAccessAlreadyEnabled) {
      cudaGetLastError();
    } else {
      check_cuda(err, "enabling peer access from device " + std::to_string(device_ordinal) +
                          " to device " + std::to_string(peer));
    }
  }

  const WorkspaceLayout layout = WorkspaceLayout::make(state->config);
  std::vector<uint64_t> table(2 * size_t(num_ranks));
  for (int s = 0; s < num_ranks; ++s) {
    table[s] = peer_ptrs[s];
    table[num_ranks + s] = peer_ptrs[s] + layout.combine;
  }
  static_assert(sizeof(uint8_t*) == sizeof(uint64_t), "the peer table stores 64-bit pointers");
  run_sync("uploading the peer table", [&](cudaStream_t stream) {
    cudaError_t err = cudaMemcpyAsync(state->base + layout.peer_base, table.data(),
                                      num_ranks * sizeof(uint64_t), cudaMemcpyHostToDevice, stream);
    if (err != cudaSuccess) return err;
    return cudaMemcpyAsync(state->base + layout.combine_base, table.data() + num_ranks,
                           num_ranks * sizeof(uint64_t), cudaMemcpyHostToDevice, stream);
  });

  std::lock_guard<std::mutex> lock(registry_mutex());
  auto it = registry().find({buffer_id, device_ordinal});
  if (it != registry().end()) it->second.connected = true;
}

void destroy_workspace(int64_t buffer_id, int device_ordinal) {
  // The peers' mappings go first; the allocation is freed even if unmapping one failed.
  std::exception_ptr unmap_error;
  try {
    close_ipc_handles(buffer_id, device_ordinal);
  } catch (...) {
    unmap_error = std::current_exception();
  }
  WorkspaceState state;
  {
    std::lock_guard<std::mutex> lock(registry_mutex());
    auto it = registry().find({buffer_id, device_ordinal});
    if (it == registry().end()) {
      if (unmap_error) std::rethrow_exception(unmap_error);
      return;
    }
    state = it->second;
    registry().erase(it);
  }
  DeviceGuard guard(device_ordinal);
  const cudaError_t freed = cudaFree(state.base);
  const cudaError_t freed_record = cudaFreeHost(const_cast<ErrorRecord*>(state.error));
  check_cuda(freed, "freeing " + key_str(buffer_id, device_ordinal));
  check_cuda(freed_record, "freeing the error record of " + key_str(buffer_id, device_ordinal));
  if (unmap_error) std::rethrow_exception(unmap_error);
}

std::string export_ipc_handle(int64_t buffer_id, int device_ordinal) {
  std::optional<WorkspaceState> state = find_workspace(buffer_id, device_ordinal);
  if (!state) {
    throw std::runtime_error("jax_megamoe: " + key_str(buffer_id, device_ordinal) +
                             " does not exist");
  }
  DeviceGuard guard(device_ordinal);
  cudaIpcMemHandle_t handle;
  check_cuda(cudaIpcGetMemHandle(&handle, state->base),
             "exporting " + key_str(buffer_id, device_ordinal) + " as a CUDA IPC handle");
  return std::string(reinterpret_cast<const char*>(&handle), sizeof(handle));
}

uintptr_t open_ipc_handle(int64_t buffer_id, int device_ordinal, const std::string& handle) {
  require(handle.size() == sizeof(cudaIpcMemHandle_t),
          "a CUDA IPC handle has " + std::to_string(sizeof(cudaIpcMemHandle_t)) + " bytes, got " +
              std::to_string(handle.size()));
  if (!find_workspace(buffer_id, device_ordinal)) {
    throw std::runtime_error("jax_megamoe: " + key_str(buffer_id, device_ordinal) +
                             " does not exist; create it before mapping its peers");
  }
  cudaIpcMemHandle_t h;
  std::memcpy(&h, handle.data(), sizeof(h));
  DeviceGuard guard(device_ordinal);  // the mapping belongs to the current device's context
  void* ptr = nullptr;
  check_cuda(cudaIpcOpenMemHandle(&ptr, h, cudaIpcMemLazyEnablePeerAccess),
             "opening a peer process's workspace (CUDA IPC) on device " +
                 std::to_string(device_ordinal) +
                 "; every rank of an expert group must be a GPU of this host with peer (NVLink) "
                 "access to the others, and a process cannot open its own handle");
  std::lock_guard<std::mutex> lock(registry_mutex());
  if (!registry().count({buffer_id, device_ordinal})) {  // destroyed concurrently
    cudaIpcCloseMemHandle(ptr);
    throw std::runtime_error("jax_megamoe: " + key_str(buffer_id, device_ordinal) +
                             " was destroyed while its peers were being mapped");
  }
  opened_handles()[{buffer_id, device_ordinal}].push_back(ptr);
  return reinterpret_cast<uintptr_t>(ptr);
}

void close_ipc_handles(int64_t buffer_id, int device_ordinal) {
  std::vector<void*> ptrs;
  {
    std::lock_guard<std::mutex> lock(registry_mutex());
    auto it = registry().find({buffer_id, device_ordinal});
    if (it != registry().end()) it->second.connected = false;
    auto opened = opened_handles().find({buffer_id, device_ordinal});
    if (opened == opened_handles().end()) return;
    ptrs = std::move(opened->second);
    opened_handles().erase(opened);
  }
  DeviceGuard guard(device_ordinal);
  cudaError_t first = cudaSuccess;
  for (void* ptr : ptrs) {  // close all, report the first failure
    cudaError_t err = cudaIpcCloseMemHandle(ptr);
    if (err != cudaSuccess && first == cudaSuccess) first = err;
  }
  check_cuda(first, "closing the peer mappings of " + key_str(buffer_id, device_ordinal));
}

std::optional<WorkspaceState> find_workspace(int64_t buffer_id, int device_ordinal) {
  std::lock_guard<std::mutex> lock(registry_mutex());
  auto it = registry().find({buffer_id, device_ordinal});
  if (it == registry().end()) return std::nullopt;
  return it->second;
}

bool can_access_peer(int ordinal, int peer_ordinal) {
  if (ordinal == peer_ordinal) return true;
  int can = 0;
  check_cuda(cudaDeviceCanAccessPeer(&can, ordinal, peer_ordinal),
             "cudaDeviceCanAccessPeer(" + std::to_string(ordinal) + ", " +
                 std::to_string(peer_ordinal) + ")");
  return can != 0;
}

std::string device_pci_bus_id(int ordinal) {
  char bus_id[32] = {};
  check_cuda(cudaDeviceGetPCIBusId(bus_id, sizeof(bus_id), ordinal),
             "querying the PCI bus id of device " + std::to_string(ordinal));
  return bus_id;
}

int device_by_pci_bus_id(const std::string& bus_id) {
  int ordinal = -1;
  if (cudaDeviceGetByPCIBusId(&ordinal, bus_id.c_str()) != cudaSuccess) {
    cudaGetLastError();
    return -1;
  }
  return ordinal;
}

size_t device_free_bytes(int ordinal) {
  DeviceGuard guard(ordinal);
  size_t free_bytes = 0, total_bytes = 0;
  check_cuda(cudaMemGetInfo(&free_bytes, &total_bytes), "cudaMemGetInfo");
  return free_bytes;
}

}  // namespace jax_megamoe
