"""Builds that only GPU machines run, checked here by compiling them (nvcc; CI has it, no GPU
needed; skipped otherwise):
- the CUDA programs under tools/ still compile against the kernels' headers: they are run only
  by benchmarks/device_run.sh, so without this a header change could break them unnoticed until
  a device call;
- the opt-in build JAX_MEGAMOE_L1_SPILL_FREE=1 (CMake option of that name): ptxas keeps nothing
  on the stack in any GEMM kernel (the mainloop header's kL1SpillFree says how). The default
  build keeps a few per-tile words of L1 there, never in a K loop (test_sass_kloops.py)."""

import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
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
    return done


@needs_nvcc
@pytest.mark.parametrize(
    "tool", sorted(p.name for p in (REPO / "tools").glob("*.cu")), ids=lambda name: name
)
def test_tool_compiles(tool, tmp_path):
    # -O1: compiling is all that is checked, and CI has 2 cores.
    nvcc(REPO / "tools" / tool, tmp_path / "tool.o", "-O1")


ENTRY = re.compile(r"Compiling entry function '(\w+)'")
STACK = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def ptxas_stack_use(log):
    """{kernel: (stack frame, spill stores, spill loads) bytes} from ptxas -v output."""
    use, kernel = {}, None
    for line in log.splitlines():
        if m := ENTRY.search(line):
            kernel = m.group(1)
        elif (m := STACK.search(line)) and kernel is not None:
            use[kernel] = tuple(int(g) for g in m.groups())
            kernel = None
    return use


def test_ptxas_stack_use_is_read_per_kernel():
    log = (
        "ptxas info    : Compiling entry function '_Z2k1v' for 'sm_90a'\n"
        "ptxas info    : Function properties for _Z2k1v\n"
        "    32 bytes stack frame, 28 bytes spill stores, 76 bytes spill loads\n"
        "ptxas info    : Compiling entry function '_Z2k2v' for 'sm_90a'\n"
        "    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n"
    )
    assert ptxas_stack_use(log) == {"_Z2k1v": (32, 28, 76), "_Z2k2v": (0, 0, 0)}


@needs_nvcc
def test_spill_free_build_keeps_nothing_on_the_stack(tmp_path):
    # nvcc's default -O3, as the extension: ptxas's allocation is the point.
    done = nvcc(
        REPO / "csrc" / "launch" / "gemm.cu",
        tmp_path / "gemm.o",
        "-DJAX_MEGAMOE_L1_SPILL_FREE=1",
        "-Xptxas",
        "-v",
    )
    use = ptxas_stack_use(done.stdout + done.stderr)
    # Both L1 instances (A from the pool, A gathered) and both L2 tile widths.
    for gemm in ("l1", "l2"):
        assert sum(f"sm90_fp8_mega_moe_{gemm}I" in k for k in use) == 2, sorted(use)
    on_stack = {k: v for k, v in use.items() if v != (0, 0, 0)}
    assert not on_stack, f"(stack frame, spill stores, spill loads) bytes: {on_stack}"
