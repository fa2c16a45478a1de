"""Test setup: 8 host devices for expert-parallel tests on CPU; `gpu` tests need Hopper.

`pytest` runs the CPU tests, and keeps JAX on the CPU even where a GPU is present: they build
their meshes from `jax.devices()` and expect its 8 host devices. `pytest -m gpu` runs the GPU
tests, with JAX's usual platforms. A JAX_PLATFORMS the caller set wins in both."""

import os

# Every output the CUDA kernels must write starts as NaN (launch.h's poison_outputs), so a row they
# leave unwritten fails the tests' finiteness checks. Read once, when the kernels are prepared.
os.environ.setdefault("JAX_MEGAMOE_POISON_OUTPUTS", "1")

# Must be set before JAX initialises its backends. Appended so a caller's flags survive.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()

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


def _keeps_jax_on_cpu(config) -> bool:
    """Whether this run keeps JAX on the CPU: it does not select the gpu tests (-m gpu) and the
    caller set no JAX_PLATFORMS."""
    markexpr = config.option.markexpr
    selects_gpu = "gpu" in markexpr and "not gpu" not in markexpr
    return not selects_gpu and "JAX_PLATFORMS" not in os.environ


def pytest_configure(config):
    # Before any test touches a device: JAX starts its backends at the first device query.
    if _keeps_jax_on_cpu(config):
        jax.config.update("jax_platforms", "cpu")


def pytest_collection_modifyitems(config, items):
    if _keeps_jax_on_cpu(config):
        reason = "a gpu test: `pytest -m gpu` runs these (plain `pytest` keeps JAX on the CPU)"
    elif _hopper_devices():
        return
    else:
        reason = "needs a Hopper (SM90) GPU and the built CUDA extension"
    skip = pytest.mark.skip(reason=reason)
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def extension_binary() -> Path:
    """The loaded CUDA extension's shared library (its cubins are read by tools/sass_*.py),
    wherever the install put it (an editable install keeps it apart from the sources); the
    test is skipped where the package was installed without it (no nvcc)."""
    from jax_megamoe import _ffi

    if not _ffi.extension_available():
        pytest.skip("CUDA extension not built")
    return Path(_ffi.extension().__file__)
