"""The fused layer's XLA FFI call (handler: ``ffi/mega_moe.cc``); ``fp8_mega_moe`` checks the
operands and picks this or the reference path."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from . import _ffi


def fused_mega_moe(
    x, x_scale, topk_ids, topk_weights, weights, *, buffer_id, clamp, axis_name, expected_rank=None
):
    """``y`` [M, H] bf16 from the fused kernels, on the workspace ``buffer_id``.

    The call passes its index along ``axis_name`` (0 without an axis) as the expected rank: the
    kernels compare it with the rank the workspace was created for and abort the call on every
    rank if any differs (a buffer made for another device order; docs/design.md §3.2).
    ``expected_rank`` overrides that index, for tests of this check only."""
    _ffi.register_targets()
    if expected_rank is None:
        expected_rank = 0 if axis_name is None else jax.lax.axis_index(axis_name)
    # The call exchanges data with peer ranks through the workspace: XLA must never dedupe or
    # drop it (has_side_effect), and JAX's fast dispatch path must stay open (no JAX effect).
    call = _ffi.kept_call(
        _ffi.extension().FP8_MEGA_MOE_TARGET, jax.ShapeDtypeStruct(x.shape, jnp.bfloat16)
    )
    return _ffi.call_varying(
        call,
        x,
        x_scale,
        topk_ids,
        topk_weights,
        *weights,
        jnp.asarray(expected_rank, jnp.int32),
        axes=() if axis_name is None else (axis_name,),
        buffer_id=np.int64(buffer_id),
        activation_clamp=np.float32(np.inf if clamp is None else clamp),
    )
