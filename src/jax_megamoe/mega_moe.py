"""The fused layer's XLA FFI call (handler: ``ffi/mega_moe.cc``); ``fp8_mega_moe`` checks the
operands and picks this or the reference path."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from . import _ffi


def fused_mega_moe(x, x_scale, topk_ids, topk_weights, weights, *, buffer_id, clamp):
    """``y`` [M, H] bf16 from the fused kernels, on the workspace ``buffer_id``."""
    _ffi.register_targets()
    call = jax.ffi.ffi_call(
        _ffi.extension().FP8_MEGA_MOE_TARGET,
        jax.ShapeDtypeStruct(x.shape, jnp.bfloat16),
        # The call exchanges data with peer ranks through the workspace: never dedupe or drop it.
        has_side_effect=True,
    )
    return call(
        x,
        x_scale,
        topk_ids,
        topk_weights,
        *weights,
        buffer_id=np.int64(buffer_id),
        activation_clamp=np.float32(np.inf if clamp is None else clamp),
    )
