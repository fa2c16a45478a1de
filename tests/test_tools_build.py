"""Builds that only GPU machines run, checked here by compiling them (nvcc; CI has it, no GPU
needed; skipped otherwise):
- the CUDA programs under tools/ still compile against the kernels' headers: they are run only
  by benchmarks/device_run.sh, so without this a header change could break them unnoticed until
  a device call;
- the GEMM kernels as the extension builds them: none touches local memory, so ptxas spilled
  nothing (the mainloop header's kMathRegs says how L1 keeps it so)."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
import sass_kloops as sk  # noqa: E402

NVCC = shutil.which("nvcc")
# device_run.sh's build_tool flags (the extension's, CMakeLists.txt), without the optimization
# level.
FLAGS = [
    "-std=c++17",
    "-gencode=arch=compute_90a,code=sm_90a",
    "--expt-relaxed-constexpr",
    f"-I{REPO / 'csrc' / 'include'}",
]
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="needs nvcc on PATH")


def nvcc(source, out, *flags):
    cmd = [NVCC, *FLAGS, *flags, "-c", str(source), "-o", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stderr[-4000:]}"


@needs_nvcc
@pytest.mark.parametrize(
    "tool", sorted(p.name for p in (REPO / "tools").glob("*.cu")), ids=lambda name: name
)
def test_tool_compiles(tool, tmp_path):
    # -O1: compiling is all that is checked, and CI has 2 cores.
    nvcc(REPO / "tools" / tool, tmp_path / "tool.o", "-O1")


@needs_nvcc
def test_gemm_kernels_keep_nothing_on_the_stack(tmp_path):
    # nvcc's default -O3, as the extension: ptxas's allocation is the point. Uncompressed, so
    # tools/sass_kloops.py reads the cubin's code and counts its LDL and STL (a spill is one).
    out = tmp_path / "gemm.o"
    nvcc(REPO / "csrc" / "launch" / "gemm.cu", out, "--no-compress")
    found = {name: local for name, _, local in sk.check(out.read_bytes())}
    # Both L1 instances (A from the pool, A gathered) and both L2 tile widths.
    for gemm in ("l1", "l2"):
        assert sum(f"sm90_fp8_mega_moe_{gemm}I" in k for k in found) == 2, sorted(found)
    on_stack = {k: v for k, v in found.items() if v}
    assert not on_stack, f"local-memory instructions: {on_stack}"
