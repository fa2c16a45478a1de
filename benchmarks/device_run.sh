#!/usr/bin/env bash
# Build the extension on a Hopper machine, then run the steps named in MODES (comma-separated),
# writing logs under $OUT (default /tmp/megamoe_out):
#   readme    the README quickstart in a fresh copy of this checkout, from its root: install
#             (--no-build-isolation --no-deps: such machines often reach no package index),
#             `python -m jax_megamoe`, then `pytest` (the README's test command: the CPU tests,
#             which keep JAX on the CPU) and `pytest -m gpu` (the GPU tests)
#   test      single-process GPU tests (command buffers on, then a subset with them off, the
#             device-error tests included) + CLI
#   sanitize  compute-sanitizer memcheck, racecheck and synccheck on the GEMM kernels, run from
#             a host program without JAX (tools/gemm_sanitize.cu); $SANITIZE_TIMEOUT s per
#             tool run (default 300), tools $SANITIZE_TOOLS (default all three) on grids of
#             $SANITIZE_CTAS CTAs (default "0 8", 0 = full), each printing at most
#             $SANITIZE_PRINT_LIMIT reports (default 1000); racecheck's reports mapped to
#             SASS by tools/racecheck_sass.py, which fails the mode on one that names a range
#             no two warps share (launch.h's gemm_private_smem: a race), and only then (its
#             other reports are the mbarrier hand-offs; without cuobjdump any report fails
#             it); then racecheck on tools/racecheck_mbarrier_probe.cu
#   ceiling   tools/wgmma_ceiling.cu: the tensor-pipe share the main loop's math reaches with
#             its operands resident in shared memory, per way of issuing and promoting
#   stream    tools/tma_stream.cu: how fast one CTA per SM streams weights with TMA and no math,
#             per weight layout, ring depth and pause per tile (the small-M weight stream)
#   tmarow    tools/tma_row_gather.cu: whether a one-row TMA box lands where wgmma expects a
#             row of a 128B-swizzled tile, and how fast one warp gathers a pair's K block so
#             (the gather L1 could use at every M instead of cp.async)
#   l2sides   tools/l2_sides.cu: which SMs share a side of the L2 cache (hit latency per SM and
#             line, one SM at a time)
#   mp        multi-process GPU tests (tests/test_gpu_multiprocess.py; on 2-4 GPUs against one
#             process, on one GPU ranks as processes sharing it, the two timeout cases and a
#             failed launch on one rank)
#   gemm      benchmarks/bench_gemm.py (GEMMs alone vs cuBLAS, and its targets' verdict;
#             $GEMM_ARGS) + SASS counts
#   peer      benchmarks/bench_peer_gemm.py with $PEER_ARGS: DeepGEMM's grouped FP8 GEMM and
#             PyTorch's cuBLAS on the pools of the gemm mode's run (bench_gemm.py with
#             $GEMM_ARGS, run here first if gemm is not among the modes), or on those of the
#             results.json that $PEER_GEMM_RESULTS names (then this package is not built).
#             DeepGEMM is built in place, beside this package's build, from the source tree
#             $PEER_DEEPGEMM (default peers/DeepGEMM, an ignored folder sent with the run
#             tool's carry: DeepGEMM's files with its third-party/cutlass/include and
#             third-party/fmt/include at the submodule commits it pins); needs PyTorch. With
#             PEER_NCU=1 also the ncu mode's Nsight Compute report on one launch of DeepGEMM's
#             L1-shape kernel (ncu_peer_l1*)
#   bench     benchmarks/bench_mega_moe.py with $BENCH_ARGS
#   scan      benchmarks/bench_scan.py (per-layer overhead in a lax.scan step) with $SCAN_ARGS
#   hbmwrite  benchmarks/bench_hbm_write.py (the card's write rate over the route phase's bytes)
#             with $HBM_WRITE_ARGS
#   ab        bench_gemm.py ($GEMM_ARGS), or with AB_BENCH=layer bench_mega_moe.py
#             ($BENCH_ARGS), on two builds in one run: first the checkout at $AB_BASE (e.g.
#             `git worktree add --detach ab_base main`, sent with the run tool's carry), then
#             this one, which stays installed; the kernel names in the logs differ
#   envab     the same benchmark on this build once per setting in $AB_ENVS (space-separated
#             VAR=VALUE items, e.g. "JAX_MEGAMOE_GEMM_TILES=static JAX_MEGAMOE_GEMM_TILES=claimed"),
#             in order
#   ncu       tools/gemm_profile.cu's event timings of both GEMMs at each of $NCU_TOKENS tokens
#             (default 8192), then Nsight Compute (clocks left alone) on one launch of each GEMM
#             in $NCU_KERNELS (default "l1 l2") at the first of them: speed of light, memory,
#             warp stall reasons, launch shape and occupancy, and the per-SASS-instruction
#             stall samples as CSV
#   abprof    benchmarks/ab_gemm_profile.py: tools/gemm_profile.cu built from this checkout
#             ("this") and from each folder in $AB_TREES (e.g. `git archive main | tar -x -C
#             ab_main`: an untracked folder travels with the working tree), run in alternation
#             $AB_ROUNDS times (default 3) at each of $AB_TOKENS (default 2048,8192), $AB_ITERS
#             launches each (default 200: the power-capped steady state, not the first tens of
#             ms after a pause), both GEMMs or only those in $AB_KERNELS (l1 or l2: one GEMM's
#             time at the cap without the other's energy); medians of L1, L2 and L2 / L1 per build.
#             With $AB_ENVS (as for envab), this checkout's binary runs once per setting instead,
#             each a build of its own in the table
# The device tool returns at most 8 files from $OUT: after each mode everything under $OUT is
# packed into $OUT/0_bundle.tgz, which sorts first (Nsight Compute reports left out: too big),
# so a call cut short by its time limit still brings back the logs of the modes it finished.
# The package is built only for the modes that import it (readme builds its own copy).
# Usage: bash benchmarks/device_run.sh MODES [extra pytest args for "test"...]
set -uo pipefail
export NCCL_NVLS_ENABLE=0 NVSHMEM_DISABLE_NVLS=1 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.6}
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/megamoe_out}
mkdir -p "$OUT"
modes=",${1:-test},"
shift || true
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
# install [pip args...]: this checkout's build dir unless BUILD_DIR names another (a second
# source tree needs its own: scikit-build-core's cache remembers the source it configured).
install() {
  python3 -m pip install -v --no-build-isolation --no-deps -Cbuild-dir="${BUILD_DIR:-/tmp/skb}" "$@"
}
build_tool() { # BINARY LOG SOURCES...: a tools/ program, built as the GEMM kernels are
  # (the kernels re-hinted as the extension's build does, in a tree that has the script: an
  # A/B base from before it stays as ptxas wrote it)
  nvcc -std=c++17 -O3 -gencode=arch=compute_90a,code=sm_90a --expt-relaxed-constexpr \
    --no-compress -I csrc/include "${@:3}" -o "$1" >"$2" 2>&1 &&
    { [[ ! -f tools/sass_yield.py ]] || python3 tools/sass_yield.py "$1" >>"$2" 2>&1; } &&
    return 0
  tail -20 "$2"
  return 1
}
bench_layer() { # OUT_DIR: bench_mega_moe.py with $BENCH_ARGS, its table and phases to stdout
  # shellcheck disable=SC2086  # BENCH_ARGS is a list of flags
  python3 benchmarks/bench_mega_moe.py --out "$1" --no-plot ${BENCH_ARGS:-} 2>&1 |
    tee "$1.log" | grep -E "^\||^- " | tail -30
}
bench_gemm() { # OUT_DIR: bench_gemm.py with $GEMM_ARGS, the summary lines to stdout
  # shellcheck disable=SC2086  # GEMM_ARGS is a list of flags
  python3 benchmarks/bench_gemm.py --out "$1" ${GEMM_ARGS:-} 2>&1 | tee "$1.log" |
    grep -E "^\[M|HBM|^\||^targets" | tail -40
}

