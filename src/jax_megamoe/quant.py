"""FP8 (e4m3) quantization with the numerics of docs/design.md §2.

Activations are scaled per token per 128 channels (1x128, the DeepEP convention), weights per
128x128 block. For a block with absolute maximum `amax`:
``s = max(amax, 1e-4) / 448`` and ``q = e4m3(clip(v / s, -448, 448))`` (round to nearest even).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from .checks import check_divisible, check_real
from .constants import QUANT_BLOCK

FP8_MAX = 448.0
SCALE_FLOOR = 1e-4
FP8_DTYPE = jnp.float8_e4m3fn


def _true_divide(num: jax.Array, den: jax.Array) -> jax.Array:
    """IEEE division as the formula states. XLA rewrites ``x / broadcast(d)`` into
    ``x * broadcast(1 / d)``, which is one ulp off for some inputs; an opaque full-shape divisor
    keeps the division (the CUDA kernels divide too). The divisor takes ``num``'s full shape
    through a select rather than a broadcast: under ``jax.vmap`` a broadcast of an unbatched
    ``den`` would gain its batch dimension outside the barrier, where XLA sees it again."""
    full = jnp.where(True, den, num)  # den's values in num's shape, batch dimensions included
    return num / jax.lax.optimization_barrier(full)


def _amax(blocks: jax.Array, axis) -> jax.Array:
    """The largest magnitude of each block, NaN where the block holds a NaN (the formula's
    max): XLA:CPU's max over 4096 or more values can skip a NaN (JAX 0.10.2), which turned a
    weight block's scale into the floor and saturated the block's other values."""
    mag = jnp.abs(blocks)
    has_nan = jnp.any(jnp.isnan(mag), axis=axis, keepdims=True)
    return jnp.where(has_nan, jnp.nan, jnp.max(mag, axis=axis, keepdims=True))


def _quantize_blocks(v: jax.Array, amax: jax.Array) -> tuple[jax.Array, jax.Array]:
    scale = _true_divide(jnp.maximum(amax, SCALE_FLOOR), jnp.float32(FP8_MAX))
    q = jnp.clip(_true_divide(v, scale), -FP8_MAX, FP8_MAX).astype(FP8_DTYPE)
    return q, scale


def quantize_per_token(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Quantizes ``x[..., H]`` per token per 128 channels.

    Returns ``(q, scale)``: ``q`` float8_e4m3fn of ``x``'s shape, ``scale`` float32
    ``[..., H / 128]``.
    """
    x = jnp.asarray(x)
    check_real("quantize_per_token: x", x)
    if x.ndim < 1:
        raise ValueError("quantize_per_token: x must have at least one dimension")
    check_divisible("quantize_per_token", x.shape, (x.ndim - 1,))
    blocks = x.astype(jnp.float32).reshape(*x.shape[:-1], x.shape[-1] // QUANT_BLOCK, QUANT_BLOCK)
    q, scale = _quantize_blocks(blocks, _amax(blocks, -1))
    return q.reshape(x.shape), scale[..., 0]


def quantize_blockwise(w: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Quantizes ``w[..., N, K]`` per 128x128 block.

    Returns ``(q, scale)``: ``q`` float8_e4m3fn of ``w``'s shape, ``scale`` float32
    ``[..., N / 128, K / 128]``.
    """
    w = jnp.asarray(w)
    check_real("quantize_blockwise: w", w)
    if w.ndim < 2:
        raise ValueError("quantize_blockwise: w must have at least two dimensions")
    check_divisible("quantize_blockwise", w.shape, (w.ndim - 2, w.ndim - 1))
    *lead, n, k = w.shape
    b = QUANT_BLOCK
    blocks = w.astype(jnp.float32).reshape(*lead, n // b, b, k // b, b)
    q, scale = _quantize_blocks(blocks, _amax(blocks, (-3, -1)))
    return q.reshape(w.shape), scale[..., 0, :, 0]


def dequantize(q: jax.Array, scale: jax.Array) -> jax.Array:
    """Float32 values of ``q`` under ``scale``; the block shape is read off the two shapes.

    Works for per-token (``[..., M, H]`` with ``[..., M, H/128]``) and blockwise
    (``[..., N, K]`` with ``[..., N/128, K/128]``) scales.
    """
    q = jnp.asarray(q)
    check_real("dequantize: q", q)
    scale = jnp.asarray(scale)
    check_real("dequantize: scale", scale)
    scale = scale.astype(jnp.float32)
    if q.ndim != scale.ndim or q.ndim < 1:
        raise ValueError(f"dequantize: q {q.shape} and scale {scale.shape} need the same rank")
    # Block size per dimension; an empty dimension (q's and scale's both) has blocks of one.
    blocks = [a // b if b else 1 for a, b in zip(q.shape[-2:], scale.shape[-2:], strict=True)]
    if q.shape[:-2] != scale.shape[:-2] or any(
        (b == 0) != (a == 0) or (b and a % b)
        for a, b in zip(q.shape[-2:], scale.shape[-2:], strict=True)
    ):
        raise ValueError(f"dequantize: scale {scale.shape} does not tile q {q.shape}")
    # With excess precision allowed (XLA:GPU's default), XLA folds convert(convert(v, e4m3),
    # f32) into v, silently skipping the FP8 rounding of a quantize-dequantize round trip; the
    # barrier keeps q a real e4m3 value.
    q = jax.lax.optimization_barrier(q)
    s = jnp.repeat(scale, blocks[-1], axis=-1)
    if q.ndim >= 2:
        s = jnp.repeat(s, blocks[0], axis=-2)
    return q.astype(jnp.float32) * s


def calc_diff(a, b) -> float:
    """``1 - 2·Σab / Σ(a² + b²)`` in float64 (0 for identical inputs, 1 for orthogonal, 2 for
    opposite; 0 when both are all zero). NaN when either holds a NaN or an infinity, so that a
    bound ``calc_diff(a, b) <= tol`` fails. Computed on the inputs scaled by their largest
    magnitude, so that neither tiny nor huge values underflow or overflow the sums. A host
    function: it takes concrete arrays, not values traced under ``jax.jit``."""
    a, b = _host_f64("calc_diff", a, b)
    if a.shape != b.shape:
        raise ValueError(f"calc_diff: shapes differ, {a.shape} vs {b.shape}")
    return float(row_calc_diff(a.reshape(1, -1), b.reshape(1, -1))[0])


def row_calc_diff(a, b) -> np.ndarray:
    """:func:`calc_diff` of each row of two ``[rows, cols]`` arrays, each row scaled by its own
    largest magnitude (0 for a row all zero in both, NaN for one with a NaN or an infinity:
    the largest magnitude is then NaN or infinite, and so is the row's sum)."""
    a, b = _host_f64("row_calc_diff", a, b)
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"row_calc_diff: shapes {a.shape} and {b.shape} must be one [rows, cols]")
    scale = np.maximum(np.abs(a).max(axis=1, initial=0.0), np.abs(b).max(axis=1, initial=0.0))
    scale = np.where(scale > 0, scale, 1.0)[:, None]
    with np.errstate(invalid="ignore", divide="ignore"):
        a, b = a / scale, b / scale
        den = np.sum(a * a + b * b, axis=1)
        diff = 1.0 - 2.0 * np.sum(a * b, axis=1) / den
    return np.where(den == 0, 0.0, diff)


def _host_f64(op: str, *arrays) -> list[np.ndarray]:
    """``arrays`` fetched to the host as float64; a traced or complex one is refused by name."""
    out = []
    for name, v in zip("ab", arrays, strict=True):
        if isinstance(v, jax.core.Tracer):
            raise TypeError(
                f"{op} runs on the host in float64, but {name} is traced ({jax.typeof(v)}): "
                "call it outside jax.jit, on the computed arrays"
            )
        v = np.asarray(jax.device_get(v))
        check_real(f"{op}: {name}", v)
        out.append(v.astype(np.float64, copy=False))  # calc_diff passes row_calc_diff f64
    return out
