"""Trace-time operand checks shared by the public op, the weights and the standalone GEMMs."""

from __future__ import annotations

import jax.numpy as jnp


def expect(name: str, arr, shape: tuple[int, ...], dtype) -> None:
    """Raises a ValueError (shape) or TypeError (dtype) that names the operand."""
    if tuple(arr.shape) != tuple(shape):
        raise ValueError(f"{name} has shape {tuple(arr.shape)}, expected {tuple(shape)}")
    if arr.dtype != jnp.dtype(dtype):
        raise TypeError(f"{name} has dtype {arr.dtype}, expected {jnp.dtype(dtype).name}")