ncu_one() { # NAME REGEX COMMAND...: Nsight Compute (clocks left alone) on one launch of a
  # kernel matching REGEX in COMMAND, the first after $NCU_SKIP of them (default 1: the second):
  # $OUT/NAME.ncu-rep, its details and per-SASS CSV beside it, the key lines to stdout
  local name=$1 regex=$2
  shift 2
  ncu --clock-control none -k "regex:$regex" --launch-skip "${NCU_SKIP:-1}" --launch-count 1 \
    --section SpeedOfLight --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis \
    --section SchedulerStats --section WarpStateStats --section SourceCounters \
    --section LaunchStats --section Occupancy --export "$OUT/$name" "$@" >"$OUT/$name.txt" 2>&1
  # (--metrics regex:... or --import-source made ncu 2025.3 segfault here on 2026-12-02.)
  ncu --import "$OUT/$name.ncu-rep" --page details --print-details all \
    >"$OUT/${name}_details.txt" 2>&1
  local keys="Throughput|Eligible|Issued|Stall [A-Z]|Duration|Frequency|Tensor Cycles|Hit Rate"
  grep -E "$keys|Grid Size|Cluster|Waves" "$OUT/${name}_details.txt" | head -64
  # Per-SASS-instruction stall samples, for finding where the math warps wait.
  ncu --import "$OUT/$name.ncu-rep" --page source --print-source sass --csv \
    >"$OUT/${name}_sass.csv" 2>&1
}
if ! command -v nvidia-smi >/dev/null; then
  echo "device_run.sh runs on a machine with an NVIDIA GPU (no nvidia-smi here); on a CPU" \
    "machine run the README's commands (pytest) instead" >&2
  exit 2
