"""The expert-weight pytree shared by the fused kernels and the reference path."""

from __future__ import annotations

from typing import NamedTuple

import jax

from . import checks


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


def transform_weights(
    w1: jax.Array, w1_scale: jax.Array, w2: jax.Array, w2_scale: jax.Array
) -> MoEWeights:
    """Packs FP8 expert weights for ``fp8_mega_moe``.

    The fused L1 kernel reads the gate and up rows of one output column together (two weight
    tiles per CTA), so no re-layout is needed: the pytree holds the weights as given, which keeps
    them shardable with ``P(axis)`` and readable by the reference path.
    """
    leaves = (w1, w1_scale, w2, w2_scale)
    weights = MoEWeights(*map(checks.check_array, MoEWeights._fields, leaves))
    checks.check_weights(weights)
    return weights


# jax.export writes a program's pytree into its serialized form by name; without this,
# exporting a program that takes or returns MoEWeights fails. The name is part of the
# serialization format: keep it when the class moves.
jax.export.register_namedtuple_serialization(MoEWeights, serialized_name="jax_megamoe.MoEWeights")
