"""The test setup (tests/conftest.py): plain `pytest` keeps JAX on the CPU, so the CPU tests find
the 8 host devices they build their meshes from even on a machine with GPUs; kernel outputs start
as NaN."""

import os

import jax
import pytest


@pytest.mark.skipif("JAX_PLATFORMS" in os.environ, reason="the caller chose JAX's platforms")
def test_plain_pytest_keeps_jax_on_the_cpu():
    assert jax.config.jax_platforms == "cpu"
    assert [d.platform for d in jax.devices()] == ["cpu"] * 8


def test_kernel_outputs_are_poisoned_in_tests():
    """The GPU tests' kernels fill their outputs with NaN first (launch.h's poison_outputs), so a
    row they leave unwritten fails a finiteness check instead of passing as zeros."""
    assert os.environ.get("JAX_MEGAMOE_POISON_OUTPUTS") == "1"
