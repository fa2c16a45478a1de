// nanobind module jax_megamoe._C: FFI handler capsules for jax.ffi.register_ffi_target and their
// target names, the constants Python shares with the kernels, device queries, and the symmetric
// workspace lifecycle used by jax_megamoe.SymmBuffer.
#include <nanobind/nanobind.h>
#include <nanobind/stl/pair.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "error_record.h"
#include "ffi_common.h"
#include "grouped_gemm.h"
#include "jax_megamoe/constants.h"
#include "mega_moe.h"
#include "symm_buffer.h"

namespace nb = nanobind;
using namespace nb::literals;

namespace jax_megamoe {
namespace {

WorkspaceConfig make_config(int num_ranks, int num_experts, int hidden, int intermediate, int topk,
                            int max_tokens) {
  return WorkspaceConfig{num_ranks, num_experts, hidden, intermediate, topk, max_tokens};
}

}  // namespace
}  // namespace jax_megamoe

NB_MODULE(_C, m) {
  using namespace jax_megamoe;
  m.doc() = "CUDA runtime of jax_megamoe (SM90 fused FP8 MoE)";

  m.attr("FP8_MEGA_MOE_TARGET") = nb::str(kFp8MegaMoeTarget);
  m.attr("L1_GEMM_TARGET") = nb::str(kL1GemmTarget);
  m.attr("L2_GEMM_TARGET") = nb::str(kL2GemmTarget);
  m.def(
      "registrations",
      [] {
        nb::dict targets;
        targets[kFp8MegaMoeTarget] = nb::capsule(reinterpret_cast<void*>(JaxMegamoeFp8MegaMoe));
        targets[kL1GemmTarget] = nb::capsule(reinterpret_cast<void*>(JaxMegamoeL1Gemm));
        targets[kL2GemmTarget] = nb::capsule(reinterpret_cast<void*>(JaxMegamoeL2Gemm));
        return targets;
      },
      "XLA FFI targets by name, as capsules for jax.ffi.register_ffi_target(platform='CUDA').");

  m.def(
      "constants",
      [] {
        nb::dict constants;
        constants["BLOCK_M"] = kBlockM;
        constants["EXPERT_ALIGN_M"] = kExpertAlignM;
        constants["QUANT_BLOCK"] = kQuantBlock;
        constants["MAX_TOPK"] = kMaxTopk;
        constants["MAX_LOCAL_EXPERTS"] = kMaxLocalExperts;
        constants["DEFAULT_TIMEOUT_S"] = kDefaultTimeoutS;
        constants["ROUTE_BLOCKS_PER_SM"] = kRouteBlocksPerSm;
        constants["GATHER_ROWS_PER_EXPERT"] = kGatherRowsPerExpert;
        constants["MAX_GEMM_CTAS"] = kMaxGemmCtas;
        return constants;
      },
      "The limits and block sizes the kernels are built with (jax_megamoe/constants.h).");

  m.def(
      "workspace_nbytes",
      [](int num_ranks, int num_experts, int hidden, int intermediate, int topk, int max_tokens) {
        return workspace_nbytes(
            make_config(num_ranks, num_experts, hidden, intermediate, topk, max_tokens));
      },
      "num_ranks"_a, "num_experts"_a, "hidden"_a, "intermediate"_a, "topk"_a, "max_tokens"_a,
      "Exact bytes of one rank's workspace; ValueError names an unsupported parameter.");

  m.def("device_count", &device_count, "Visible CUDA devices; 0 without a driver or device.");
  m.def("device_capability", &device_capability, "ordinal"_a, "(major, minor) of a device.");
  m.def("can_access_peer", &can_access_peer, "ordinal"_a, "peer_ordinal"_a,
        "Whether kernels on `ordinal` can address memory of `peer_ordinal` (true for itself).");
  m.def("device_free_bytes", &device_free_bytes, "ordinal"_a, "Free device memory in bytes.");

  m.def(
      "create_workspace",
      [](int64_t buffer_id, int device_ordinal, int rank, int num_ranks, int num_experts,
         int hidden, int intermediate, int topk, int max_tokens, int sm_budget, double timeout_s) {
        return create_workspace(
            buffer_id, device_ordinal, rank,
            make_config(num_ranks, num_experts, hidden, intermediate, topk, max_tokens), sm_budget,
            timeout_s);
      },
      "buffer_id"_a, "device_ordinal"_a, "rank"_a, "num_ranks"_a, "num_experts"_a, "hidden"_a,
      "intermediate"_a, "topk"_a, "max_tokens"_a, "sm_budget"_a, "timeout_s"_a,
      "Allocates and zero-fills this rank's workspace and its pinned error record on the device, "
      "loads every kernel there, and returns the device base pointer. sm_budget 0 = every SM; "
      "timeout_s 0 = JAX_MEGAMOE_TIMEOUT_S, else DEFAULT_TIMEOUT_S.");

  m.def(
      "buffer_error",
      [](int64_t buffer_id, int device_ordinal) -> nb::object {
        const std::optional<WorkspaceState> state = find_workspace(buffer_id, device_ordinal);
        if (!state) return nb::none();
        const ErrorRecord r = read_error_record(state->error);
        if (r.code == kErrorNone) return nb::none();
        nb::dict d;
        d["kind"] = error_kind(r.code);
        d["code"] = r.code;
        d["rank"] = r.rank;
        d["phase"] = phase_name(r.phase);
        d["peer"] = r.peer;
        d["epoch"] = r.epoch;
        d["seen"] = r.seen;
        d["expected_rank"] = r.expected_rank;
        d["message"] = error_record_message(r, buffer_id, device_ordinal, state->timeout_ns);
        return d;
      },
      "buffer_id"_a, "device_ordinal"_a,
      "The error the workspace's kernels recorded (a dict: kind, code, rank, phase, peer, epoch, "
      "seen, expected_rank, message), or None: no error, or no such workspace. No sync: it "
      "shows what kernels that have finished wrote.");

  m.def(
      "workspace_timeout_s",
      [](int64_t buffer_id, int device_ordinal) {
        const std::optional<WorkspaceState> state = find_workspace(buffer_id, device_ordinal);
        if (!state) {
          throw std::invalid_argument("jax_megamoe: no workspace " + std::to_string(buffer_id) +
                                      " on device " + std::to_string(device_ordinal));
        }
        return double(state->timeout_ns) * 1e-9;
      },
      "buffer_id"_a, "device_ordinal"_a,
      "The spin limit of the workspace's cross-rank waits in seconds, as create_workspace "
      "resolved it (its timeout_s, or JAX_MEGAMOE_TIMEOUT_S, or DEFAULT_TIMEOUT_S).");

  m.def("connect_workspace", &connect_workspace, "buffer_id"_a, "device_ordinal"_a,
        "peer_ordinals"_a, "peer_ptrs"_a,
        "Enables peer access to every rank's device and uploads the base pointer table (both "
        "lists indexed by rank, this rank included; ordinal -1 = a rank of another process, "
        "its pointer from open_ipc_handle).");

  m.def("prepare_standalone", &prepare_standalone, "device_ordinal"_a,
        "Loads the grouped GEMM kernels on a device for the jax_megamoe_l1_gemm / l2_gemm "
        "targets (idempotent); call before the first such call runs there.");

  m.def("destroy_workspace", &destroy_workspace, "buffer_id"_a, "device_ordinal"_a,
        "Unmaps the peers opened for it, then frees the workspace; a no-op if it does not exist.");

  // Multi-process workspaces (CUDA IPC), see symm_buffer.h.
  m.def(
      "export_ipc_handle",
      [](int64_t buffer_id, int device_ordinal) {
        const std::string handle = export_ipc_handle(buffer_id, device_ordinal);
        return nb::bytes(handle.data(), handle.size());
      },
      "buffer_id"_a, "device_ordinal"_a,
      "The workspace's CUDA IPC handle (64 bytes) for another process of this host to open.");
  m.def(
      "open_ipc_handle",
      [](int64_t buffer_id, int device_ordinal, nb::bytes handle) {
        return open_ipc_handle(buffer_id, device_ordinal,
                               std::string(static_cast<const char*>(handle.data()), handle.size()));
      },
      "buffer_id"_a, "device_ordinal"_a, "handle"_a,
      "Maps another process's workspace (its export_ipc_handle bytes) on this device and returns "
      "the pointer; remembered so that close_ipc_handles/destroy_workspace unmap it.");
  m.def("close_ipc_handles", &close_ipc_handles, "buffer_id"_a, "device_ordinal"_a,
        "Unmaps every peer workspace opened for this one and marks it unconnected.");
  m.def("inject_launch_failure", &inject_launch_failure, "device_ordinal"_a,
        "Test hook: the next fp8_mega_moe call on this device has L1's launch fail (an empty "
        "grid), as a launch between the dispatch and combine syncs might; the handler returns "
        "that error and closes the call so that the peers abort.");
  m.def("device_pci_bus_id", &device_pci_bus_id, "ordinal"_a, "PCI bus id of a device.");
  m.def("device_by_pci_bus_id", &device_by_pci_bus_id, "bus_id"_a,
        "Ordinal of the GPU with this PCI bus id, or -1 if it is not visible in this process.");
}
