"""The fused layer's two grouped GEMMs on their own, as XLA FFI calls (handlers:
``ffi/grouped_gemm.cc``): for GEMM-level tests and benchmarks. The pool they read is laid out
by :func:`jax_megamoe.pool.pool_layout`."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from . import _ffi
from .checks import check_index_mode, check_l1_operands, check_l2_operands, check_num_ctas
from .constants import QUANT_BLOCK

__all__ = ["grouped_gemm_l1", "grouped_gemm_l2", "prepare_standalone"]


# Device scratch of both kernels: the counter their CTAs claim tiles from (zeroed by the handler).
_CLAIMS_SCRATCH = jax.ShapeDtypeStruct((1,), jnp.int32)


@functools.cache
def prepare_standalone() -> None:
    """Loads the grouped GEMM kernels on every local Hopper GPU, once per process.

    The FFI handlers never load modules themselves (see ``launch.h``), so this must run before
    the first call executes; the ``grouped_gemm_*`` wrappers call it at trace time. A process
    without a Hopper GPU gets a RuntimeError here, at trace time: the kernels have no other
    target, and XLA would otherwise fail only when the call runs, naming a missing handler.
    """
    c = _ffi.extension()
    try:
        gpus = [d for d in jax.local_devices(backend="gpu") if _ffi.is_sm90(d)]
    except RuntimeError:  # no GPU backend
        gpus = []
    if not gpus:
        raise RuntimeError(
            "grouped_gemm_l1 and grouped_gemm_l2 run only on a Hopper (SM90) GPU, and this "
            f"process has none (its devices: {sorted({d.device_kind for d in jax.devices()})}). "
            "The whole layer runs anywhere through fp8_mega_moe (its reference path)"
        )
    for d in gpus:
        c.prepare_standalone(d.local_hardware_id)


def _num_blocks_operand(num_blocks) -> jax.Array:
    return jnp.reshape(jnp.asarray(num_blocks, jnp.int32), (1,))


def in_range_or_skip(index: jax.Array, bound: int, mode: str) -> jax.Array:
    """``index`` with every value outside ``[0, bound)`` made -1, which the kernels skip; as it
    is under ``mode="promise_in_bounds"``. The kernels test only the sign: a ``block_expert`` at
    or past E would read past the weights and their scales, and an L2 ``row_src`` at or past
    ``out_rows`` would make the store warp read a pointer past its one-entry table."""
    if mode == "promise_in_bounds":
        return index
    return jnp.where((index >= 0) & (index < bound), index, -1)


def grouped_gemm_l1(
    a,
    a_scale,
    row_weight,
    row_src,
    block_expert,
    num_blocks,
    w1,
    w1_scale,
    *,
    activation_clamp: float | None = None,
    num_ctas: int = 0,
    mode: str = "drop",
):
    """The fused layer's first grouped GEMM alone (CUDA target ``_C.L1_GEMM_TARGET``).

    For each pool row ``r`` of a valid row block ``b = r // 64`` (``b < num_blocks`` and
    ``0 <= e = block_expert[b] < E``) whose ``row_src[r] >= 0``::

        h = dequant(a[r]) @ dequant(w1[e]).T                     # [2I], f32 accumulation
        v = swiglu(h[:I], h[I:], clamp) * row_weight[r]          # silu(gate) * up
        act[r], act_scale[r] = quantize_per_token(v)             # 1x128 e4m3

    Args:
      a: ``[P, H]`` float8_e4m3fn pool rows, ``P`` a multiple of 64; each expert's rows start
        on a 64-row block (see :func:`pool_layout`).
      a_scale: ``[P, H/128]`` float32 per-row, per-128-channel scales.
      row_weight: ``[P]`` float32 routing weight of each row.
      row_src: ``[P]`` int32; ``-1`` marks a padding row (never stored), any value ``>= 0`` a
        real row (L1 stores it at the same pool row).
      block_expert: ``[P/64]`` int32 local expert of each row block, in ``[0, E)``; a block
        with any other value is skipped (see ``mode``).
      num_blocks: int32 scalar or ``[1]``: blocks at or past it are skipped.
      w1: ``[E, 2I, H]`` float8_e4m3fn (gate rows, then up rows); ``w1_scale``
        ``[E, 2I/128, H/128]`` float32.
      activation_clamp: ``None`` or a float: gate is clamped from above, up to ``±clamp``.
      num_ctas: persistent grid size, at most ``MAX_GEMM_CTAS``; 0 = every SM of the device.
      mode: ``"drop"`` (default) skips the blocks whose expert is out of range, with one
        elementwise op before the kernel; ``"promise_in_bounds"`` leaves that op out: the caller
        promises every ``block_expert`` of a block before ``num_blocks`` is below E (as
        :func:`pool_layout`'s are), and a value at or past E reads past ``w1`` and its scales.

    Returns:
      ``(act, act_scale)``: ``[P, I]`` float8_e4m3fn and ``[P, I/128]`` float32. Rows that were
      not stored (padding rows, skipped blocks) hold unspecified values.
    """
    check_l1_operands(a, a_scale, row_weight, row_src, block_expert, w1, w1_scale)
    num_ctas = check_num_ctas("grouped_gemm_l1", num_ctas)
    mode = check_index_mode("grouped_gemm_l1", mode)
    rows, inter = a.shape[0], w1.shape[1] // 2
    block_expert = in_range_or_skip(block_expert, w1.shape[0], mode)
    prepare_standalone()
    _ffi.register_targets()
    call = jax.ffi.ffi_call(
        _ffi.extension().L1_GEMM_TARGET,
        (
            jax.ShapeDtypeStruct((rows, inter), jnp.float8_e4m3fn),
            jax.ShapeDtypeStruct((rows, inter // QUANT_BLOCK), jnp.float32),
            _CLAIMS_SCRATCH,
        ),
    )
    act, act_scale, _ = _ffi.call_varying(
        call,
        a,
        a_scale,
        row_weight,
        row_src,
        block_expert,
        _num_blocks_operand(num_blocks),
        w1,
        w1_scale,
        activation_clamp=np.float32(np.inf if activation_clamp is None else activation_clamp),
        num_ctas=np.int64(num_ctas),
    )
    return act, act_scale


def grouped_gemm_l2(
    act,
    act_scale,
    row_src,
    block_expert,
    num_blocks,
    w2,
    w2_scale,
    *,
    out_rows: int | None = None,
    num_ctas: int = 0,
    mode: str = "drop",
):
    """The fused layer's second grouped GEMM alone (CUDA target ``_C.L2_GEMM_TARGET``).

    For each pool row ``r`` of a valid row block (as in :func:`grouped_gemm_l1`) whose
    ``0 <= row_src[r] < out_rows``: ``y[row_src[r]] = bf16(dequant(act[r]) @ dequant(w2[e]).T)``.

    Args:
      act: ``[P, I]`` float8_e4m3fn, ``act_scale`` ``[P, I/128]`` float32.
      row_src: ``[P]`` int32 destination row of each pool row in ``y``, in ``[0, out_rows)``;
        a row with any other value (``-1`` on padding) is not stored (see ``mode``).
        ``arange(P)`` with ``-1`` on padding keeps pool order. Two rows with the same
        destination race.
      block_expert, num_blocks: as in :func:`grouped_gemm_l1`.
      w2: ``[E, H, I]`` float8_e4m3fn; ``w2_scale`` ``[E, H/128, I/128]`` float32.
      out_rows: rows of ``y`` (default ``P``).
      num_ctas: persistent grid size, at most ``MAX_GEMM_CTAS``; 0 = every SM of the device.
      mode: as in :func:`grouped_gemm_l1`, for ``block_expert`` and ``row_src``: with
        ``"promise_in_bounds"`` the caller also promises every ``row_src`` of a stored block is
        below ``out_rows`` or negative; a value at or past it stores through an unrelated
        address.

    Returns:
      ``y`` ``[out_rows, H]`` bfloat16. Rows no pool row names hold unspecified values.
    """
    rows, hidden = act.shape[0], w2.shape[1]
    out_rows = rows if out_rows is None else int(out_rows)
    check_l2_operands(act, act_scale, row_src, block_expert, w2, w2_scale, out_rows)
    num_ctas = check_num_ctas("grouped_gemm_l2", num_ctas)
    mode = check_index_mode("grouped_gemm_l2", mode)
    block_expert = in_range_or_skip(block_expert, w2.shape[0], mode)
    row_src = in_range_or_skip(row_src, out_rows, mode)
    prepare_standalone()
    _ffi.register_targets()
    call = jax.ffi.ffi_call(
        _ffi.extension().L2_GEMM_TARGET,
        (
            jax.ShapeDtypeStruct((out_rows, hidden), jnp.bfloat16),
            # Device scratch: the kernel's one-entry table of combine bases (y's address).
            jax.ShapeDtypeStruct((1,), jnp.int64),
            _CLAIMS_SCRATCH,
        ),
    )
    y, _, _ = _ffi.call_varying(
        call,
        act,
        act_scale,
        row_src,
        block_expert,
        _num_blocks_operand(num_blocks),
        w2,
        w2_scale,
        num_ctas=np.int64(num_ctas),
    )
    return y
