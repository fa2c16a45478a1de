"""The expert-weight pytree shared by the fused kernels and the reference path."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from .checks import expect
from .quant import BLOCK, FP8_DTYPE


class MoEWeights(NamedTuple):
    """One rank's experts (the leading dimension of every leaf is the expert, so ``P(axis)``
    shards it over an expert-parallel mesh axis).

    ``w1`` [E_l, 2I, H] e4m3, rows 0..I-1 gate and I..2I-1 up; ``w1_scale`` [E_l, 2I/128, H/128]
    f32; ``w2`` [E_l, H, I] e4m3; ``w2_scale`` [E_l, H/128, I/128] f32.
    """

    w1: jax.Array
    w1_scale: jax.Array
    w2: jax.Array
    w2_scale: jax.Array

    @property
    def num_local_experts(self) -> int:
        return self.w1.shape[0]

    @property
    def hidden(self) -> int:
        return self.w1.shape[2]

    @property
    def intermediate(self) -> int:
        return self.w2.shape[2]


def check_weights(weights: MoEWeights) -> tuple[int, int, int]:
    """Validates shapes and dtypes; returns ``(num_local_experts, hidden, intermediate)``."""
    if not isinstance(weights, MoEWeights):
        raise TypeError(
            f"weights must be the MoEWeights made by transform_weights, got {type(weights)}"
        )
    w1, w1s, w2, w2s = weights
    if w1.ndim != 3 or w2.ndim != 3:
        raise ValueError(f"w1 {w1.shape} and w2 {w2.shape} must be [experts, rows, cols]")
    e, two_i, h = w1.shape
    if two_i % 2:
        raise ValueError(f"w1 {w1.shape}: dimension 1 must be 2*intermediate (gate then up)")
    i = two_i // 2
    if h % BLOCK or i % BLOCK:
        raise ValueError(
            f"hidden ({h}) and intermediate ({i}) must be multiples of {BLOCK} "
            "(the FP8 scale block)"
        )
    expected = {
        "w1": (w1, (e, 2 * i, h), FP8_DTYPE),
        "w1_scale": (w1s, (e, 2 * i // BLOCK, h // BLOCK), jnp.float32),
        "w2": (w2, (e, h, i), FP8_DTYPE),
        "w2_scale": (w2s, (e, h // BLOCK, i // BLOCK), jnp.float32),
    }
    for name, (arr, shape, dtype) in expected.items():
        expect(name, arr, shape, dtype)
    return e, h, i


def transform_weights(
    w1: jax.Array, w1_scale: jax.Array, w2: jax.Array, w2_scale: jax.Array
) -> MoEWeights:
    """Packs FP8 expert weights for ``fp8_mega_moe``.

    The fused L1 kernel reads the gate and up rows of one output column together (two weight
    tiles per CTA), so no re-layout is needed: the pytree holds the weights as given, which keeps
    them shardable with ``P(axis)`` and readable by the reference path.
    """
    weights = MoEWeights(w1, w1_scale, w2, w2_scale)
    check_weights(weights)
    return weights


# jax.export writes a program's pytree into its serialized form by name; without this,
# exporting a program that takes or returns MoEWeights fails. The name is part of the
# serialization format: keep it when the class moves.
jax.export.register_namedtuple_serialization(MoEWeights, serialized_name="jax_megamoe.MoEWeights")
