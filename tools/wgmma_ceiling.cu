// How fast can the tensor cores go on the grouped GEMM's math alone? Runs the main loop's math
// (impls/sm90_fp8_grouped_math.cuh: four wgmma m64nNk32 per K block of 128, then the promotion)
// on operands that stay in shared memory: no TMA, no mbarriers, no epilogue. Each variant says
// how the math warpgroups issue, wait and promote; the output is the tensor pipe's share of the
// SM cycles (FLOPs / (cycles x 8192 FLOP per cycle per SM)), measured with the SM clock, so it
// does not depend on the clock the card runs at. The last rows (spin_tail) run L1's pair with a
// 16-row swap-AB tail and print SM cycles per K block instead.
//
//   n      wgmma N of one B group            groups  B groups per K block (one partial each)
//   wgs    math warpgroups (64 rows each)     promote f32 promotion after each group
//   pipe   two groups issued back to back into two partials; the first is promoted while
//          the second runs, instead of waiting for each group before its promotion
//   copy   bytes per K block that one more warp copies from global memory (L2-resident) into a
//          shared-memory buffer nobody reads, with bulk copies, at most kCopyAhead K blocks
//          ahead of the math: the main loop's TMA traffic without its data (does writing the
//          next stages into shared memory slow the tensor cores reading this one?); the copy
//          warp polls the math's progress every poll ns. copy = kIdleWarpgroup: the extra
//          warpgroup and the register split without the copy warp (it exits at once)
//   regs   the math warps' registers after setmaxnreg (0: the main loop's split with an extra
//          warpgroup, none without one)
//
// Build and run (benchmarks/device_run.sh `ceiling` mode):
//   nvcc -std=c++17 -O3 -gencode=arch=compute_90a,code=sm_90a --expt-relaxed-constexpr \
//     -I csrc/include tools/wgmma_ceiling.cu -o wgmma_ceiling && ./wgmma_ceiling
#include <cuda_runtime_api.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>

#include "cuda_check.h"
#include "jax_megamoe/impls/sm90_fp8_grouped_math.cuh"
#include "jax_megamoe/impls/sm90_fp8_grouped_tma_mainloop.cuh"
#include "jax_megamoe/ptx/cp_async.cuh"
#include "jax_megamoe/ptx/mbarrier.cuh"
#include "jax_megamoe/ptx/shared.cuh"
#include "jax_megamoe/ptx/store.cuh"

