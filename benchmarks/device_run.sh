#!/usr/bin/env bash
# One device call: build the extension, then the steps named in MODES (comma-separated), logs
# under $OUT:
#   test   single-process GPU tests (command buffers on, then a subset with them off) + the CLI
#   mp     multi-process GPU tests (tests/test_gpu_multiprocess.py; 2-4 GPUs)
#   gemm   standalone grouped GEMM tests + benchmarks/bench_gemm.py (one GPU)
#   bench  benchmarks/bench_mega_moe.py with $BENCH_ARGS
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

nvidia-smi -L | tee "$OUT/devices.txt"
date -u | tee -a "$OUT/devices.txt"
t0=$(date +%s)
if ! python3 -m pip install --no-build-isolation --no-deps -Cbuild-dir=/tmp/skb "$repo" \
    >"$OUT/build.log" 2>&1; then
  tail -40 "$OUT/build.log"
  exit 1
fi
echo "build: $(($(date +%s) - t0)) s"

status=0
summary() { grep -E "calc_diff|passed|failed|Error|skipped" | tail -60; }
# Run from tests/ so the installed package (with _C) is imported, not the source tree.
cd "$repo/tests"
if [[ $modes == *,test,* ]]; then
  python3 -m pytest -m gpu -q -s --ignore=test_gpu_multiprocess.py "$@" 2>&1 |
    tee "$OUT/gpu_tests.log" | summary
  status=$((status | PIPESTATUS[0]))
  XLA_FLAGS=--xla_gpu_enable_command_buffer= python3 -m pytest -m gpu -q test_gpu.py \
    -k "small_shape and (uniform or hot) or scan or two_layers" 2>&1 |
    tee "$OUT/gpu_tests_no_cmdbuf.log" | tail -3
  status=$((status | PIPESTATUS[0]))
  (cd /tmp && python3 -m jax_megamoe) 2>&1 | tee "$OUT/cli.txt"
fi
if [[ $modes == *,mp,* ]]; then
  timeout 420 python3 -m pytest -m gpu -q -s -rA test_gpu_multiprocess.py 2>&1 |
    tee "$OUT/gpu_mp_tests.log" | tail -40
  status=$((status | PIPESTATUS[0]))
fi
if [[ $modes == *,gemm,* ]]; then
  python3 -m pytest -m gpu -q -s test_gpu_gemm.py 2>&1 | tee "$OUT/gpu_gemm_tests.log" | summary
  status=$((status | PIPESTATUS[0]))
  (cd "$repo" && python3 benchmarks/bench_gemm.py --out "$OUT/gemm" 2>&1) |
    tee "$OUT/bench_gemm.log" | tail -30
fi
if [[ $modes == *,bench,* ]]; then
  # shellcheck disable=SC2086  # BENCH_ARGS is a list of flags
  (cd "$repo" && python3 benchmarks/bench_mega_moe.py --out "$OUT" ${BENCH_ARGS:-} 2>&1) |
    tee "$OUT/bench.log" | grep -v -i warn | tail -40
fi
exit "$status"