fi
nvidia-smi -L | tee "$OUT/devices.txt"
# The serial: RESULTS.md names a card by its last four digits.
nvidia-smi --query-gpu=index,name,serial,power.limit --format=csv,noheader |
  tee -a "$OUT/devices.txt"
date -u | tee -a "$OUT/devices.txt"
bundle() { # everything under $OUT (but the bundle and Nsight Compute reports) into 0_bundle.tgz
  local b=/tmp/megamoe_bundle.tgz
  (cd "$OUT" && tar -czf "$b" --exclude=0_bundle.tgz --exclude='*.ncu-rep' . &&
    mv "$b" 0_bundle.tgz)
}
peer_tree=${PEER_DEEPGEMM:-peers/DeepGEMM}
peer_build() { # DeepGEMM's extension, in place in $peer_tree (its setup.py wants git and wheel)
  [[ -d $peer_tree/third-party/cutlass/include && -d $peer_tree/third-party/fmt/include ]] || {
    echo "peer: $peer_tree is not a DeepGEMM tree with third-party/{cutlass,fmt}/include"
    return 1
  }
  local dg
  dg=$(cd "$peer_tree" && pwd)
  # Its kernels are compiled when first called, against cute and cutlass beside its own headers.
  ln -sfn "$dg/third-party/cutlass/include/cutlass" "$dg/deep_gemm/include/cutlass"
  ln -sfn "$dg/third-party/cutlass/include/cute" "$dg/deep_gemm/include/cute"
  # Built by the compiler in python's sysconfig (/opt/gcc on the device's image), the extension
  # crashed in std::regex inside its own copy of libstdc++'s locale code (2026-12-04,
  # RESULTS.md): the system compiler, whose libstdc++ the process loads, goes first.
  local cxx=${PEER_CXX:-/usr/bin/g++}
  [[ -x $cxx ]] || cxx=$(command -v g++)
  echo "compiler: $cxx, $("$cxx" --version | head -1)"
  (cd "$dg" && CXX=$cxx CC=${cxx/%g++/gcc} LDSHARED="$cxx -shared" python3 - <<'SETUP'
import os

import torch
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension

print("PyTorch", torch.__version__, "C++11 ABI", torch.compiled_with_cxx11_abi())
includes = ["include", "include/cccl"]
# Absolute paths: ninja compiles from the build folder.
headers = ["deep_gemm/include", "third-party/cutlass/include", "third-party/fmt/include"]
third_party = [os.path.abspath(d) for d in headers]
ext = CUDAExtension(
    "deep_gemm._C",
    ["csrc/python_api.cpp"],
    include_dirs=[f"{CUDA_HOME}/{d}" for d in includes] + third_party,
    libraries=["cudart", "nvrtc"],
    library_dirs=[f"{CUDA_HOME}/lib64"],
    # PyTorch's C++ ABI, as DeepGEMM's setup.py passes it.
    extra_compile_args=[
        "-O3",
        "-Wno-psabi",
        "-Wno-deprecated-declarations",
        f"-D_GLIBCXX_USE_CXX11_ABI={int(torch.compiled_with_cxx11_abi())}",
    ],
)
setup(
    name="deep_gemm",
    ext_modules=[ext],
    cmdclass={"build_ext": BuildExtension},
    script_args=["build_ext", "--inplace"],
)
SETUP
  ) || return 1
  local so
  so=$(ls "$dg"/deep_gemm/_C*.so) || return 1
  ldd "$so" | grep -E "libstdc|libgcc_s"
  if command -v nm >/dev/null; then
    echo "libstdc++ locale code compiled into it (expect 0):" \
      "$(nm -C --defined-only "$so" | grep -c "std::codecvt<char16_t")"
  fi
}
if [[ $modes == *,peer,* ]]; then
  peer_build >"$OUT/peer_build.log" 2>&1 &
  peer_pid=$!
