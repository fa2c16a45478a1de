"""The CUDA programs under tools/ still compile against the kernels' headers: they are run only on
GPU machines (benchmarks/device_run.sh), so without this a header change could break them
unnoticed until a device call. Needs nvcc (CI has it; no GPU needed); skipped otherwise."""

import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NVCC = shutil.which("nvcc")
# device_run.sh's build_tool flags, but -O1: compiling is all that is checked, and CI has 2 cores.
FLAGS = [
    "-std=c++17",
    "-O1",
    "-gencode=arch=compute_90a,code=sm_90a",
    "--expt-relaxed-constexpr",
    f"-I{REPO / 'csrc' / 'include'}",
]


@pytest.mark.skipif(NVCC is None, reason="needs nvcc on PATH")
@pytest.mark.parametrize(
    "tool", sorted(p.name for p in (REPO / "tools").glob("*.cu")), ids=lambda name: name
)
def test_tool_compiles(tool, tmp_path):
    cmd = [NVCC, *FLAGS, "-c", str(REPO / "tools" / tool), "-o", str(tmp_path / "tool.o")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stderr[-4000:]}"
