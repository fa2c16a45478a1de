"""JAX-native expert-parallel MoE baselines (docs/design.md §6), written per rank for ``shard_map``.

All take this rank's tokens ``x`` [M, H] bf16, ``topk_ids`` [M, K] (global ids), ``topk_weights``
[M, K] and this rank's experts ``w1`` [E_l, 2I, H], ``w2`` [E_l, H, I] (the layout of
``MoEWeights``: every GEMM contracts the weights' last dimension, so no transposed copy of the
weights is ever made), and return ``y`` [M, H] bf16.

- ``ragged_moe``: dispatch with ``lax.ragged_all_to_all`` (each slot's token sent to the rank
  owning its expert), grouped GEMMs by local expert, SwiGLU, the return trip with
  ``ragged_all_to_all`` and the weighted sum at home. The grouped GEMM is pluggable:
  ``xla_grouped_gemm`` (``lax.ragged_dot_general``) or ``pallas_grouped_gemm`` (JAX's Pallas
  Mosaic GPU ``ragged_dot`` from ``jax.experimental.pallas.ops.gpu.ragged_dot_mgpu``).
- ``dense_moe``: GShard-style capacity MoE: scatter slots into [E, C, H] (C = the most slots
  any (source rank, expert) pair gets, computed on host, so nothing is dropped),
  ``all_to_all``, dense batched einsums per expert, ``all_to_all`` back, gather and sum. With
  ``compute_dtype=float8_e4m3fn`` the einsums take e4m3 operands: activations with one
  per-tensor scale each, the FP8 weights as they are (their block scales are not applied), so
  that variant is a timing reference only, like the FP8 Pallas one.

Receive buffers and capacities are static shapes sized exactly from the routing on host: the
most favourable sizing a baseline can have (a real deployment would use a worst case).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

GroupedGemm = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]

# Tile config for the Pallas kernel (its own example sweeps these; 64-row tiles suit the few
# rows per expert of small M, 128x64 N/K tiles divide the DSV3 dims).
PALLAS_TILES = dict(block_m=64, block_n=128, block_k=64, max_concurrent_steps=4, grid_block_n=1)


def _swiglu(h: jax.Array) -> jax.Array:
    g, u = jnp.split(h.astype(jnp.float32), 2, axis=-1)
    return (g * jax.nn.sigmoid(g) * u).astype(jnp.bfloat16)


def xla_grouped_gemm(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """``out[r] = lhs[r] @ rhs[g(r)].T`` with rows grouped by ``group_sizes``: XLA's
    ragged dot, contracting the weights' last dimension (rhs [G, N, K])."""
    dims = lax.RaggedDotDimensionNumbers(
        dot_dimension_numbers=(([1], [2]), ([], [])),
        lhs_ragged_dimensions=[0],
        rhs_group_dimensions=[0],
    )
    return lax.ragged_dot_general(lhs, rhs, group_sizes, dims, preferred_element_type=lhs.dtype)