fi
if [[ $modes =~ ,(test|mp|gemm|ab|envab|bench|scan|hbmwrite), ||
  ($modes == *,peer,* && -z ${PEER_GEMM_RESULTS:-}) ]]; then
  t0=$(date +%s)
  if ! install . >"$OUT/build.log" 2>&1; then
    tail -40 "$OUT/build.log"
    exit 1
  fi
  echo "build: $(($(date +%s) - t0)) s"
fi

status=0
summary() { grep -E "calc_diff|passed|failed|Error|skipped" | tail -60; }
if [[ $modes == *,readme,* ]]; then
  # A copy of the working tree (a device copy's .git may lag behind it), built from scratch.
  fresh=$(mktemp -d)
  tar -C "$repo" --exclude=.git -cf - . | tar -C "$fresh" -xf -
  (cd "$fresh" && python3 -m pip install --no-build-isolation --no-deps . \
    >"$OUT/readme_install.log" 2>&1 && python3 -m jax_megamoe && {
    pytest -q 2>&1 | tee "$OUT/readme_pytest_cpu.log" | summary
    cpu=$?
    pytest -m gpu -q -s 2>&1 | tee "$OUT/readme_pytest.log" | summary
    exit $((cpu | $?))
  }) 2>&1 |
    tee "$OUT/readme.log"
  status=$((status | PIPESTATUS[0]))
  bundle
fi
if [[ $modes == *,test,* ]]; then
  python3 -m pytest -m gpu -q -s --ignore=tests/test_gpu_multiprocess.py "$@" 2>&1 |
    tee "$OUT/gpu_tests.log" | summary
  status=$((status | PIPESTATUS[0]))
  XLA_FLAGS=--xla_gpu_enable_command_buffer= python3 -m pytest -m gpu -q tests/test_gpu.py \
    tests/test_gpu_errors.py -k "small_shape and (uniform or hot) or scan or two_layers or errors" \
    2>&1 | tee "$OUT/gpu_tests_no_cmdbuf.log" | tail -3
  status=$((status | PIPESTATUS[0]))
  python3 -m jax_megamoe 2>&1 | tee "$OUT/cli.txt"
  bundle
