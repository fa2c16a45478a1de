"""Random MoE inputs for the tests, the benchmarks and demos: one generator, so every check and
every measurement runs on the same kind of data.

Values are fresh and never zero: activations are normal with one outlier channel (so the
per-128-channel scales differ), weights are normal with fan-in scaling and a per-expert gain,
routing weights are uniform in [0.05, 1). Routings (:data:`ROUTINGS`) cover the balanced case,
popularity skew, one hot expert, masked slots and all traffic to one rank.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from .quant import quantize_blockwise, quantize_per_token
from .weights import MoEWeights

ROUTINGS = ("uniform", "skewed", "hot", "masked", "one_rank")


def _distinct(rng: np.random.Generator, m: int, n: int, k: int) -> np.ndarray:
    """[m, min(k, n)] ids, distinct within a row, uniform over [0, n)."""
    return np.argsort(rng.random((m, n)), axis=1)[:, :k]


def make_ids(
    rng: np.random.Generator,
    m: int,
    num_experts: int,
    k: int,
    routing: str = "uniform",
    num_ranks: int = 1,
) -> np.ndarray:
    """[m, k] int32 global expert ids, distinct within a row except where masked.

    ``uniform``: k distinct experts at random. ``skewed``: Zipf-like popularity (p ∝
    1/rank^1.2 over a random expert order), sampled without replacement by the Gumbel top-k
    trick. ``hot``: uniform, but slot 0 of every row is one expert. ``masked``: uniform with
    about 30% of slots -1, some out-of-range ids (masked too) and every third row fully masked.
    ``one_rank``: every slot on rank 0's experts (slots past their count are -1).
    """
    if routing == "skewed":
        p = 1.0 / np.arange(1, num_experts + 1) ** 1.2
        logp = np.log(p / p.sum())[rng.permutation(num_experts)]
        keys = logp[None, :] + rng.gumbel(size=(m, num_experts))
        return np.argsort(-keys, axis=1)[:, :k].astype(np.int32)
    if routing == "one_rank":
        ids = np.full((m, k), -1, np.int32)
        pool = num_experts // num_ranks
        ids[:, : min(pool, k)] = _distinct(rng, m, pool, k)
        return ids
    if routing not in ROUTINGS:
        raise ValueError(f"unknown routing {routing!r} (expected one of {ROUTINGS})")
    ids = _distinct(rng, m, num_experts, k).astype(np.int32)
    if routing == "hot":
        hot = int(rng.integers(num_experts))
        rows, cols = np.nonzero(ids == hot)  # where it sits in another slot, swap with slot 0
        ids[rows, cols] = ids[rows, 0]
        ids[:, 0] = hot
    elif routing == "masked":
        ids[rng.random(ids.shape) < 0.3] = -1
        ids[rng.random(ids.shape) < 0.05] = num_experts + 3
        ids[rng.random(ids.shape) < 0.05] = -7
        ids[:: max(1, m // 3)] = -1
    return ids


def expert_weights(keys: jax.Array, *, hidden: int, intermediate: int) -> MoEWeights:
    """FP8 weights of ``len(keys)`` experts, made and quantized one expert at a time
    (``lax.map``), so no f32 copy of all experts is ever live (the DeepSeek-V3 shape has 11 GB
    of e4m3). Jit it, or call it per rank inside ``shard_map`` on that rank's keys."""
    h, i = hidden, intermediate

    def one(key):
        k1, k2, k3 = jax.random.split(key, 3)
        gain = jax.random.uniform(k3, (), minval=0.5, maxval=2.0)
        w1 = jax.random.normal(k1, (2 * i, h), jnp.float32) * (gain * h**-0.5)
        w2 = jax.random.normal(k2, (h, i), jnp.float32) * i**-0.5
        return (*quantize_blockwise(w1), *quantize_blockwise(w2))

    return MoEWeights(*jax.lax.map(one, keys))


def make_activations(key: jax.Array, m: int, hidden: int) -> tuple[jax.Array, jax.Array]:
    """``(x, x_scale)``: ``m`` normal tokens with one outlier channel (x8), quantized 1x128."""
    k1, k2 = jax.random.split(key)
    tokens = jax.random.normal(k1, (m, hidden), jnp.float32)
    outlier = jax.random.randint(k2, (), 0, hidden)
    return quantize_per_token(tokens.at[:, outlier].multiply(8.0))


def make_weights(key: jax.Array, *, num_experts: int, hidden: int, intermediate: int):
    """:func:`expert_weights` of ``num_experts`` experts on the default device."""
    keys = jax.random.split(key, num_experts)
    return _jit_expert_weights(keys, hidden=hidden, intermediate=intermediate)


_jit_expert_weights = jax.jit(expert_weights, static_argnames=("hidden", "intermediate"))


def make_routing(
    rng: np.random.Generator, m: int, num_experts: int, k: int, routing="uniform", num_ranks=1
) -> tuple[np.ndarray, np.ndarray]:
    """``(topk_ids, topk_weights)`` on the host: :func:`make_ids` and uniform [0.05, 1)
    float32 weights."""
    ids = make_ids(rng, m, num_experts, k, routing, num_ranks)
    return ids, rng.uniform(0.05, 1.0, ids.shape).astype(np.float32)


def make_inputs(
    seed: int, *, m: int, h: int, i: int, e: int, k: int, routing="uniform", num_ranks=1
) -> dict:
    """The five operands of ``fp8_mega_moe`` for ``m`` tokens (all ranks together) and ``e``
    experts of hidden ``h``, intermediate ``i``, top-``k``: ``x``, ``x_scale``, ``topk_ids``,
    ``topk_weights``, ``weights`` (all experts: shard them with ``P(axis)``)."""
    k_act, k_w = jax.random.split(jax.random.key(seed))
    x, x_scale = jax.jit(make_activations, static_argnums=(1, 2))(k_act, m, h)
    ids, topk_weights = make_routing(np.random.default_rng(seed), m, e, k, routing, num_ranks)
    return dict(
        x=x,
        x_scale=x_scale,
        topk_ids=jnp.asarray(ids),
        topk_weights=jnp.asarray(topk_weights),
        weights=make_weights(k_w, num_experts=e, hidden=h, intermediate=i),
    )


def make_buffer(mesh, dims: dict, max_tokens_per_rank: int, axis_name: str = "ep", **kwargs):
    """A ``SymmBuffer`` over ``mesh`` for the dimensions of :func:`make_inputs` (``dims`` with
    keys ``h``, ``i``, ``e``, ``k``); ``kwargs`` go to ``SymmBuffer.create``."""
    from .symm_buffer import SymmBuffer

    return SymmBuffer.create(
        mesh,
        axis_name,
        num_experts=dims["e"],
        hidden=dims["h"],
        intermediate=dims["i"],
        topk=dims["k"],
        max_tokens_per_rank=max_tokens_per_rank,
        **kwargs,
    )


# A row's calc_diff between the fused kernels and the mirror reference, at most (the GPU tests).
# One FP8 rounding flip in a row moves it by ~1e-5 to 1e-4, and in L1's narrow rows (128-256
# values) by a few 1e-4 (6.9e-4 the worst seen, 2026-12-05); a slot or a 128-column tile left
# out of a row moves it by ~1e-2 or more, which a calc_diff over hundreds of rows averages away.
ROW_DIFF_BOUND = 2e-3
