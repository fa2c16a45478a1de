// The symmetric workspace: one persistent allocation per rank with the identical layout on every
// rank, so a peer's region is peer_base[s] + the same offset. This header owns every offset and
// the exact byte size; host (ffi/, g++) and device (csrc/launch/, nvcc) code both include it.
//
// Regions, each 128-byte aligned, in order:
//   header   HeaderFixed, dispatch_flag[R] u64, combine_flag[R] u64, dispatch_status[R] i32,
//            combine_status[R] i32 (flags and statuses written by peers), peer_base[R] (u8*),
//            combine_base[R] (u16* = peer_base + combine offset)
//   staging  x [Mmax,H] e4m3, x_scale [Mmax,H/128] f32, topk_ids [Mmax,K] i32 (ids outside
//            [0,E) stored as -1, i.e. masked), topk_weights [Mmax,K] f32; read by every peer's
//            route; empty when R = 1
//   routing  expert_count/expert_fill/expert_offset [E_l] i32, RouteScalars,
//            block_expert [max_blocks] i32, block_stored [max_blocks] i32 (L1 tiles stored per
//            row block, which L2 waits for), row_src [P] i32, row_weight [P] f32
//   pool     a [P,H] e4m3, a_scale [P,H/128] f32
//   act      act [P,I] e4m3, act_scale [P,I/128] f32
//   combine  [K][Mmax][H] bf16, written by the destination ranks' L2
// P = max_blocks * kBlockM = ceil((R*Mmax*K + E_l*(kExpertAlignM-1)) / kExpertAlignM) *
// kExpertAlignM: the pool holds the worst case (every slot of every rank routed here, every
// expert segment padded to kExpertAlignM rows), so no token is ever dropped.
#pragma once

#include <cstddef>
#include <cstdint>

#include "jax_megamoe/comm/error_record.h"
#include "jax_megamoe/constants.h"
#include "jax_megamoe/host_device.h"

namespace jax_megamoe {

// TMA, 16-byte vector copies and 128-byte cache lines all hold at this alignment; it also keeps
// flags written by different agents on separate lines.
constexpr size_t kRegionAlign = 128;

JMM_HOST_DEVICE constexpr size_t align_up(size_t n, size_t a) { return (n + a - 1) / a * a; }

struct WorkspaceConfig {
  int num_ranks;
  int num_experts;
  int hidden;
  int intermediate;
  int topk;
  int max_tokens;
};

// What the call in flight does on this rank; set by the sync kernels (and launch_failed_kernel),
// read by route and combine.
enum CallState : int32_t {
  kCallRun = 0,  // routing, GEMMs and combine run
  // Failed after a successful dispatch wait (device order, a peer's failure, a launch that failed
  // here): no further work
  kCallAborted = 1,
  kCallTimedOut = 2,  // this rank's wait timed out: no work and no further wait
  kCallSkipped = 3,   // the workspace had failed before: no sync, no work
};

struct alignas(kRegionAlign) HeaderFixed {
  uint64_t epoch;       // calls issued on this rank; never reset (graphs replay, ranks are skewed)
  uint64_t timeout_ns;  // spin limit of every cross-rank wait
  ErrorRecord* error;   // device pointer of this workspace's host-mapped error record
  int32_t rank;
  int32_t num_ranks;
  int32_t staged_tokens;  // M of the call whose staging is live; peers read it
  // ErrorCode of this workspace, sticky: the device-side copy of error->code. The first error
  // wins by atomicCAS here, and every later call (graph replays too) is skipped while it is set.
  int32_t error_code;
  int32_t call_state;  // CallState of the call in flight
};
// The Python mirror of the layout (symm_buffer.workspace_nbytes) counts the header as 128 bytes.
static_assert(sizeof(HeaderFixed) == kRegionAlign, "HeaderFixed must fit one aligned region");

struct alignas(kRegionAlign) RouteScalars {
  int32_t num_blocks;   // row blocks used this call; read by L1/L2
  uint32_t count_done;  // route-count blocks finished; the last one runs the segment scan
  int32_t l1_claims;    // tile counters of L1 and L2 (L1Params::tile_claims)
  int32_t l2_claims;
};

struct WorkspaceLayout {
  int local_experts;
  int max_blocks;
  size_t pool_rows;

  size_t header;  // HeaderFixed
  size_t dispatch_flag;
  size_t combine_flag;
  size_t dispatch_status;  // [R] i32: the axis index rank s's call ran as (s when in order)
  size_t combine_status;   // [R] i32: the CallState rank s sent its combine rows with
  size_t peer_base;
  size_t combine_base;