fi
if [[ $modes == *,sanitize,* ]]; then
  # The GEMM kernels from a plain host program (tools/gemm_sanitize.cu): under JAX the
  # sanitizers took minutes or crashed. First without a tool (its own row checks), then each tool
  # on the full grid and on 8 CTAs (every CTA walks several tiles).
  if build_tool /tmp/gemm_sanitize "$OUT/sanitize_build.log" tools/gemm_sanitize.cu \
    csrc/launch/gemm.cu; then
    timeout 120 /tmp/gemm_sanitize 2>&1 | tee "$OUT/sanitize_plain.log"
    status=$((status | PIPESTATUS[0]))
    summary_re="ERROR SUMMARY|RACECHECK SUMMARY|checks passed|FAILED"
    racecheck_reported=0  # racecheck found hazards (status 3): the mapping below judges them
    for tool in ${SANITIZE_TOOLS:-memcheck racecheck synccheck}; do
      for ctas in ${SANITIZE_CTAS:-0 8}; do
        log="$OUT/sanitize_${tool}_$ctas.log"
        timeout "${SANITIZE_TIMEOUT:-300}" compute-sanitizer --tool "$tool" \
          --print-limit "${SANITIZE_PRINT_LIMIT:-1000}" --error-exitcode 3 /tmp/gemm_sanitize \
          --ctas "$ctas" >"$log" 2>&1
        rc=$?
        if [[ $tool == racecheck && $rc == 3 ]]; then racecheck_reported=3; else
          status=$((status | rc)); fi
        echo "$tool ctas=$ctas rc=$rc: $(grep -E "$summary_re" "$log" | tr '\n' ' ')"
      done
    done
    # racecheck reports every mbarrier hand-off; one on a range that no two warps share but
    # through a barrier it follows is a race (tools/racecheck_sass.py, status 3). Without the
    # mapping, any report fails the mode.
    racecheck_logs=("$OUT"/sanitize_racecheck_*.log)
    if [[ ! -f ${racecheck_logs[0]} ]]; then
      :  # racecheck did not run
    elif command -v cuobjdump >/dev/null && command -v c++filt >/dev/null; then
      cuobjdump -sass /tmp/gemm_sanitize >/tmp/gemm_sanitize.sass &&
        /tmp/gemm_sanitize --private-smem >"$OUT/private_smem.txt" &&
        python3 tools/racecheck_sass.py --private "$OUT/private_smem.txt" \
          /tmp/gemm_sanitize.sass "${racecheck_logs[@]}" >"$OUT/racecheck_sass.txt" 2>&1
      rc=$?
      status=$((status | rc))
      echo "racecheck reports mapped to SASS rc=$rc: $(tail -1 "$OUT/racecheck_sass.txt")"
    else
      echo "no cuobjdump or c++filt here: map racecheck's reports with tools/racecheck_sass.py"
      status=$((status | racecheck_reported))
    fi
  else
    status=1
  fi
  # What racecheck reports on an mbarrier hand-off alone: mode 1 is race-free, mode 2 a real
  # race (tools/racecheck_mbarrier_probe.cu). Informational, not part of the status.
  if nvcc -std=c++17 -gencode=arch=compute_90a,code=sm_90a -lineinfo -I csrc/include \
    tools/racecheck_mbarrier_probe.cu -o /tmp/racecheck_probe >>"$OUT/sanitize_build.log" 2>&1; then
    for mode in 1 2; do
      echo "racecheck probe mode $mode: $(timeout 60 compute-sanitizer --tool racecheck \
        /tmp/racecheck_probe "$mode" 2>&1 | grep -E "RACECHECK SUMMARY" | tr '\n' ' ')"
    done
  fi
  bundle