namespace {

using namespace jax_megamoe::sm90;
using cuda_check::check;
using jax_megamoe::kBlockM;
namespace ptx = jax_megamoe::ptx;

constexpr int kScaleSlots = 4;  // per-K-block scales rotate so the compiler cannot hoist them
constexpr int kCopyAhead = 4;   // K blocks the copy warp may run ahead (the main loop's ring)
constexpr int kCopyChunk = 16 * 1024;
constexpr size_t kCopySourceBytes = 16 << 20;  // global source, small enough to stay in L2
constexpr int kIdleWarpgroup = -1;
// As the poll interval: no copy warpgroup; math thread 0 issues each K block's copies itself,
// kCopyAhead K blocks ahead, under its warpgroup's first wgmma group (a 256-thread CTA).
constexpr int kCopyByMath = 0;

// Whether a variant has the extra warpgroup (copy warp, or idle) and the main loop's register
// split.
constexpr bool has_copy_warpgroup(int copy_bytes, int poll_ns) {
  return copy_bytes != 0 && poll_ns != kCopyByMath;
}

template <int N, int kGroups, int kWgs, int kCopyBytes, bool kCopyWarpgroup>
struct Layout {
  static constexpr int kABytes = kWgs * kBlockM * kBlockK;
  static constexpr int kBBytes = kGroups * N * kBlockK;
  static constexpr int kScaleOffset = kABytes + kBBytes;
  static constexpr int kCopyOffset = (kScaleOffset + kScaleSlots * 65 * 4 + 127) / 128 * 128;
  // The copy warp's buffer, then its mbarriers (one per K block in flight) and the math's count.
  static constexpr int kBarOffset = kCopyOffset + (kCopyBytes > 0 ? kCopyBytes : 0);
  static constexpr int kBytes = kBarOffset + kCopyAhead * 8 + 8 + kSmemAlignSlack;
  // With copies, one more warpgroup whose first warp copies, its registers moved to the math
  // (setmaxnreg, as in the main loop): a lone copy warp under the launch bound of 288 threads
  // left the math 224 registers, and the promoting variants spilled.
  static constexpr int kThreads = (kWgs + (kCopyWarpgroup ? 1 : 0)) * kWarpGroupThreads;
};

// The copies of K block `it`: kCopyBytes from `src` into the buffer, completing on mbarrier
// it % kCopyAhead once that barrier's previous K block has landed.
template <int kCopyBytes, bool kBounded = true>
__device__ void issue_copy(int it, uint8_t* buf, uint64_t* bars, const uint8_t* src) {
  const int slot = it % kCopyAhead;
  if (it >= kCopyAhead) {
    const uint32_t parity = ((it / kCopyAhead) - 1) & 1;
    if constexpr (kBounded) {
      ptx::mbarrier_wait(&bars[slot], parity);
    } else {
      // No timeout and trap: under a wgmma in flight, the trap's path made ptxas serialize
      // every wgmma (C7518).
      while (!ptx::mbarrier_try_wait(ptx::smem_addr(&bars[slot]), parity)) {
      }
    }
  }
  ptx::mbarrier_arrive_expect_tx(&bars[slot], kCopyBytes);
  const size_t at = (size_t(blockIdx.x) * 131 + it) * kCopyBytes % (kCopySourceBytes - kCopyBytes);
  for (int c = 0; c < kCopyBytes; c += kCopyChunk)
    cuda::ptx::cp_async_bulk(cuda::ptx::space_cluster, cuda::ptx::space_global, buf + c,
                             src + (at & ~size_t(15)) + c, min(kCopyChunk, kCopyBytes - c),
                             &bars[slot]);
}

// Waits for the copies of the last kCopyAhead K blocks: a CTA must not exit with bulk copies in
// flight into its shared memory.
__device__ void drain_copies(int iters, uint64_t* bars) {
  for (int it = max(0, iters - kCopyAhead); it < iters; ++it)
    ptx::mbarrier_wait(&bars[it % kCopyAhead], (it / kCopyAhead) & 1);
}

// The copy warp: each K block's copies, never more than kCopyAhead K blocks ahead of the count
// of K blocks the math has done (`done`, written by math thread 0). It polls that count every
// kPollNs: a warp polling without pause took the math warps' issue slots (3x slower in the
// first try).
template <int kCopyBytes, int kPollNs>
__device__ void copy_warp(int iters, uint8_t* buf, uint64_t* bars, uint32_t done,
                          const uint8_t* src) {
  if (threadIdx.x % 32 != 0) return;
  for (int it = 0; it < iters; ++it) {
    while (ptx::ld_volatile_shared_s32(done) + kCopyAhead <= it) __nanosleep(kPollNs);
    issue_copy<kCopyBytes>(it, buf, bars, src);
  }
  drain_copies(iters, bars);
}

template <int N, int kGroups, int kWgs, bool kPromote, bool kPipe, int kCopyBytes, int kPollNs,
          int kRegs>
__global__ void __launch_bounds__(
    Layout<N, kGroups, kWgs, kCopyBytes, has_copy_warpgroup(kCopyBytes, kPollNs)>::kThreads, 1)
    spin(int iters, long long* cycles, float* sink, const uint8_t* copy_src) {
  static_assert(!kPipe || kGroups <= 2, "the pipelined loop alternates two partials");
  constexpr bool kCopyWarpgroup = has_copy_warpgroup(kCopyBytes, kPollNs);
  constexpr bool kMathCopies = kCopyBytes > 0 && kPollNs == kCopyByMath;
  using L = Layout<N, kGroups, kWgs, kCopyBytes, kCopyWarpgroup>;
  extern __shared__ uint8_t smem_raw[];
  uint8_t* smem = align_smem(smem_raw);
  float* scales = reinterpret_cast<float*>(smem + L::kScaleOffset);
  uint64_t* copy_bars = reinterpret_cast<uint64_t*>(smem + L::kBarOffset);
  // The math's count and the scales by 32-bit shared-memory address, as in the main loop: after
  // the copy warpgroup's role split the compiler no longer knew the generic pointers to be
  // shared, and the K loop read a scale with a generic load and stored the count with a
  // system-scope generic store.
  const uint32_t math_done = ptx::smem_addr(copy_bars + kCopyAhead);
  if (threadIdx.x == 0) {
    for (int i = 0; i < kCopyAhead; ++i) ptx::mbarrier_init(&copy_bars[i], 1);
    ptx::st_shared(math_done, 0);
    ptx::fence_barrier_init();
  }
  // e4m3 bytes without NaN (0x7f / 0xff) and of modest size, so the products stay finite.
  for (int i = threadIdx.x; i < L::kABytes + L::kBBytes; i += blockDim.x)
    smem[i] = static_cast<uint8_t>((i * 2654435761u >> 13) & 0xb7);
  for (int i = threadIdx.x; i < kScaleSlots * 65; i += blockDim.x) scales[i] = 1.f + i * 1e-3f;
  ptx::fence_proxy_async_shared();  // generic writes above, wgmma (async proxy) reads below
  __syncthreads();
  if constexpr (kCopyWarpgroup) {
    static_assert(kWgs == 2, "the register split below is the main loop's: 2 math warpgroups");
    if (threadIdx.x >= kWgs * kWarpGroupThreads) {
      ptx::setmaxnreg_dec<kProducerRegs>();
      if constexpr (kCopyBytes > 0) {
        if (threadIdx.x < kWgs * kWarpGroupThreads + 32)
          copy_warp<kCopyBytes, kPollNs>(iters, smem + L::kCopyOffset, copy_bars, math_done,
                                         copy_src);
      }
      return;
    }
    ptx::setmaxnreg_inc<(kRegs > 0 ? kRegs : kMathRegs)>();
  } else if constexpr (kRegs > 0) {
    ptx::setmaxnreg_inc<kRegs>();  // no extra warpgroup: only the larger allocation
  }

  // Warp-uniform through lane 0, as in the main loop: after the role split above the compiler
  // no longer knew it, and every wgmma's descriptors went through R2UR.
  const int wg = __shfl_sync(0xffffffffu, threadIdx.x / kWarpGroupThreads, 0);
  const int t = threadIdx.x % kWarpGroupThreads;
  const uint32_t a_smem = ptx::smem_addr(smem) + wg * kBlockM * kBlockK;
  const uint32_t b_smem = ptx::smem_addr(smem) + L::kABytes;
  float acc[kGroups][N / 2];
#pragma unroll
  for (int g = 0; g < kGroups; ++g) {
#pragma unroll
    for (int i = 0; i < N / 2; ++i) acc[g][i] = 0.f;
  }
  auto promote_at = [&](int it, int g, const float (&part)[N / 2]) {
    if constexpr (kPromote) {
      const float* s = scales + (it % kScaleSlots) * 65;
      promote(load_row_scales(ptx::smem_addr(s), t), ptx::ld_shared_f32(ptx::smem_addr(s + 64)),
              part, acc[g]);
    } else if (it == iters - 1) {  // keep one result so the wgmma are not dead code
      promote(RowScales{{1.f, 1.f}}, 1.f, part, acc[g]);
    }
  };

  if constexpr (kMathCopies) {
    static_assert(!kPipe, "math thread 0 copies in the plain loop only");
    if (threadIdx.x == 0) {
      for (int it = 0; it < kCopyAhead && it < iters; ++it)
        issue_copy<kCopyBytes>(it, smem + L::kCopyOffset, copy_bars, copy_src);
    }
    __syncwarp();
  }
  const long long t0 = clock64();
  if constexpr (!kPipe) {
    float part[N / 2];
    for (int it = 0; it < iters; ++it) {
#pragma unroll
      for (int g = 0; g < kGroups; ++g) {
        issue_block_mma<N>(a_smem, b_smem + g * N * kBlockK, part);
        if constexpr (kMathCopies) {
          if (g == 0 && threadIdx.x == 0 && it + kCopyAhead < iters)
            issue_copy<kCopyBytes, false>(it + kCopyAhead, smem + L::kCopyOffset, copy_bars,
                                          copy_src);
          __syncwarp();
        }
        ptx::wgmma_wait<0>();
        ptx::fence_operands(part);
        promote_at(it, g, part);
      }
      if (kCopyWarpgroup && threadIdx.x == 0) ptx::st_shared(math_done, it + 1);
    }
  } else {
    // Two steps per iteration into two partials (groups 0 and 1 of a K block, or with one group
    // two K blocks): the first is promoted while the second runs. No wgmma stays in flight
    // across the loop's back edge: ptxas serializes every wgmma (C7514) when one does.
    constexpr int g1 = 1 % kGroups;
    float p0[N / 2], p1[N / 2];
    for (int it = 0; it < iters; ++it) {
      issue_block_mma<N>(a_smem, b_smem, p0);
      issue_block_mma<N>(a_smem, b_smem + g1 * N * kBlockK, p1);
      ptx::wgmma_wait<1>();
      ptx::fence_operands(p0);
      promote_at(it, 0, p0);
      ptx::wgmma_wait<0>();
      ptx::fence_operands(p1);
      promote_at(it, g1, p1);
      if (kCopyWarpgroup && threadIdx.x == 0) ptx::st_shared(math_done, it + 1);
    }
  }
  const long long t1 = clock64();
  if constexpr (kMathCopies) {
    if (threadIdx.x == 0) drain_copies(iters, copy_bars);
  }

  float sum = 0.f;
#pragma unroll
  for (int g = 0; g < kGroups; ++g) {
#pragma unroll
    for (int i = 0; i < N / 2; ++i) sum += acc[g][i];
  }
  sink[blockIdx.x * blockDim.x + threadIdx.x] = sum;
  if (threadIdx.x == 0) cycles[blockIdx.x] = t1 - t0;
}

// L1's tile with a swap-AB tail (impls/sm90_fp8_grouped_tma_mainloop.cuh, mma_pair_tail): per
// K block and B group, warpgroup wg multiplies its 64 rows by the group's 128 weight rows (n128,
// the pair) and the group's weight rows [64 wg, +64) as A by 16 tail rows as B (n16, the tail).
// kTailOrder says how the eight wgmma of a group are issued:
//   kNoTail      the pair's four alone (the cycles a K block costs without a tail)
//   kTailFirst   main's: the tail's four as one commit group, then the pair's; the tail promoted
//                while the pair's run
//   kAlternate   tail and pair k-steps alternating, T0 P0 T1 P1 ..., one commit group
// A narrow wgmma's shared-memory reads outlast its math (n16: 20 cycles of reads for 8 of math);
// a wide one's leave room (n128: 48 for 64). If the tensor pipe overlapped one wgmma's reads with
// another's math, alternating would hide the tail's excess reads under the pair's math; on an
// H200 the two orders cost the same (RESULTS.md 2026-12-04, "the tail's wgmma interleaved").
enum TailOrder { kNoTail, kTailFirst, kAlternate };

template <int kTailOrder>
__global__ void __launch_bounds__(2 * kWarpGroupThreads, 1)
    spin_tail(int iters, long long* cycles, float* sink) {
  constexpr int kN = 128, kT = 16, kGroups = 2;
  constexpr int kABytes = 2 * kBlockM * kBlockK, kGroupBytes = kN * kBlockK;
  constexpr int kTailOffset = kABytes + kGroups * kGroupBytes;
  constexpr int kScaleOffset = kTailOffset + kT * kBlockK;
  // Per K block 64 row scales, then kT token scales read as pairs (8-byte aligned), and the
  // two weight scales at 64 and 63 (rows and tokens may share values: only timing matters).
  constexpr int kStride = 68;
  extern __shared__ uint8_t smem_raw[];
  uint8_t* smem = align_smem(smem_raw);
  float* scales = reinterpret_cast<float*>(smem + kScaleOffset);
  for (int i = threadIdx.x; i < kScaleOffset; i += blockDim.x)
    smem[i] = static_cast<uint8_t>((i * 2654435761u >> 13) & 0xb7);
  for (int i = threadIdx.x; i < kScaleSlots * kStride; i += blockDim.x) scales[i] = 1.f + i * 1e-3f;
  ptx::fence_proxy_async_shared();
  __syncthreads();
  const int wg = __shfl_sync(0xffffffffu, threadIdx.x / kWarpGroupThreads, 0);
  const int t = threadIdx.x % kWarpGroupThreads;
  const uint32_t base = ptx::smem_addr(smem);
  const uint32_t a_smem = base + wg * kBlockM * kBlockK, b_smem = base + kABytes;
  const uint32_t w_smem = b_smem + wg * kBlockM * kBlockK, tail_smem = base + kTailOffset;
  float acc[kGroups][kN / 2], tail_acc[kGroups][kT / 2];
#pragma unroll
  for (int g = 0; g < kGroups; ++g) {
#pragma unroll
    for (int i = 0; i < kN / 2; ++i) acc[g][i] = 0.f;
#pragma unroll
    for (int i = 0; i < kT / 2; ++i) tail_acc[g][i] = 0.f;
  }
  // kAlternate: one k32 step of the pair (P) or the tail (T) of group g into its partial.
  auto pair_step = [&](int g, int ks, float (&part)[kN / 2]) {
    ptx::WgmmaE4m3<kN>::mma(
        part, ptx::smem_desc_sw128((a_smem >> 4) + ks * (kWgmmaK >> 4)),
        ptx::smem_desc_sw128(((b_smem + g * kGroupBytes) >> 4) + ks * (kWgmmaK >> 4)), ks > 0);
  };
  auto tail_step = [&](int g, int ks, float (&part)[kT / 2]) {
    ptx::WgmmaE4m3<kT>::mma(
        part, ptx::smem_desc_sw128(((w_smem + g * kGroupBytes) >> 4) + ks * (kWgmmaK >> 4)),
        ptx::smem_desc_sw128((tail_smem >> 4) + ks * (kWgmmaK >> 4)), ks > 0);
  };
  const long long t0 = clock64();
  for (int it = 0; it < iters; ++it) {
    const float* s = scales + (it % kScaleSlots) * kStride;
    const RowScales rows = load_row_scales(ptx::smem_addr(s), t);
    const ColScales<kT> cols = load_col_scales<kT>(ptx::smem_addr(s), t % 32);
#pragma unroll
    for (int g = 0; g < kGroups; ++g) {
      const float b_scale = ptx::ld_shared_f32(ptx::smem_addr(s + 64 - g));
      float part[kN / 2], tail_part[kT / 2];
      if constexpr (kTailOrder == kAlternate) {
        ptx::fence_operands(part);
        ptx::fence_operands(tail_part);
        ptx::wgmma_fence();
#pragma unroll
        for (int ks = 0; ks < kBlockK / kWgmmaK; ++ks) {
          tail_step(g, ks, tail_part);
          pair_step(g, ks, part);
        }
        ptx::wgmma_commit();
      } else {  // as the kernels issue them (mma_pair, mma_pair_tail)
        if constexpr (kTailOrder == kTailFirst)
          issue_block_mma<kT>(w_smem + g * kGroupBytes, tail_smem, tail_part);
        issue_block_mma<kN>(a_smem, b_smem + g * kGroupBytes, part);
      }
      if constexpr (kTailOrder != kNoTail) {
        if constexpr (kTailOrder == kAlternate) {
          ptx::wgmma_wait<0>();
        } else {
          ptx::wgmma_wait<1>();
        }
        ptx::fence_operands(tail_part);
        promote_cols(cols, b_scale, tail_part, tail_acc[g]);
      }
      ptx::wgmma_wait<0>();
      ptx::fence_operands(part);
      promote(rows, b_scale, part, acc[g]);
    }
  }
  const long long t1 = clock64();
  float sum = 0.f;
#pragma unroll
  for (int g = 0; g < kGroups; ++g) {
#pragma unroll
    for (int i = 0; i < kN / 2; ++i) sum += acc[g][i];
#pragma unroll
    for (int i = 0; i < kT / 2; ++i) sum += tail_acc[g][i];
  }
  sink[blockIdx.x * blockDim.x + threadIdx.x] = sum;
  if (threadIdx.x == 0) cycles[blockIdx.x] = t1 - t0;
}

// The slowest CTA's SM cycles (each CTA's clock64 interval, written to `cycles`).
long long slowest_cta_cycles(const long long* cycles, int sms) {
  long long* host = new long long[sms];
  check(cudaMemcpy(host, cycles, sms * sizeof(long long), cudaMemcpyDeviceToHost), "copy");
  long long max_cycles = 0;
  for (int i = 0; i < sms; ++i) max_cycles = host[i] > max_cycles ? host[i] : max_cycles;
  delete[] host;
  return max_cycles;
}

// Runs one variant on one CTA per SM; prints tensor-pipe share and TFLOPS.
template <int N, int kGroups, int kWgs, bool kPromote, bool kPipe, int kCopyBytes = 0,
          int kPollNs = 200, int kRegs = 0>
void run(const char* what, int sms, long long* cycles, float* sink, const uint8_t* copy_src) {
  using L = Layout<N, kGroups, kWgs, kCopyBytes, has_copy_warpgroup(kCopyBytes, kPollNs)>;
  auto kernel = spin<N, kGroups, kWgs, kPromote, kPipe, kCopyBytes, kPollNs, kRegs>;
  check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, 200 * 1024),
        "smem attribute");
  // Steps per warpgroup: kGroups per iteration (two in the pipelined loop), ~2^16 of them.
  const int steps_per_iter = kPipe ? 2 : kGroups;
  const int iters = (1 << 16) / steps_per_iter;
  // 200 KB of shared memory whatever the variant needs: one CTA per SM.
  static_assert(L::kBytes <= 200 * 1024, "variant does not fit the shared memory");
  kernel<<<sms, L::kThreads, 200 * 1024>>>(iters / 8, cycles, sink, copy_src);  // warm-up
  cudaEvent_t e0, e1;
  cudaEventCreate(&e0);
  cudaEventCreate(&e1);
  cudaEventRecord(e0);
  kernel<<<sms, L::kThreads, 200 * 1024>>>(iters, cycles, sink, copy_src);
  cudaEventRecord(e1);
  check(cudaEventSynchronize(e1), what);
  float ms = 0.f;
  cudaEventElapsedTime(&ms, e0, e1);
  const long long max_cycles = slowest_cta_cycles(cycles, sms);
  const double flop_per_cta = double(kWgs) * iters * steps_per_iter * kBlockM * N * kBlockK * 2.0;
  const double tensor_share = flop_per_cta / (double(max_cycles) * 8192.0);
  const double tflops = flop_per_cta * sms / (ms * 1e-3) / 1e12;
  std::printf("%-44s tensor %5.1f %%   %6.0f TFLOPS   %.2f GHz\n", what, 100.0 * tensor_share,
              tflops, max_cycles / (ms * 1e6));
}

