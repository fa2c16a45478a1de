"""``fp8_mega_moe``: validates at trace time and picks the implementation."""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp

from . import _ffi, checks
from .mega_moe import fused_mega_moe
from .reference import reference_mega_moe
from .symm_buffer import SymmBuffer
from .weights import MoEWeights

Impl = Literal["auto", "fused", "reference"]
IMPLS = ("auto", "fused", "reference")
OPERANDS = ("x", "x_scale", "topk_ids", "topk_weights")


def _pick_impl(impl: str, buffer: SymmBuffer | None) -> str:
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "reference":
        return impl
    if buffer is not None and buffer.closed:
        raise ValueError(
            f"buffer {buffer.buffer_id} was closed: create a new SymmBuffer, or pass "
            "impl='reference' to run without one"
        )
    if impl == "auto":
        return "fused" if buffer is not None and buffer.allocated else "reference"
    _ffi.extension()  # raises with the reason when the extension is missing
    if buffer is None:
        raise ValueError(
            "impl='fused' needs buffer=SymmBuffer.create(mesh, axis_name, ...) (the workspace)"
        )
    if not buffer.allocated:
        raise ValueError(
            "impl='fused' needs Hopper (SM90) GPUs; this buffer's devices cannot run the fused "
            "kernels"
        )
    return "fused"


def fp8_mega_moe(
    x: jax.Array,
    x_scale: jax.Array,
    topk_ids: jax.Array,
    topk_weights: jax.Array,
    weights: MoEWeights,
    *,
    buffer: SymmBuffer | None = None,
    axis_name: str | None = None,
    activation_clamp: float | None = None,
    impl: Impl = "auto",
) -> jax.Array:
    """Expert-parallel FP8 MoE for this rank's tokens; returns ``y`` [M, H] bfloat16.

    Call it per rank inside ``shard_map`` over the expert axis ``axis_name`` (size R), or on one
    device with ``axis_name=None``. ``topk_ids`` are global expert ids; ``-1`` and any id outside
    ``[0, E)`` mark a masked slot, which adds nothing. Inference only: differentiating raises.

    Semantics beyond the formula (tested in ``tests/test_semantics.py``):

    * Duplicate expert ids in one row are not merged: each slot adds its own contribution
      (with its own routing weight), exactly as if the slots named different experts.
    * A NaN or Inf in one token's ``x_scale`` or ``topk_weights`` stays in that token's row
      of ``y``; every other row is bitwise the same as without it.

    Operands must be arrays (JAX or NumPy); Python lists are refused, as ``jax.numpy`` does.
    Inside ``shard_map`` over a mesh axis of size > 1, ``axis_name`` is required, the weights
    must be sharded over it (``P(axis_name)``), and a ``buffer`` must have been created for the
    same devices in the same order: checked at trace time where the trace shows the concrete
    mesh (under ``jax.sharding.set_mesh``), else on the device, where a mismatch aborts the call
    on every rank with NaN output and ``buffer.check()`` (or the next call) raises. The axis
    sizes are always checked. A closed buffer raises.
    """
    operands = (x, x_scale, topk_ids, topk_weights)
    x, x_scale, topk_ids, topk_weights = (
        jnp.asarray(checks.check_array(name, v)) for name, v in zip(OPERANDS, operands, strict=True)
    )
    m, h, i, k, num_local = checks.check_moe_operands(x, x_scale, topk_ids, topk_weights, weights)
    weights = jax.tree.map(jnp.asarray, weights)  # NumPy leaves too (the operands' rule)
    checks.check_not_explicitly_sharded(
        "fp8_mega_moe",
        dict(zip(OPERANDS, (x, x_scale, topk_ids, topk_weights), strict=True))
        | dict(zip(weights._fields, weights, strict=True)),
    )
    num_ranks = checks.axis_size(axis_name, "fp8_mega_moe", weights)
    checks.check_weights_vary(
        weights, x, axis_name=axis_name, num_ranks=num_ranks, op="fp8_mega_moe"
    )
    num_experts = num_local * num_ranks
    checks.check_moe_dims(
        num_experts=num_experts, hidden=h, intermediate=i, topk=k, num_ranks=num_ranks
    )
    clamp = checks.check_clamp(activation_clamp)
    if buffer is not None:
        if not isinstance(buffer, SymmBuffer):
            raise TypeError(
                "buffer must be a SymmBuffer (SymmBuffer.create) or None, got "
                f"{type(buffer).__name__}"
            )
        checks.check_buffer(
            buffer,
            m=m,
            h=h,
            i=i,
            k=k,
            num_local=num_local,
            num_ranks=num_ranks,
            axis_name=axis_name,
        )
    chosen = _pick_impl(impl, buffer)

    if chosen == "fused":
        buffer.traced = True  # close() must then drop the programs that hold its address

        def run(x, x_scale, topk_ids, topk_weights, weights):
            return fused_mega_moe(
                x,
                x_scale,
                topk_ids,
                topk_weights,
                weights,
                buffer_id=buffer.buffer_id,
                clamp=clamp,
                axis_name=axis_name,
            )
    else:

        def run(x, x_scale, topk_ids, topk_weights, weights):
            return reference_mega_moe(
                x,
                x_scale,
                topk_ids,
                topk_weights,
                weights,
                axis_name=axis_name,
                activation_clamp=clamp,
            )

    return _inference_only(run)(x, x_scale, topk_ids, topk_weights, weights)


def _inference_only(fn):
    """Wraps ``fn`` so that ``jax.grad``/``jax.jvp`` through it fail at trace time."""
    wrapped = jax.custom_jvp(fn)

    @wrapped.defjvp
    def _no_jvp(primals, tangents):
        raise NotImplementedError(
            "fp8_mega_moe is inference-only: it has no gradient (differentiate a bf16 MoE "
            "for training)"
        )

    return wrapped
