"""``fp8_mega_moe``: validates at trace time and picks the implementation."""

from __future__ import annotations

from typing import Literal

import jax

from . import _ffi, checks
from .mega_moe import fused_mega_moe
from .reference import mirror_mega_moe
from .symm_buffer import SymmBuffer
from .weights import MoEWeights

Impl = Literal["auto", "fused", "reference"]
IMPLS = ("auto", "fused", "reference")


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
    call = checks.check_moe_call(
        "fp8_mega_moe",
        x,
        x_scale,
        topk_ids,
        topk_weights,
        weights,
        axis_name=axis_name,
        activation_clamp=activation_clamp,
    )
    clamp = call.clamp
    if buffer is not None:
        if not isinstance(buffer, SymmBuffer):
            raise TypeError(
                "buffer must be a SymmBuffer (SymmBuffer.create) or None, got "
                f"{type(buffer).__name__}"
            )
        checks.check_buffer(
            buffer,
            m=call.m,
            h=call.hidden,
            i=call.intermediate,
            k=call.topk,
            num_local=call.num_local,
            num_ranks=call.num_ranks,
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
            return mirror_mega_moe(
                x,
                x_scale,
                topk_ids,
                topk_weights,
                weights,
                axis_name=axis_name,
                activation_clamp=clamp,
            )

    return _inference_only(run)(*call[:5])


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
