"""Benchmark shapes, hardware ceilings and routings, in one place; inputs come from
``jax_megamoe.testing``, the generator the tests use.

Everything the sweep needs to agree on (the DeepSeek-V3 layer shape, the token sweep, the cards'
ceilings behind the floor, how routings and weights are made) lives here so that the fused layer
and every baseline are measured on the same inputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jax_megamoe import MoEWeights, SymmBuffer, dequantize
from jax_megamoe.testing import expert_weights, make_activations, make_routing

# DeepSeek-V3 MoE layer (docs/design.md §6).
DSV3 = dict(hidden=7168, intermediate=2048, experts=256, topk=8)
# Tokens per rank.
TOKENS = (8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
ROUTINGS = ("uniform", "skewed", "hot")  # the sweep's subset of jax_megamoe.testing.ROUTINGS


@dataclass(frozen=True)
class Ceilings:
    """A card's measured rates, behind the floor: FP8 GEMM FLOP/s and HBM bytes/s."""

    fp8_flops: float
    hbm_bytes_per_s: float


# Measured on the cards we benchmark on: cuBLAS FP8 (H100: 8192^3; H200: the best rate at the
# layer's GEMM shapes, 1460-1580 TFLOPS) and an HBM device-to-device copy. H100 and H200 have
# the same SMs; the H200's HBM is faster. Other cards get the H100 figures.
CEILINGS = {
    "H100": Ceilings(fp8_flops=1417e12, hbm_bytes_per_s=3.0e12),
    "H200": Ceilings(fp8_flops=1580e12, hbm_bytes_per_s=4.3e12),
}


def ceilings(device_kind: str) -> Ceilings:
    """The measured rates of a device kind (e.g. "NVIDIA H200"); the H100's where unknown."""
    for name, rates in CEILINGS.items():
        if name in device_kind:
            return rates
    return CEILINGS["H100"]


AXIS = "ep"


@dataclass(frozen=True)
class Shape:
    hidden: int
    intermediate: int
    experts: int
    topk: int

    def expert_bytes(self) -> int:
        """FP8 bytes of one expert's weights (w1 2I×H + w2 H×I; scales are negligible)."""
        return 3 * self.hidden * self.intermediate


def flops_per_rank(m: int, shape: Shape) -> float:
    """FLOPs of one rank's tokens: M·K slots × (2·H·2I + 2·I·H) = M·K·6·H·I (docs/design.md §6)."""
    return float(m) * shape.topk * 6 * shape.hidden * shape.intermediate


def touched_experts(ids: np.ndarray, num_experts: int, num_ranks: int) -> np.ndarray:
    """Per rank: how many of its experts receive at least one slot of the global routing."""
    per_rank = num_experts // num_ranks
    valid = ids[(ids >= 0) & (ids < num_experts)]
    used = np.zeros(num_experts, bool)
    used[np.unique(valid)] = True
    return used.reshape(num_ranks, per_rank).sum(axis=1)


def floor_seconds(
    m: int, ids: np.ndarray, shape: Shape, num_ranks: int, rates: Ceilings = CEILINGS["H100"]
) -> float:
    """Lower bound of the slowest rank for the routing ``ids``."""
    touched = int(touched_experts(ids, shape.experts, num_ranks).max())
    return floor_from(flops_per_rank(m, shape), touched, shape, rates)


def floor_from(flops: float, touched: int, shape: Shape, rates: Ceilings) -> float:
    """The FP8 compute at the card's GEMM rate, or streaming each of the ``touched`` experts'
    weights once from HBM, whichever takes longer (seconds)."""
    return max(flops / rates.fp8_flops, touched * shape.expert_bytes() / rates.hbm_bytes_per_s)


def csv_ints(s: str) -> list[int]:
    """An argparse type for comma-separated integers ("8,128,2048")."""
    return [int(v) for v in s.split(",") if v.strip()]


def make_mesh(num_ranks: int | None = None) -> Mesh:
    devices = jax.devices()
    if num_ranks is not None:
        if num_ranks > len(devices):
            raise ValueError(f"--ranks {num_ranks} but only {len(devices)} devices are visible")
        devices = devices[:num_ranks]
    return Mesh(np.array(devices), (AXIS,))


