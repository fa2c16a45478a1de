"""The extension's CPU-callable parts (constants, workspace size, target registrations), how
the package says why the extension is missing, and that a run from the repo root imports the
installed package. The ``_C`` tests need the extension built (CI builds it: nvcc is there; no GPU
is needed) and are skipped with the reason otherwise."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from absl.testing import parameterized

from jax_megamoe import _ffi, checks, constants
from jax_megamoe.symm_buffer import workspace_nbytes

REPO = Path(__file__).resolve().parents[1]
NO_EXTENSION = (
    ""
    if _ffi.extension_available()
    else _ffi.missing_extension_reason(Path(_ffi.__file__).parent, _ffi._LOAD_ERROR)
)
needs_extension = pytest.mark.skipif(
    bool(NO_EXTENSION), reason=f"needs the built extension: {NO_EXTENSION}"
)

# (num_ranks, num_experts, hidden, intermediate, topk, max_tokens)
CONFIGS = {
    "tiny": (1, 1, 128, 128, 1, 1),
    "small": (4, 16, 512, 256, 4, 8),
    "uneven_tokens": (2, 6, 384, 640, 5, 37),
    "dsv3_8": (8, 256, 7168, 2048, 8, 4096),
    "dsv3_1": (1, 256, 7168, 2048, 8, 4096),
    "max_topk": (2, 64, 256, 128, 32, 3),
}
BAD_CONFIGS = {
    "hidden_zero": (1, 8, 0, 128, 2, 8),
    "hidden_negative": (1, 8, -128, 128, 2, 8),
    "intermediate_not_128": (1, 8, 256, 100, 2, 8),
    "topk_over_32": (2, 128, 256, 128, 33, 8),
    "experts_not_divisible": (3, 8, 256, 128, 2, 8),
    "too_many_local_experts": (1, 4097, 128, 128, 2, 8),
    "no_tokens": (1, 8, 256, 128, 2, 0),
    "pool_past_int32": (8, 64, 128, 128, 32, 2**24),
    # Past int32 only once the pool's block count is formed (it wrapped to 2 blocks in C++).
    "pool_blocks_past_int32": (2**20, 2**20, 128, 128, 32, 8192),
    # num_ranks * max_tokens * topk past 2^64 (it wrapped in C++).
    "slots_past_uint64": (2**31 - 1, 2**31 - 1, 128, 128, 32, 2**31 - 1),
}


def _kwargs(config):
    r, e, h, i, k, m = config
    return dict(num_ranks=r, num_experts=e, hidden=h, intermediate=i, topk=k, max_tokens_per_rank=m)


class WorkspaceSizeTest(parameterized.TestCase):
    @parameterized.named_parameters(*CONFIGS.items())
    def test_python_size_equals_extension(self, config):
        if NO_EXTENSION:
            self.skipTest(f"needs the built extension: {NO_EXTENSION}")
        checks.check_workspace_args(**_kwargs(config), sm_budget=0)  # accepted on both sides
        r, e, h, i, k, m = config
        want = _ffi.extension().workspace_nbytes(r, e, h, i, k, m)
        got = workspace_nbytes(
            num_ranks=r, num_experts=e, hidden=h, intermediate=i, topk=k, max_tokens_per_rank=m
        )
        self.assertEqual(got, want)

    @parameterized.named_parameters(*BAD_CONFIGS.items())
    def test_python_rejects_what_extension_rejects(self, config):
        with self.assertRaises(ValueError):
            checks.check_workspace_args(**_kwargs(config), sm_budget=0)
        if not NO_EXTENSION:
            with self.assertRaises(ValueError):
                _ffi.extension().workspace_nbytes(*config)


@needs_extension
def test_extension_refuses_a_workspace_past_2_62_bytes():
    # Python sizes it exactly (no GPU holds it: create fails on the free-memory check); C++ sums
    # the regions in size_t, which must not wrap.
    config = (1, 1, 2**31 - 128, 2**31 - 128, 1, 2**30)
    with pytest.raises(ValueError, match="more than 2\\^62 bytes"):
        _ffi.extension().workspace_nbytes(*config)
    assert workspace_nbytes(**_kwargs(config)) > 2**62


def test_size_of_the_smallest_workspace_by_hand():
    """R=E=K=M=1, H=I=128: 128 (header) + 6 x 128 (flags, statuses, bases) + no staging (one
    rank reads its inputs) + 3 x 128 (expert counters) + 128 (route scalars) + 2 x 128
    (block_expert, block_stored) + 2 x 512 (row_src, row_weight over a 128-row pool: one expert
    segment) + 2 x (16384 + 512) (pool, act) + 256 (combine). With R = E = 2 the staging's four
    regions are back (4 x 128) and the pool bounds 2 slots + 127 padding rows: 256 rows (4
    blocks), so 2 x 1024 for row_src and row_weight and 2 x (32768 + 1024) for pool and act."""
    dims = dict(hidden=128, intermediate=128, topk=1, max_tokens_per_rank=1)
    assert workspace_nbytes(num_ranks=1, num_experts=1, **dims) == (
        128 + 768 + 384 + 128 + 2 * 128 + 2 * 512 + 2 * (16384 + 512) + 256
    )
    assert workspace_nbytes(num_ranks=2, num_experts=2, **dims) == (
        128 + 768 + 4 * 128 + 384 + 128 + 2 * 128 + 2 * 1024 + 2 * (32768 + 1024) + 256
    )


@needs_extension
def test_constants_equal_the_extension():
    names = (
        "BLOCK_M",
        "EXPERT_ALIGN_M",
        "QUANT_BLOCK",
        "MAX_TOPK",
        "MAX_LOCAL_EXPERTS",
        "DEFAULT_TIMEOUT_S",
        "ROUTE_BLOCKS_PER_SM",
        "GATHER_ROWS_PER_EXPERT",
        "MAX_GEMM_CTAS",
    )
    assert _ffi.extension().constants() == {n: getattr(constants, n) for n in names}


@needs_extension
def test_buffer_error_of_an_unknown_workspace_is_none():
    """The binding SymmBuffer.check reads; it needs no GPU for a workspace that does not exist."""
    assert _ffi.extension().buffer_error(123456, 0) is None


@needs_extension
def test_workspace_timeout_of_an_unknown_workspace_names_it():
    with pytest.raises(ValueError, match="no workspace 123456 on device 0"):
        _ffi.extension().workspace_timeout_s(123456, 0)


@needs_extension
@pytest.mark.parametrize("ordinal", [-1, 64])
def test_launch_failure_hook_refuses_an_ordinal_out_of_range(ordinal):
    """The test hook of tests/test_gpu_multiprocess.py keeps one flag per device ordinal."""
    with pytest.raises(ValueError, match=rf"device ordinal {ordinal} is outside \[0, 64\)"):
        _ffi.extension().inject_launch_failure(ordinal)


@needs_extension
def test_registrations_are_the_target_names():
    c = _ffi.extension()
    targets = {c.FP8_MEGA_MOE_TARGET, c.L1_GEMM_TARGET, c.L2_GEMM_TARGET}
    assert set(c.registrations()) == targets
    assert len(targets) == 3


# --- A missing extension says why -------------------------------------------------------------


def _package(root: Path, *parts: str) -> Path:
    pkg = root.joinpath(*parts, "jax_megamoe")
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    return pkg


def test_reason_extension_that_fails_to_load(tmp_path):
    pkg = _package(tmp_path, "site-packages")
    (pkg / "_C.cpython-311-x86_64-linux-gnu.so").write_bytes(b"")
    err = ImportError("libcudart.so.12: cannot open shared object file")
    reason = _ffi.missing_extension_reason(pkg, err)
    assert "exists but failed to load" in reason and "libcudart.so.12" in reason


def test_reason_source_tree(tmp_path):
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "jax-megamoe"\n')
    reason = _ffi.missing_extension_reason(_package(tmp_path, "src"), ImportError("no _C"))
    assert "imported from the source tree" in reason and str(tmp_path) in reason


def test_reason_editable_install_without_cuda(tmp_path, monkeypatch):
    """An editable install built without CUDA imports the source tree too: it was told to drop
    the source tree from sys.path, which it never put there."""
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "jax-megamoe"\n')
    pkg = _package(tmp_path, "src")
    monkeypatch.setattr(_ffi, "_editable_source", lambda: tmp_path)
    reason = _ffi.missing_extension_reason(pkg, ImportError("no _C"))
    assert "installed in editable mode from" in reason and str(tmp_path) in reason
    monkeypatch.setattr(_ffi, "_editable_source", lambda: tmp_path / "another")
    assert "imported from the source tree" in _ffi.missing_extension_reason(pkg, None)


def test_editable_source_is_read_from_the_install():
    """None for a regular install; for an editable one, a folder holding this project."""
    source = _ffi._editable_source()
    assert source is None or (source / "pyproject.toml").is_file()


@pytest.mark.parametrize("where", [("site-packages",), (".venv", "lib", "site-packages")])
def test_reason_built_without_cuda(tmp_path, where):
    """An install, even in a venv inside the checkout, is not mistaken for the source tree."""
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "jax-megamoe"\n')
    reason = _ffi.missing_extension_reason(_package(tmp_path, *where), ImportError("no _C"))
    assert "installed without its CUDA extension" in reason


def test_this_checkout_is_reported_as_the_source_tree():
    assert _ffi._source_checkout(REPO / "src" / "jax_megamoe") == REPO


# --- The repo root does not shadow the installed package ---------------------------------------


def _import_path(cwd: Path) -> subprocess.CompletedProcess:
    """Where ``import jax_megamoe`` resolves when Python starts in ``cwd``, with this checkout
    left off PYTHONPATH (a ``python -c``/``-m`` run puts the current directory first)."""
    keep = [
        p
        for p in os.environ.get("PYTHONPATH", "").split(os.pathsep)
        if p and not Path(p).resolve().is_relative_to(REPO)
    ]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(keep)}
    code = "import jax_megamoe; print(jax_megamoe.__file__)"
    return subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=60
    )


def test_repo_root_imports_the_installed_package(tmp_path):
    """``python -m jax_megamoe`` and ``python -m pytest`` from the repo root must use the
    installed copy (which has ``_C``), not the checkout's sources: with the package at the repo
    root (the old layout) the current directory shadowed it."""
    installed = _import_path(tmp_path)
    if installed.returncode != 0:
        pytest.skip(
            "jax_megamoe is not installed (tests run from the source tree via PYTHONPATH=src); "
            "pip install . to run this check"
        )
    from_root = _import_path(REPO)
    assert from_root.returncode == 0, from_root.stderr
    assert from_root.stdout == installed.stdout, (
        f"from the repo root jax_megamoe is {from_root.stdout.strip()}, "
        f"elsewhere {installed.stdout.strip()}"
    )
