#!/usr/bin/env bash
# Compiles csrc/launch/gemm.cu for sm_90a, fails on local memory in a K loop (spills; read from
# the cubin by tools/sass_kloops.py) or on serialized wgmma, and prints the per-kernel counts of
# the instructions that matter for the GEMM main loops (needs cuobjdump + nvdisasm on PATH for
# the SASS part; the pip wheels nvidia-cuda-cuobjdump / nvidia-cuda-nvdisasm ship them).
# CHECK_SASS_FLAGS adds nvcc flags, e.g. -DNAME=1 to check a variant before running it.
set -euo pipefail
cd "$(dirname "$0")/.."
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT

# shellcheck disable=SC2086  # CHECK_SASS_FLAGS is a list of flags
if ! nvcc -std=c++17 -O3 -gencode=arch=compute_90a,code=sm_90a --expt-relaxed-constexpr -Xptxas -v \
  --no-compress \
  ${CHECK_SASS_FLAGS:-} \
  -I csrc/include -c csrc/launch/gemm.cu -o "$out/gemm.o" 2> "$out/ptxas.txt"; then
  grep -v "^ptxas info" "$out/ptxas.txt" | tail -20 >&2  # its stderr went to the file
  echo "FAIL: csrc/launch/gemm.cu does not compile" >&2
  exit 1
fi
grep -E "Compiling entry|stack frame|registers" "$out/ptxas.txt" | sed 's/ptxas info *: //'
# ptxas counts a kernel's whole stack; what must never happen is local memory inside a K loop
# (none of the kernels has any today: tests/test_tools_build.py; design §4.2 says how L1 keeps
# it so).
if ! python3 tools/sass_kloops.py --require "$out/gemm.o"; then
  echo "FAIL: local memory (a spill) inside a GEMM kernel's K loop" >&2
  exit 1
fi
# ptxas C7515: it waits after every wgmma when other instructions write their accumulators
# in flight (a build of an experiment on 2026-12-02 hit this; ptxas says it only with -v).
if grep -q "wgmma.mma_async instructions are serialized" "$out/ptxas.txt"; then
  grep "serialized" "$out/ptxas.txt" >&2
  echo "FAIL: ptxas serialized the wgmma of a GEMM kernel" >&2
  exit 1
fi

# The promotion's yield hints and register-bank conflicts, from the cubin itself (no cuobjdump):
# ptxas's and what the build's re-hinting pass makes of them (tools/sass_yield.py).
python3 tools/sass_yield.py --report --kernels mega_moe_l "$out/gemm.o"

if ! command -v cuobjdump > /dev/null; then
  echo "cuobjdump not on PATH: skipping SASS counts"
  exit 0
fi
cuobjdump -sass "$out/gemm.o" > "$out/gemm.sass"
awk '
  /Function :/ { fn = $3; next }
  /^ +\/\*[0-9a-f]+\*\/ / {
    op = ""; for (i = 2; i <= NF; ++i) if ($i ~ /^[A-Z][A-Za-z0-9_.]*$/ && $i != "PT") { op = $i; break }
    sub(/\..*/, "", op)
    if (op ~ /^(HMMA|QMMA|HGMMA|QGMMA|WARPGROUP|F2FP|FADD|FFMA|LDSM|LDS|LDGSTS|STG|LDL|STL|BAR)$/) n[fn " " op]++
  }
  END { for (k in n) print k, n[k] }' "$out/gemm.sass" | sort