def make_buffer(mesh: Mesh, shape: Shape, max_tokens: int, sm_budget: int = 0) -> SymmBuffer:
    """The fused layer's workspace over the expert axis, for ``shape`` and up to ``max_tokens``
    tokens per rank. Benches create it first, before their big allocations."""
    return SymmBuffer.create(
        mesh,
        AXIS,
        num_experts=shape.experts,
        hidden=shape.hidden,
        intermediate=shape.intermediate,
        topk=shape.topk,
        max_tokens_per_rank=max_tokens,
        sm_budget=sm_budget,
    )


def shard_jit(fn, mesh: Mesh, n_in: int, check_vma: bool = True):
    """``jit(shard_map(fn))`` with every operand and the result split over the expert axis."""
    spec = P(AXIS)
    return jax.jit(
        jax.shard_map(fn, mesh=mesh, in_specs=(spec,) * n_in, out_specs=spec, check_vma=check_vma)
    )


def make_weights(mesh: Mesh, shape: Shape, seed: int) -> MoEWeights:
    """FP8 expert weights generated on the devices that own them, one expert at a time.

    The DSV3 weights are 11 GB of e4m3 over all experts: generating them per rank (inside
    shard_map) and per expert (lax.map) means no device ever holds more than its own shard
    plus one expert's f32 copy.
    """

    def per_rank(keys):
        return expert_weights(keys, hidden=shape.hidden, intermediate=shape.intermediate)

    sharding = NamedSharding(mesh, P(AXIS))
    keys = jax.device_put(jax.random.split(jax.random.key(seed), shape.experts), sharding)
    gen = jax.jit(jax.shard_map(per_rank, mesh=mesh, in_specs=P(AXIS), out_specs=P(AXIS)))
    return gen(keys)


def bf16_weights(mesh: Mesh, weights: MoEWeights) -> tuple[jax.Array, jax.Array]:
    """The same experts dequantized to bf16 (w1 [E, 2I, H], w2 [E, H, I]), for the bf16
    baselines: what a JAX user without FP8 kernels would hold. Per rank and per expert, so no
    f32 copy of the whole shard is ever live."""

    def per_rank(w):
        def one(args):
            w1, s1, w2, s2 = args
            return (
                dequantize(w1, s1).astype(jnp.bfloat16),
                dequantize(w2, s2).astype(jnp.bfloat16),
            )

        return jax.lax.map(one, tuple(w))

    spec = P(AXIS)
    fn = jax.shard_map(per_rank, mesh=mesh, in_specs=(spec,), out_specs=(spec, spec))
    return jax.jit(fn)(weights)


@dataclass
class InputSet:
    """One set of inputs for all ranks (sharded over the expert axis by tokens)."""

    x: jax.Array  # [R*M, H] e4m3
    x_scale: jax.Array  # [R*M, H/128] f32
    x_bf16: jax.Array  # [R*M, H] bf16, the dequantized x, for the bf16 baselines
    topk_ids: jax.Array  # [R*M, K] int32
    topk_weights: jax.Array  # [R*M, K] f32
    ids_host: np.ndarray  # the routing on host (capacities, floors)


def make_input_set(mesh: Mesh, shape: Shape, m: int, routing: str, seed: int) -> InputSet:
    """Fresh activations and routing for ``m`` tokens per rank."""
    num_ranks = mesh.shape[AXIS]
    rng = np.random.default_rng(seed)
    ids, tw = make_routing(rng, num_ranks * m, shape.experts, shape.topk, routing)
    sharding = NamedSharding(mesh, P(AXIS))

    def gen(key):
        x, s = make_activations(key, num_ranks * m, shape.hidden)
        return x, s, dequantize(x, s).astype(jnp.bfloat16)

    x, x_scale, x_bf16 = jax.jit(gen, out_shardings=(sharding,) * 3)(jax.random.key(seed))
    return InputSet(
        x=x,
        x_scale=x_scale,
        x_bf16=x_bf16,
        topk_ids=jax.device_put(ids, sharding),
        topk_weights=jax.device_put(tw, sharding),
        ids_host=ids,
    )
