// Symmetric workspace lifecycle and the per-(buffer_id, device_ordinal) registry the FFI handler
// reads. Setup functions may sync and throw (std::invalid_argument -> ValueError,
// std::runtime_error -> RuntimeError through nanobind); find_workspace is the only per-call path.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <utility>
#include <vector>

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
};

// Exact workspace size for this configuration; throws std::invalid_argument naming the first
// unsupported parameter.
size_t workspace_nbytes(const WorkspaceConfig& config);

uintptr_t create_workspace(int64_t buffer_id, int device_ordinal, int rank,
                           const WorkspaceConfig& config, int sm_budget);
void connect_workspace(int64_t buffer_id, int device_ordinal, const std::vector<int>& peer_ordinals,
                       const std::vector<uintptr_t>& peer_ptrs);
void destroy_workspace(int64_t buffer_id, int device_ordinal);

// A copy, so a concurrent destroy on another thread cannot invalidate what the caller holds.
std::optional<WorkspaceState> find_workspace(int64_t buffer_id, int device_ordinal);

int device_count();
std::pair<int, int> device_capability(int ordinal);
bool can_access_peer(int ordinal, int peer_ordinal);
size_t device_free_bytes(int ordinal);

}  // namespace jax_megamoe
