"""`.ci/run` fails when the README's test command fails, whichever half of it fails: under
`set -e` a failure on the left of `&&` does not stop a script, so a broken install once let CI
pass on the style checks alone. Runs a copy of the script with stub tools on PATH."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TOOLS = ("pip", "pytest", "ruff", "git", "xargs", "clang-format")


@pytest.mark.parametrize("failing", ["pip", "pytest", None])
def test_ci_fails_when_the_readme_command_fails(failing, tmp_path):
    (tmp_path / ".ci").mkdir()
    shutil.copy(REPO / ".ci" / "run", tmp_path / ".ci" / "run")
    stubs = tmp_path / "bin"
    stubs.mkdir()
    for tool in TOOLS:
        stub = stubs / tool
        stub.write_text(f"#!/bin/sh\nexit {1 if tool == failing else 0}\n")
        stub.chmod(0o755)
    env = {**os.environ, "PATH": f"{stubs}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run(
        ["bash", str(tmp_path / ".ci" / "run")], env=env, capture_output=True, timeout=60
    )
    assert (done.returncode != 0) == (failing is not None), (failing, done.returncode)
