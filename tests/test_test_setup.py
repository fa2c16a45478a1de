"""The test setup (tests/conftest.py): plain `pytest` keeps JAX on the CPU, so the CPU tests find
the 8 host devices they build their meshes from even on a machine with GPUs."""

import os

import jax
import pytest


@pytest.mark.skipif("JAX_PLATFORMS" in os.environ, reason="the caller chose JAX's platforms")
def test_plain_pytest_keeps_jax_on_the_cpu():
    assert jax.config.jax_platforms == "cpu"
    assert [d.platform for d in jax.devices()] == ["cpu"] * 8
