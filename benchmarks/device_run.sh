#!/usr/bin/env bash
# One device call: build the extension, run the GPU tests (command buffers on, then off), the CLI,
# and (with "bench") the benchmarks. Logs land in $OUT. Usage:
#   bash benchmarks/device_run.sh [test|bench|all] [extra pytest args...]
set -uo pipefail
export NCCL_NVLS_ENABLE=0 NVSHMEM_DISABLE_NVLS=1 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.6}
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/megamoe_out}
mkdir -p "$OUT"
mode=${1:-test}
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

# Run from tests/ so the installed package (with _C) is imported, not the source tree.
cd "$repo/tests"
status=0
if [[ $mode == test || $mode == all ]]; then
  python3 -m pytest -m gpu -q -s -x "$@" 2>&1 | tee "$OUT/gpu_tests.log" | grep -E \
    "calc_diff|passed|failed|error|Error|skipped" | tail -60
  status=${PIPESTATUS[0]}
  XLA_FLAGS=--xla_gpu_enable_command_buffer= python3 -m pytest -m gpu -q -x \
    -k "small_shape and (uniform or hot) or scan or two_layers" 2>&1 |
    tee "$OUT/gpu_tests_no_cmdbuf.log" | tail -3
  (cd /tmp && python3 -m jax_megamoe) 2>&1 | tee "$OUT/cli.txt"
fi
if [[ $mode == bench || $mode == all ]]; then
  cd "$repo"
  python3 benchmarks/bench_mega_moe.py --out "$OUT" 2>&1 | tee "$OUT/bench.log" | tail -40
fi
exit "$status"
