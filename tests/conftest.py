"""Test setup: 8 host devices for expert-parallel tests on CPU; `gpu` tests need Hopper."""

import os

# Must be set before JAX initialises its backends. Appended so a caller's flags survive.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()

import importlib.util  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_enable_x64", False)


def _hopper_devices() -> list:
    from jax_megamoe import _ffi

    if not _ffi.extension_available():
        return []
    try:
        gpus = jax.devices("gpu")
    except RuntimeError:
        return []
    return [d for d in gpus if _ffi.is_sm90(d)]


def pytest_collection_modifyitems(config, items):
    if _hopper_devices():
        return
    skip = pytest.mark.skip(reason="needs a Hopper (SM90) GPU and the built CUDA extension")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def extension_binary() -> Path:
    """The installed CUDA extension's shared library (its cubins are read by tools/sass_*.py);
    the test is skipped where the package was installed without it (no nvcc)."""
    spec = importlib.util.find_spec("jax_megamoe")
    found = (
        []
        if spec is None or spec.origin is None
        else sorted(Path(spec.origin).parent.glob("_C*.so"))
    )
    if not found:
        pytest.skip("CUDA extension not built")
    return found[0]