// Runs spin_tail on one CTA per SM; prints SM cycles per K block and the pair's tensor share.
template <int kTailOrder>
void run_tail(const char* what, int sms, long long* cycles, float* sink) {
  auto kernel = spin_tail<kTailOrder>;
  check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, 200 * 1024),
        "smem attribute");
  const int iters = 1 << 15;
  kernel<<<sms, 2 * kWarpGroupThreads, 200 * 1024>>>(iters / 8, cycles, sink);  // warm-up
  kernel<<<sms, 2 * kWarpGroupThreads, 200 * 1024>>>(iters, cycles, sink);
  check(cudaDeviceSynchronize(), what);
  const long long max_cycles = slowest_cta_cycles(cycles, sms);
  const double per_block = double(max_cycles) / iters;
  const double pair_flop = 2.0 * kBlockM * 256 * kBlockK * 2.0;  // 128 rows x 256 columns
  std::printf("%-44s %7.1f cycles per K block   pair's tensor share %5.1f %%\n", what, per_block,
              100.0 * pair_flop / (per_block * 8192.0));
}

}  // namespace

int main() {
  int sms = 0;
  check(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0), "device");
  long long* cycles;
  float* sink;
  check(cudaMalloc(&cycles, sms * sizeof(long long)), "malloc");
  check(cudaMalloc(&sink, sms * 3 * kWarpGroupThreads * sizeof(float)), "malloc");
  uint8_t* copy_src;
  check(cudaMalloc(&copy_src, kCopySourceBytes), "malloc");
  check(cudaMemset(copy_src, 0x38, kCopySourceBytes), "memset");
  std::printf("%d SMs, one CTA each, operands resident in shared memory\n", sms);
  //   N, groups, warpgroups, promote, pipe[, bytes copied into shared memory per K block]
  const uint8_t* src = copy_src;
  run<128, 2, 2, false, false>("main's math, no promotion (n128 x2, 2 wg)", sms, cycles, sink, src);
  run<128, 2, 2, true, false>("main's math (n128 x2, 2 wg, promote)", sms, cycles, sink, src);
  run<128, 2, 2, true, false, 48 * 1024>("main's math + 48 KB copied per K block", sms, cycles,
                                         sink, src);
  run<128, 2, 2, true, false, 16>("main's math + 16 B copied per K block", sms, cycles, sink, src);
  run<128, 2, 2, true, false, 16, 2000>("main's math + 16 B copied, polled every 2 us", sms, cycles,
                                        sink, src);
  run<128, 2, 2, true, false, 48 * 1024, kCopyByMath>(
      "main's math + 48 KB copied by a math thread, 256 thr", sms, cycles, sink, src);
  run<128, 2, 2, true, false, kIdleWarpgroup, 200, 216>(
      "main's math + an idle warpgroup, 216 registers", sms, cycles, sink, src);
  run<128, 2, 2, true, false, 0, 200, 232>("main's math, setmaxnreg to 232, no extra warpgroup",
                                           sms, cycles, sink, src);
  run<128, 2, 2, true, false, kIdleWarpgroup>("main's math + an idle warpgroup (setmaxnreg)", sms,
                                              cycles, sink, src);
  run<128, 2, 2, true, false, 24 * 1024>("main's math + 24 KB copied per K block", sms, cycles,
                                         sink, src);
  run<128, 2, 2, false, false, 48 * 1024>("no promotion + 48 KB copied per K block", sms, cycles,
                                          sink, src);
  run<128, 2, 1, false, false>("one warpgroup, no promotion (n128 x2)", sms, cycles, sink, src);
  run<128, 1, 2, true, false>("128x128 tile (n128 x1, 2 wg, promote)", sms, cycles, sink, src);
  run<128, 1, 2, false, true>("n128 x1, 2 wg, two K blocks per wait", sms, cycles, sink, src);
  run<128, 1, 2, true, true>("n128 x1, 2 wg, promote, overlapped", sms, cycles, sink, src);
  run<64, 2, 2, true, false>("n64 x2, 2 wg, promote", sms, cycles, sink, src);
  // Narrow wgmma (L1's swap-AB tail is n16): each reads its A slice (2 KB) and B slice from
  // shared memory at 128 B per cycle, so below n64 the reads outlast the math (n16: 40 %).
  run<64, 2, 2, false, false>("n64 x2, 2 wg, no promotion", sms, cycles, sink, src);
  run<16, 2, 2, false, false>("n16 x2, 2 wg, no promotion", sms, cycles, sink, src);
  run<16, 2, 2, true, false>("n16 x2, 2 wg, promote", sms, cycles, sink, src);
  run<64, 2, 2, true, false, 40 * 1024>("n64 x2 (a lone tile) + 40 KB copied per K block", sms,
                                        cycles, sink, src);
  run<64, 2, 2, true, true>("n64 x2, 2 wg, promote, overlapped", sms, cycles, sink, src);
  run<128, 1, 3, true, false>("n128 x1, 3 wg, promote", sms, cycles, sink, src);
  run<64, 2, 3, true, true>("n64 x2, 3 wg, promote, overlapped", sms, cycles, sink, src);
  // L1's pair with a 16-row swap-AB tail: what the tail adds to a K block, per issue order.
  run_tail<kNoTail>("pair alone (n128 x2, 2 wg, promote)", sms, cycles, sink);
  run_tail<kTailFirst>("pair + tail, tail's group first (main)", sms, cycles, sink);
  run_tail<kAlternate>("pair + tail, k-steps alternating", sms, cycles, sink);
  return 0;
}