  size_t x;
  size_t x_scale;
  size_t topk_ids;
  size_t topk_weights;

  size_t expert_count;
  size_t expert_fill;
  size_t expert_offset;
  size_t route_scalars;
  size_t block_expert;
  size_t block_stored;
  size_t row_src;
  size_t row_weight;

  size_t pool_a;
  size_t pool_a_scale;
  size_t act;
  size_t act_scale;

  size_t combine;

  size_t total_bytes;

  // Rows of the worst-case pool before rounding: every slot of every rank routed to this one,
  // each local expert's segment padded to kExpertAlignM. Unsigned 64-bit, so a product past 2^64
  // wraps instead of being undefined (workspace_nbytes checks R * Mmax first).
  JMM_HOST_DEVICE static uint64_t worst_rows(const WorkspaceConfig& c) {
    return uint64_t(c.num_ranks) * uint64_t(c.max_tokens) * uint64_t(c.topk) +
           uint64_t(c.num_experts / c.num_ranks) * (kExpertAlignM - 1);
  }

  JMM_HOST_DEVICE static WorkspaceLayout make(const WorkspaceConfig& c) {
    const size_t R = c.num_ranks, H = c.hidden, I = c.intermediate, K = c.topk;
    const size_t Mmax = c.max_tokens;
    WorkspaceLayout l{};
    l.local_experts = c.num_experts / c.num_ranks;
    const size_t segments = (worst_rows(c) + kExpertAlignM - 1) / kExpertAlignM;
    l.max_blocks = int(segments * (kExpertAlignM / kBlockM));
    l.pool_rows = size_t(l.max_blocks) * kBlockM;
    const size_t P = l.pool_rows;

    size_t off = 0;
    l.header = take(off, sizeof(HeaderFixed));
    l.dispatch_flag = take(off, R * sizeof(uint64_t));
    l.combine_flag = take(off, R * sizeof(uint64_t));
    l.dispatch_status = take(off, R * sizeof(int32_t));
    l.combine_status = take(off, R * sizeof(int32_t));
    l.peer_base = take(off, R * sizeof(uint64_t));
    l.combine_base = take(off, R * sizeof(uint64_t));

    // With no peers nothing is staged: the kernels read the call's inputs (runtime.cu).
    const size_t staged = R > 1 ? Mmax : 0;
    l.x = take(off, staged * H);
    l.x_scale = take(off, staged * (H / kQuantBlock) * sizeof(float));
    l.topk_ids = take(off, staged * K * sizeof(int32_t));
    l.topk_weights = take(off, staged * K * sizeof(float));

    l.expert_count = take(off, size_t(l.local_experts) * sizeof(int32_t));
    l.expert_fill = take(off, size_t(l.local_experts) * sizeof(int32_t));
    l.expert_offset = take(off, size_t(l.local_experts) * sizeof(int32_t));
    l.route_scalars = take(off, sizeof(RouteScalars));
    l.block_expert = take(off, size_t(l.max_blocks) * sizeof(int32_t));
    l.block_stored = take(off, size_t(l.max_blocks) * sizeof(int32_t));
    l.row_src = take(off, P * sizeof(int32_t));
    l.row_weight = take(off, P * sizeof(float));

    l.pool_a = take(off, P * H);
    l.pool_a_scale = take(off, P * (H / kQuantBlock) * sizeof(float));
    l.act = take(off, P * I);
    l.act_scale = take(off, P * (I / kQuantBlock) * sizeof(float));

    l.combine = take(off, K * Mmax * H * sizeof(uint16_t));

    l.total_bytes = off;
    return l;
  }

 private:
  JMM_HOST_DEVICE static size_t take(size_t& off, size_t bytes) {
    const size_t at = off;
    off = align_up(off + bytes, kRegionAlign);
    return at;
  }
};

// Typed pointer to the region at `offset` of a workspace based at `base` (this rank's or, through
// the peer table, a peer's: every rank has the same layout).
template <typename T>
JMM_HOST_DEVICE inline T* at(uint8_t* base, size_t offset) {
  return reinterpret_cast<T*>(base + offset);
}

JMM_HOST_DEVICE inline HeaderFixed* header_of(uint8_t* base, const WorkspaceLayout& l) {
  return at<HeaderFixed>(base, l.header);
}

}  // namespace jax_megamoe