def pallas_grouped_gemm(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """The same product with the Pallas Mosaic GPU grouped GEMM (Hopper wgmma, TMA pipeline).
    Its output has the operands' dtype."""
    from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu

    params = inspect.signature(ragged_dot_mgpu.ragged_dot).parameters
    if "transpose_rhs" not in params:
        raise NotImplementedError(
            "this jax's ragged_dot_mgpu.ragged_dot takes rhs [G, K, N] only (no transpose_rhs)"
        )
    kwargs = {k: v for k, v in PALLAS_TILES.items() if k in params}
    return ragged_dot_mgpu.ragged_dot(
        lhs, rhs, group_sizes=group_sizes.astype(jnp.int32), transpose_rhs=True, **kwargs
    )


def pallas_available() -> str | None:
    """None when the Pallas Mosaic GPU grouped GEMM can be tried here, else why not."""
    if jax.devices()[0].platform != "gpu":
        return "needs a GPU (Mosaic GPU)"
    try:
        from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu  # noqa: F401
    except Exception as e:  # the Mosaic GPU plugin may be missing from the install
        return f"cannot import ragged_dot_mgpu: {e}"
    return None


def _excl_cumsum(v: jax.Array, axis: int = -1) -> jax.Array:
    return jnp.cumsum(v, axis=axis) - v


def _slots_by_expert(topk_ids: jax.Array, num_experts: int):
    """Flattened slots grouped by global expert: ``(valid, key, order, counts)`` — ``key`` is
    the expert, or ``num_experts`` for a masked slot (sorted last); ``order`` sorts slots by
    key (stable); ``counts`` has ``num_experts + 1`` entries, the masked slots last."""
    flat = topk_ids.reshape(-1)
    valid = (flat >= 0) & (flat < num_experts)
    key = jnp.where(valid, flat, num_experts)
    order = jnp.argsort(key, stable=True)
    counts = jnp.zeros(num_experts + 1, jnp.int32).at[key].add(1)
    return valid, key, order, counts


def ragged_moe(
    x: jax.Array,
    topk_ids: jax.Array,
    topk_weights: jax.Array,
    w1: jax.Array,
    w2: jax.Array,
    *,
    axis_name: str,
    recv_capacity: int,
    gemm: GroupedGemm = xla_grouped_gemm,
    compute_dtype=jnp.bfloat16,
) -> jax.Array:
    """Token dispatch/return by ``ragged_all_to_all`` around two grouped GEMMs.

    ``recv_capacity``: rows of the receive buffer (≥ the most slots any rank receives).
    ``compute_dtype``: the dtype the GEMM operands are cast to (bf16; ``float8_e4m3fn`` runs
    the GEMMs in FP8 without block scales — a timing-only variant for kernels that take no
    scales).
    """
    m, k = topk_ids.shape
    h = x.shape[1]
    num_local = w1.shape[0]
    num_ranks = lax.axis_size(axis_name)
    me = lax.axis_index(axis_name)
    num_experts = num_local * num_ranks
    slots = m * k

    # --- sender: slots sorted by global expert (hence by destination rank) ----------------
    valid, key, order, counts = _slots_by_expert(topk_ids, num_experts)
    send = x[order // k]
    counts = counts[:num_experts]
    all_counts = lax.all_gather(counts, axis_name)  # [R src, E]
    per_pair = all_counts.reshape(num_ranks, num_ranks, num_local)  # [src, dst, e_l]
    sizes = per_pair.sum(-1)  # [src, dst]
    row_off = _excl_cumsum(sizes, axis=1)  # where dst's chunk starts in src's send buffer
    col_off = _excl_cumsum(sizes, axis=0)  # where src's chunk lands in dst's receive buffer

    recv = lax.ragged_all_to_all(
        send,
        jnp.zeros((recv_capacity, h), x.dtype),
        row_off[me],
        sizes[me],
        col_off[me],
        sizes[:, me],
        axis_name=axis_name,
    )

    # --- receiver: regroup rows by local expert ----------------------------------------
    # The chunk from source s is sorted by expert, so the row of (e, s, j) in the receive
    # buffer follows from the counts: no ids travel and no sort is needed.
    c = per_pair[:, me, :]  # [src, e_l] slots of source s for local expert e
    recv_start = col_off[:, me][:, None] + _excl_cumsum(c, axis=1)  # [src, e_l]
    ce = c.T.reshape(-1)  # expert-major segments (e, s)
    seg_end = jnp.cumsum(ce)
    seg_start = seg_end - ce
    p = jnp.arange(recv_capacity)
    seg = jnp.minimum(jnp.searchsorted(seg_end, p, side="right"), ce.shape[0] - 1)
    e_of, s_of = seg // num_ranks, seg % num_ranks
    row = recv_start[s_of, e_of] + (p - seg_start[seg])
    total = seg_end[-1]
    row = jnp.where(p < total, row, recv_capacity)  # out of range: dropped below
    xs = recv[jnp.minimum(row, recv_capacity - 1)]
    group_sizes = c.sum(0).astype(jnp.int32)

    # --- expert MLP --------------------------------------------------------------------
    cd = jnp.dtype(compute_dtype)
    hid = gemm(xs.astype(cd), w1.astype(cd), group_sizes)
    a = _swiglu(hid)
    out = gemm(a.astype(cd), w2.astype(cd), group_sizes).astype(x.dtype)
    back = jnp.zeros((recv_capacity, h), x.dtype).at[row].set(out, mode="drop")

    # --- return trip and weighted sum at home ------------------------------------------
    ret = lax.ragged_all_to_all(
        back,
        jnp.zeros((slots, h), x.dtype),
        col_off[:, me],
        sizes[:, me],
        row_off[:, me],
        sizes[me],
        axis_name=axis_name,
    )
    o = jnp.zeros((slots, h), x.dtype).at[order].set(ret)
    o = jnp.where(valid[:, None], o, 0).reshape(m, k, h).astype(jnp.float32)
    return jnp.einsum("mkh,mk->mh", o, topk_weights).astype(jnp.bfloat16)


def _per_tensor_e4m3(v: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``v`` as e4m3 with one f32 scale (``v ≈ q * scale``)."""
    v = v.astype(jnp.float32)
    scale = jnp.maximum(jnp.max(jnp.abs(v)), 1e-4) / 448.0
    return (v / scale).astype(jnp.float8_e4m3fn), scale


def _expert_einsum(spec: str, act: jax.Array, w: jax.Array, compute_dtype) -> jax.Array:
    """A per-expert batched GEMM in f32, on bf16 operands or, for e4m3, on a per-tensor scaled
    e4m3 copy of ``act`` and the e4m3 weights as given."""
    if jnp.dtype(compute_dtype) == jnp.float8_e4m3fn:
        q, scale = _per_tensor_e4m3(act)
        return jnp.einsum(spec, q, w.astype(q.dtype), preferred_element_type=jnp.float32) * scale
    return jnp.einsum(spec, act, w, preferred_element_type=jnp.float32)


def dense_moe(
    x: jax.Array,
    topk_ids: jax.Array,
    topk_weights: jax.Array,
    w1: jax.Array,
    w2: jax.Array,
    *,
    axis_name: str,
    capacity: int,
    compute_dtype=jnp.bfloat16,
) -> jax.Array:
    """Capacity-based MoE with dense per-expert einsums (GShard style).

    ``capacity``: slots per (source rank, expert); with the host-computed maximum no token is
    dropped. ``compute_dtype``: bf16, or ``float8_e4m3fn`` for the timing-only FP8 twin.
    """
    m, k = topk_ids.shape
    h = x.shape[1]
    num_local = w1.shape[0]
    num_ranks = lax.axis_size(axis_name)
    num_experts = num_local * num_ranks
    slots = m * k

    valid, key, order, counts = _slots_by_expert(topk_ids, num_experts)
    start = _excl_cumsum(counts)
    pos_sorted = jnp.arange(slots) - start[key[order]]
    pos = jnp.zeros(slots, jnp.int32).at[order].set(pos_sorted)
    dest = jnp.where(valid & (pos < capacity), key * capacity + pos, num_experts * capacity)

    buf = (
        jnp.zeros((num_experts * capacity, h), x.dtype)
        .at[dest]
        .set(x[jnp.arange(slots) // k], mode="drop")
    )
    buf = buf.reshape(num_ranks, num_local * capacity, h)
    buf = lax.all_to_all(buf, axis_name, 0, 0, tiled=True)  # [src, E_l*C, H]
    xe = buf.reshape(num_ranks, num_local, capacity, h).transpose(1, 0, 2, 3)
    xe = xe.reshape(num_local, num_ranks * capacity, h)

    hid = _expert_einsum("ech,eih->eci", xe, w1, compute_dtype)
    a = _swiglu(hid)
    out = _expert_einsum("eci,ehi->ech", a, w2, compute_dtype)
    out = out.astype(x.dtype).reshape(num_local, num_ranks, capacity, h).transpose(1, 0, 2, 3)
    out = lax.all_to_all(
        out.reshape(num_ranks, num_local * capacity, h), axis_name, 0, 0, tiled=True
    )
    out = out.reshape(num_experts * capacity, h)
    o = out[jnp.minimum(dest, num_experts * capacity - 1)]
    o = jnp.where((dest < num_experts * capacity)[:, None], o, 0)
    o = o.reshape(m, k, h).astype(jnp.float32)
    return jnp.einsum("mkh,mk->mh", o, topk_weights).astype(jnp.bfloat16)


def recv_capacity(ids: np.ndarray, num_experts: int, num_ranks: int) -> int:
    """The most slots any rank receives under the global routing ``ids`` [R*M, K]."""
    valid = ids[(ids >= 0) & (ids < num_experts)]
    per_rank = np.bincount(valid // (num_experts // num_ranks), minlength=num_ranks)
    return max(int(per_rank.max()), 1)


def dense_capacity(ids: np.ndarray, num_experts: int, num_ranks: int) -> int:
    """The most slots any source rank sends to any one expert (the no-drop capacity)."""
    per_src = ids.reshape(num_ranks, -1)
    best = 1
    for row in per_src:
        row = row[(row >= 0) & (row < num_experts)]
        if row.size:
            best = max(best, int(np.bincount(row, minlength=num_experts).max()))
    return best