fi
run_tool() { # NAME: tools/NAME.cu, built as the GEMM kernels are and run; output in $OUT/NAME.txt
  if build_tool "/tmp/$1" "$OUT/$1_build.log" "tools/$1.cu"; then
    timeout 120 "/tmp/$1" 2>&1 | tee "$OUT/$1.txt"
    status=$((status | PIPESTATUS[0]))
  else
    status=1
  fi
}
if [[ $modes == *,ceiling,* ]]; then run_tool wgmma_ceiling; bundle; fi
if [[ $modes == *,stream,* ]]; then run_tool tma_stream; bundle; fi
if [[ $modes == *,tmarow,* ]]; then run_tool tma_row_gather; bundle; fi
if [[ $modes == *,l2sides,* ]]; then run_tool l2_sides; bundle; fi
if [[ $modes == *,mp,* ]]; then
  timeout 600 python3 -m pytest -m gpu -q -s -rA tests/test_gpu_multiprocess.py 2>&1 |
    tee "$OUT/gpu_mp_tests.log" | tail -40
  status=$((status | PIPESTATUS[0]))
  bundle
fi
if [[ $modes == *,gemm,* ]]; then
  bash tools/check_sass.sh 2>&1 | tee "$OUT/sass.txt" | grep -E "QGMMA|spill|K loops|FAIL"
  bench_gemm "$OUT/gemm"
  bundle
fi
if [[ $modes == *,peer,* ]]; then
  gemm_results=${PEER_GEMM_RESULTS:-$OUT/gemm/results.json}
  [[ -f $gemm_results ]] || bench_gemm "$OUT/gemm"
  t0=$(date +%s)
  if wait "$peer_pid"; then
    echo "peer build: waited $(($(date +%s) - t0)) s for it"
    grep -E "^compiler:|^PyTorch|libstdc|libgcc_s|locale code" "$OUT/peer_build.log"
    # shellcheck disable=SC2086  # PEER_ARGS is a list of flags
    PYTHONPATH="$peer_tree" python3 -X faulthandler benchmarks/bench_peer_gemm.py \
      --gemm-results "$gemm_results" --out "$OUT/peer" ${PEER_ARGS:-} 2>&1 |
      tee "$OUT/peer.log" | grep -E "^\[M|^\||Error|error|Fatal" | tail -30
    rc=${PIPESTATUS[0]}
    echo "bench_peer_gemm.py exit status $rc"
    status=$((status | rc))
    if [[ -n ${PEER_NCU:-} ]]; then  # DeepGEMM's L1-shape kernel at the first M, profiled:
      # its first launch, the check of the L1 shape (the second is L2's check)
      # shellcheck disable=SC2086  # PEER_ARGS is a list of flags
      NCU_SKIP=0 PYTHONPATH="$peer_tree" ncu_one ncu_peer_l1 sm90_fp8_gemm_1d2d python3 \
        benchmarks/bench_peer_gemm.py --gemm-results "$gemm_results" --out "$OUT/peer_ncu" \
        --iters 1 ${PEER_ARGS:-}
    fi
  else
    tail -30 "$OUT/peer_build.log"
    status=1
  fi
  bundle
fi
if [[ $modes == *,ab,* ]]; then
  base=$(cd "${AB_BASE:?ab needs AB_BASE, the other checkout}" && pwd)
  echo "== base: $base"
  what=${AB_BENCH:-gemm}
  if BUILD_DIR=/tmp/skb_base install "$base" >"$OUT/build_base.log" 2>&1; then
    "bench_$what" "$OUT/${what}_base"
  else
    tail -20 "$OUT/build_base.log"
    status=1
  fi
  echo "== this checkout"
  install . >"$OUT/build.log" 2>&1 && "bench_$what" "$OUT/${what}_this"
  bundle
fi
if [[ $modes == *,envab,* ]]; then
  what=${AB_BENCH:-gemm}
  run=0
  for setting in ${AB_ENVS:?envab needs AB_ENVS, e.g. JAX_MEGAMOE_GEMM_TILES=static ...}; do
    run=$((run + 1))
    echo "== $setting"
    # Numbered, so a setting that repeats (to alternate settings) keeps each run's files.
    (export "${setting?}" && "bench_$what" "$OUT/${what}_${run}_${setting//[^A-Za-z0-9_-]/_}")
  done
  bundle
