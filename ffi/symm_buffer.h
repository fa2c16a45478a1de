// Symmetric workspace lifecycle and the per-(buffer_id, device_ordinal) registry the FFI handler
// reads. Setup functions may sync and throw (std::invalid_argument -> ValueError,
// std::runtime_error -> RuntimeError through nanobind); find_workspace is the only per-call path.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "jax_megamoe/comm/error_record.h"
#include "jax_megamoe/layout/workspace.h"

namespace jax_megamoe {

struct WorkspaceState {
  WorkspaceConfig config;
  int device_ordinal;
  int rank;
  int sm_budget;
  uint8_t* base;
  size_t nbytes;
  bool connected;  // peer table uploaded; execute refuses to run before
  // Host-mapped pinned record the kernels write when a call fails (comm/error_record.h); the
  // host reads it with plain loads. Allocated and freed with the workspace.
  const ErrorRecord* error;
  uint64_t timeout_ns;  // spin limit of the cross-rank waits, as stored in the header
  bool whole_device;    // sm_budget is every SM of the device (MegaMoeArgs::whole_device)
};

// Exact workspace size for this configuration; throws std::invalid_argument naming the first
// unsupported parameter.
size_t workspace_nbytes(const WorkspaceConfig& config);

// `timeout_s` > 0 sets the cross-rank wait limit; 0 takes JAX_MEGAMOE_TIMEOUT_S, else
// kDefaultTimeoutS.
uintptr_t create_workspace(int64_t buffer_id, int device_ordinal, int rank,
                           const WorkspaceConfig& config, int sm_budget, double timeout_s);
// peer_ordinals[s] is rank s's device ordinal in this process, or -1 for a rank driven by another
// process (its pointer then comes from open_ipc_handle, which enables peer access itself).
void connect_workspace(int64_t buffer_id, int device_ordinal, const std::vector<int>& peer_ordinals,
                       const std::vector<uintptr_t>& peer_ptrs);
// Closes every handle opened for this workspace, then frees it.
void destroy_workspace(int64_t buffer_id, int device_ordinal);

// Multi-process workspaces (one process per GPU or per group of GPUs, all on one host): the owner
// exports its allocation as a CUDA IPC handle (kIpcHandleBytes opaque bytes); every other process
// opens it on each of its devices that is a peer rank. A handle cannot be opened by the process
// that exported it: same-process peers use raw pointers. Opened mappings are remembered per
// (buffer_id, device_ordinal) and unmapped by close_ipc_handles or destroy_workspace.
constexpr size_t kIpcHandleBytes = 64;
std::string export_ipc_handle(int64_t buffer_id, int device_ordinal);
uintptr_t open_ipc_handle(int64_t buffer_id, int device_ordinal, const std::string& handle);
// Unmaps the peers' workspaces opened on this device and marks the workspace unconnected (a call
// on it then fails cleanly instead of touching unmapped memory). Idempotent.
void close_ipc_handles(int64_t buffer_id, int device_ordinal);

// A copy, so a concurrent destroy on another thread cannot invalidate what the caller holds.
std::optional<WorkspaceState> find_workspace(int64_t buffer_id, int device_ordinal);

bool can_access_peer(int ordinal, int peer_ordinal);
size_t device_free_bytes(int ordinal);
// PCI bus id ("0000:1b:00.0") of a device, and the ordinal of a bus id in this process (-1 when
// that GPU is not visible here, e.g. hidden by CUDA_VISIBLE_DEVICES).
std::string device_pci_bus_id(int ordinal);
int device_by_pci_bus_id(const std::string& bus_id);

}  // namespace jax_megamoe
