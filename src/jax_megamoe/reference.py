"""Pure-JAX MegaMoE: the implementation on CPU and non-Hopper backends, and the test oracle.

It follows docs/design.md §2 formula by formula. Slots are grouped by expert into row blocks of
``block_rows`` (like the fused kernel's pools), so the work is proportional to the routed slots,
never to ``M x E``. Expert parallelism uses collectives that run on every backend: the tokens of
all ranks are all-gathered, each rank computes the slots routed to its experts, and a
``psum_scatter`` returns every slot's result to the token's rank. Each slot is non-zero on exactly
one rank, so that sum is exact and the output equals the single-device output bit for bit.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import export, lax

from . import checks
from .pool import pool_layout
from .quant import dequantize, quantize_per_token
from .weights import MoEWeights

_HIGHEST = lax.Precision.HIGHEST


def sanitize_topk_ids(topk_ids: jax.Array, num_experts: int) -> jax.Array:
    """Expert ids outside ``[0, num_experts)`` are masked (-1), as in the fused kernels."""
    valid = (topk_ids >= 0) & (topk_ids < num_experts)
    return jnp.where(valid, topk_ids, -1).astype(jnp.int32)


def _swiglu(h: jax.Array, clamp: float | None) -> jax.Array:
    gate, up = jnp.split(h, 2, axis=-1)
    if clamp is not None:
        gate = jnp.minimum(gate, clamp)
        up = jnp.clip(up, -clamp, clamp)
    return gate * jax.nn.sigmoid(gate) * up


def expert_slot_outputs(
    x: jax.Array,
    topk_ids: jax.Array,
    topk_weights: jax.Array,
    weights: MoEWeights,
    *,
    first_expert: jax.Array | int,
    activation_clamp: float | None,
    requant: bool,
    block_rows: int,
) -> jax.Array:
    """``o[n, k]`` (f32, ``[N, K, H]``) of every slot routed to experts
    ``[first_expert, first_expert + E_l)``; zero for every other slot.

    ``x`` is the dequantized f32 activation ``[N, H]``; ``topk_ids`` must be sanitized.
    """
    n, k = topk_ids.shape
    num_local = weights.num_local_experts
    hidden = x.shape[1]
    num_slots = n * k
    t = block_rows

    local = topk_ids.reshape(num_slots) - first_expert
    valid = (topk_ids.reshape(num_slots) >= 0) & (local >= 0) & (local < num_local)
    key = jnp.where(valid, local, num_local)
    order = jnp.argsort(key, stable=True).astype(jnp.int32)  # int64 under jax_enable_x64
    sorted_key = key[order]
    counts = jnp.zeros(num_local + 1, jnp.int32).at[key].add(1)[:num_local]
    start = jnp.cumsum(counts, dtype=jnp.int32) - counts

    # At most cdiv(slots, t) full blocks plus one partial block per non-empty expert. With a
    # symbolic M (jax.export) the smaller of the two is not known: E_l bounds it.
    partial = num_local if export.is_symbolic_dim(num_slots) else min(num_local, num_slots)
    num_blocks = -(-num_slots // t) + partial
    layout = pool_layout(counts, num_blocks * t, block_m=t, align_m=t)
    group = jnp.minimum(sorted_key, num_local - 1)
    row = layout.starts[group] + jnp.arange(num_slots, dtype=jnp.int32) - start[group]
    row = jnp.where(sorted_key < num_local, row, num_blocks * t)
    table = jnp.full(num_blocks * t, -1, jnp.int32).at[row].set(order, mode="drop")
    block_expert = layout.block_expert

    slot_weight = topk_weights.reshape(num_slots).astype(jnp.float32)
    clamp = activation_clamp

    def one_block(args):
        expert, rows = args
        present = rows >= 0
        tokens = jnp.where(present, rows // k, 0)
        xb = x[tokens]

        def compute():
            e = jnp.maximum(expert, 0)
            w1 = dequantize(weights.w1[e], weights.w1_scale[e])
            w2 = dequantize(weights.w2[e], weights.w2_scale[e])
            h = jnp.dot(xb, w1.T, precision=_HIGHEST)
            a = (
                _swiglu(h, clamp)
                * jnp.where(present, slot_weight[jnp.maximum(rows, 0)], 0.0)[:, None]
            )
            if requant:
                a = dequantize(*quantize_per_token(a))
            return jnp.dot(a, w2.T, precision=_HIGHEST)

        return lax.cond(expert >= 0, compute, lambda: jnp.zeros_like(xb))

    outs = lax.map(one_block, (block_expert, table.reshape(num_blocks, t)))
    dest = jnp.where(table >= 0, table, num_slots)
    o = (
        jnp.zeros((num_slots, hidden), jnp.float32)
        .at[dest]
        .set(outs.reshape(num_blocks * t, hidden), mode="drop")
    )
    return o.reshape(n, k, hidden)


def sum_slots(o: jax.Array) -> jax.Array:
    """``bf16(Σ_k o[:, k])`` summed in f32 in the fixed order k = 0, 1, ..., K-1."""
    acc = o[:, 0]
    for j in range(1, o.shape[1]):
        acc = acc + o[:, j]
    return acc.astype(jnp.bfloat16)


def reference_mega_moe(
    x: jax.Array,
    x_scale: jax.Array,
    topk_ids: jax.Array,
    topk_weights: jax.Array,
    weights: MoEWeights,
    *,
    axis_name: str | None = None,
    activation_clamp: float | None = None,
    requant: bool = True,
    block_rows: int = 16,
) -> jax.Array:
    """The MoE of docs/design.md §2 in pure JAX, with ``fp8_mega_moe``'s operands, arguments
    and trace-time checks: what ``fp8_mega_moe(impl="reference")`` runs. ``requant=False`` gives
    the ideal f32 MoE (no intermediate FP8 round trip); the slots are grouped by expert into
    blocks of ``block_rows`` rows."""
    op = "reference_mega_moe"
    call = checks.check_moe_call(
        op,
        x,
        x_scale,
        topk_ids,
        topk_weights,
        weights,
        axis_name=axis_name,
        activation_clamp=activation_clamp,
    )
    if not isinstance(requant, bool | np.bool_):
        raise TypeError(f"{op}: requant must be a bool, got {requant!r}")
    block_rows = checks.check_int(f"{op}: block_rows", block_rows, minimum=1)
    return mirror_mega_moe(
        *call[:5],
        axis_name=axis_name,
        activation_clamp=call.clamp,
        requant=bool(requant),
        block_rows=block_rows,
    )


# Jitted with its configuration static, so that eager calls (scripts, notebooks, tests) hit JAX's
# cache: unjitted, each call traced and compiled its lax.map body anew (~0.25 s on a CPU).
@functools.partial(
    jax.jit, static_argnames=("axis_name", "activation_clamp", "requant", "block_rows")
)
def mirror_mega_moe(
    x: jax.Array,
    x_scale: jax.Array,
    topk_ids: jax.Array,
    topk_weights: jax.Array,
    weights: MoEWeights,
    *,
    axis_name: str | None = None,
    activation_clamp: float | None = None,
    requant: bool = True,
    block_rows: int = 16,
) -> jax.Array:
    """:func:`reference_mega_moe` without its checks, for callers that ran them
    (``checks.check_moe_call``: ``fp8_mega_moe``)."""
    num_local = weights.num_local_experts
    num_ranks = 1 if axis_name is None else lax.axis_size(axis_name)
    ids = sanitize_topk_ids(topk_ids, num_local * num_ranks)
    kwargs = dict(activation_clamp=activation_clamp, requant=requant, block_rows=block_rows)
    if axis_name is None:
        xf = dequantize(x, x_scale)
        o = expert_slot_outputs(xf, ids, topk_weights, weights, first_expert=0, **kwargs)
        return sum_slots(o)

    def gather(v):
        return lax.all_gather(v, axis_name, axis=0, tiled=True)

    # fp8 travels as raw bytes: not every backend's collectives take float8 operands.
    x_bytes = gather(lax.bitcast_convert_type(x, jnp.uint8))
    xf = dequantize(lax.bitcast_convert_type(x_bytes, x.dtype), gather(x_scale))
    first = lax.axis_index(axis_name) * num_local
    o = expert_slot_outputs(
        xf, gather(ids), gather(topk_weights), weights, first_expert=first, **kwargs
    )
    mine = lax.psum_scatter(o, axis_name, scatter_dimension=0, tiled=True)
    return sum_slots(mine)


def numpy_mega_moe_f64(x, x_scale, topk_ids, topk_weights, weights):
    """A float64 NumPy oracle of the whole layer (all experts on one host), for the CLI.

    Experts are dequantized one at a time, so the memory it needs is the FP8 weights on the host
    plus one expert in float64 (``f64_oracle_nbytes``), not every expert in float64."""
    f64 = np.float64

    def deq(q, s):
        q = np.asarray(q).astype(f64)
        s = np.asarray(s, f64)
        r, c = q.shape[-2] // s.shape[-2], q.shape[-1] // s.shape[-1]
        return q * np.repeat(np.repeat(s, r, axis=-2), c, axis=-1)

    xf = deq(x, x_scale)
    ids = np.asarray(topk_ids)
    tw = np.asarray(topk_weights, f64)
    w1q, w1s, w2q, w2s = (np.asarray(leaf) for leaf in weights)
    num_experts, inter = w1q.shape[0], w2q.shape[2]
    y = np.zeros(xf.shape, f64)
    for e in range(num_experts):
        tok, slot = np.nonzero(ids == e)
        if tok.size == 0:
            continue
        h = xf[tok] @ deq(w1q[e], w1s[e]).T
        g, u = h[:, :inter], h[:, inter:]
        a = g / (1.0 + np.exp(-g)) * u * tw[tok, slot][:, None]
        blocks = a.reshape(a.shape[0], -1, 128)
        s = np.maximum(np.abs(blocks).max(-1, keepdims=True), 1e-4) / 448.0
        q = np.clip(blocks / s, -448, 448).astype(np.float32).astype(jnp.float8_e4m3fn)
        a = (q.astype(f64) * s).reshape(a.shape)
        np.add.at(y, tok, a @ deq(w2q[e], w2s[e]).T)
    return y


def f64_oracle_nbytes(tokens: int, hidden: int, intermediate: int, experts: int) -> int:
    """An upper bound of the host memory ``numpy_mega_moe_f64`` needs for these shapes: the FP8
    weights and their scales, float64 tokens and output with their temporaries, and one expert's
    weights in float64 while they are dequantized (about three float64 copies at once)."""
    fp8_weights = 3 * experts * hidden * intermediate * (1 + 4 / 128**2)
    f64_tokens = 8 * tokens * (4 * hidden + 4 * intermediate)
    f64_expert = 8 * 3 * (3 * hidden * intermediate)
    return int(fp8_weights + f64_tokens + f64_expert)