fi
if [[ $modes == *,bench,* ]]; then
  # shellcheck disable=SC2086  # BENCH_ARGS is a list of flags
  python3 benchmarks/bench_mega_moe.py --out "$OUT" ${BENCH_ARGS:-} 2>&1 |
    tee "$OUT/bench.log" | grep -v -i warn | tail -40
  bundle
fi
if [[ $modes == *,scan,* ]]; then
  # shellcheck disable=SC2086  # SCAN_ARGS is a list of flags
  python3 benchmarks/bench_scan.py --out "$OUT/scan" ${SCAN_ARGS:-} 2>&1 |
    tee "$OUT/bench_scan.log" | grep -E "^\[M|^\|" | tail -20
  bundle
fi
if [[ $modes == *,hbmwrite,* ]]; then
  # shellcheck disable=SC2086  # HBM_WRITE_ARGS is a list of flags
  python3 benchmarks/bench_hbm_write.py --out "$OUT/hbm_write" ${HBM_WRITE_ARGS:-} 2>&1 |
    tee "$OUT/hbm_write.log" | grep -E "^\|" | tail -20
  bundle
fi
if [[ $modes == *,ncu,* ]]; then
  # On tools/gemm_profile.cu, a host program without JAX (ncu segfaulted attaching to
  # bench_gemm.py's process on 2026-12-02): first its own event timings, then one launch per
  # kernel (the second of its kind) under Nsight Compute.
  if build_tool /tmp/gemm_profile "$OUT/gemm_profile_build.log" tools/gemm_profile.cu \
    csrc/launch/gemm.cu; then
    tokens=${NCU_TOKENS:-8192}
    for m in $tokens; do
      /tmp/gemm_profile --tokens "$m" | tee -a "$OUT/gemm_profile.txt"
    done
    for k in ${NCU_KERNELS:-l1 l2}; do
      ncu_one "ncu_$k" "sm90_fp8_mega_moe_$k" /tmp/gemm_profile --tokens "${tokens%% *}" --iters 2
    done
  else
    status=1
  fi
  bundle
fi
if [[ $modes == *,abprof,* ]]; then
  builds=()
  # The base first (the table's changes are against the first build), this checkout last.
  # shellcheck disable=SC2086  # AB_TREES is a list of folders
  for tree in ${AB_TREES:-} .; do
    if [[ ! -d $tree ]]; then
      echo "abprof: AB_TREES names $tree, which is not a folder of this checkout"
      status=1
      continue
    fi
    name=$(basename "$(cd "$tree" && pwd)")
    [[ $tree == . ]] && name=this
    if (cd "$tree" && build_tool "/tmp/gemm_profile_$name" "$OUT/abprof_build_$name.log" \
      tools/gemm_profile.cu csrc/launch/gemm.cu); then
      builds+=("$name=/tmp/gemm_profile_$name")
    else
      status=1
    fi
  done
  if [[ -n ${AB_ENVS:-} && ${#builds[@]} -gt 0 && ${builds[-1]} == this=* ]]; then
    unset 'builds[-1]'
    for setting in $AB_ENVS; do  # a wrapper per setting, named by it without '='
      wrapper="/tmp/gemm_profile_env${#builds[@]}"
      printf '#!/bin/sh\nexec env %q /tmp/gemm_profile_this "$@"\n' "$setting" >"$wrapper"
      chmod +x "$wrapper"
      builds+=("${setting//=/:}=$wrapper")
    done
  fi
  python3 benchmarks/ab_gemm_profile.py --tokens "${AB_TOKENS:-2048,8192}" \
    --rounds "${AB_ROUNDS:-3}" --iters "${AB_ITERS:-200}" --kernels "${AB_KERNELS:-both}" \
    --out "$OUT/abprof.json" \
    "${builds[@]}" 2>&1 |
    tee "$OUT/abprof.log" | grep -E "^\|"
  status=$((status | PIPESTATUS[0]))
  bundle
fi
bundle
exit "$status"
