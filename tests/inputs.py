"""Fresh random MoE inputs (never zeros) with the routings the tests cover."""

import jax.numpy as jnp
import numpy as np

from jax_megamoe import quantize_blockwise, quantize_per_token, transform_weights

ROUTINGS = ("uniform", "masked", "hot", "one_rank", "skewed")


def make_ids(rng, m, num_experts, k, routing, num_ranks=1):
    """[m, k] int32 expert ids; distinct within a token except where masked."""
    if routing == "one_rank":  # every slot lands on rank 0's experts
        pool = num_experts // num_ranks
        ids = np.full((m, k), -1, np.int32)  # slots beyond rank 0's expert count are masked
        for row in ids:
            row[: min(pool, k)] = rng.permutation(pool)[:k]
        return ids
    if routing == "skewed":  # Zipf-like popularity
        p = 1.0 / np.arange(1, num_experts + 1) ** 1.2
        p = p / p.sum()
        perm = rng.permutation(num_experts)
        return np.stack(
            [perm[rng.choice(num_experts, k, replace=False, p=p)] for _ in range(m)]
        ).astype(np.int32)
    ids = np.stack([rng.permutation(num_experts)[:k] for _ in range(m)]).astype(np.int32)
    if routing == "hot":  # every token sends slot 0 to one expert
        hot = int(rng.integers(num_experts))
        for row in ids:
            if hot in row:
                row[list(row).index(hot)] = row[0]
            row[0] = hot
    elif routing == "masked":  # -1 and out-of-range ids are masked; some tokens fully masked
        mask = rng.random(ids.shape) < 0.3
        ids[mask] = -1
        ids[rng.random(ids.shape) < 0.05] = num_experts + 3
        ids[rng.random(ids.shape) < 0.05] = -7
        ids[:: max(1, m // 3)] = -1
    elif routing != "uniform":
        raise ValueError(routing)
    return ids


def make_inputs(seed, *, m, h, i, e, k, routing="uniform", num_ranks=1):
    rng = np.random.default_rng(seed)
    hidden = rng.standard_normal((m, h)).astype(np.float32)
    hidden[:, rng.integers(h)] *= 8.0  # an outlier channel: scales differ across blocks
    x, x_scale = quantize_per_token(jnp.asarray(hidden))
    ids = make_ids(rng, m, e, k, routing, num_ranks)
    topk_weights = rng.uniform(0.05, 1.0, (m, k)).astype(np.float32)
    w1 = rng.standard_normal((e, 2 * i, h)).astype(np.float32) * h**-0.5
    w2 = rng.standard_normal((e, h, i)).astype(np.float32) * i**-0.5
    w1 = w1 * rng.uniform(0.5, 2.0, (e, 1, 1)).astype(np.float32)
    weights = transform_weights(*quantize_blockwise(w1), *quantize_blockwise(w2))
    return dict(
        x=x,
        x_scale=x_scale,
        topk_ids=jnp.asarray(ids),
        topk_weights=jnp.asarray(topk_weights),
        weights=weights,
    )


def make_weights_on_device(key, *, e, h, i):
    """FP8 expert weights generated and quantized one expert at a time on the default device,
    so the DeepSeek-V3 shape (7.5 GB of e4m3 in w1) never needs its f32 copy."""
    import jax

    from jax_megamoe import MoEWeights

    def one(k):
        k1, k2, k3 = jax.random.split(k, 3)
        gain = jax.random.uniform(k3, (), minval=0.5, maxval=2.0)
        w1 = jax.random.normal(k1, (2 * i, h), jnp.float32) * (gain * h**-0.5)
        w2 = jax.random.normal(k2, (h, i), jnp.float32) * i**-0.5
        return (*quantize_blockwise(w1), *quantize_blockwise(w2))

    return MoEWeights(*jax.jit(lambda ks: jax.lax.map(one, ks))(jax.random.split(key, e)))


def make_activations(seed, *, m, h, e, k, routing="uniform", num_ranks=1):
    """Tokens, scales and routing for ``m`` tokens (all ranks together)."""
    import jax

    rng = np.random.default_rng(seed)
    hidden = jax.random.normal(jax.random.key(seed), (m, h), jnp.float32)
    hidden = hidden.at[:, int(rng.integers(h))].multiply(8.0)
    x, x_scale = quantize_per_token(hidden)
    ids = make_ids(rng, m, e, k, routing, num_ranks)
    topk_weights = rng.uniform(0.05, 1.0, (m, k)).astype(np.float32)
    return dict(
        x=x, x_scale=x_scale, topk_ids=jnp.asarray(ids), topk_weights=jnp.asarray(topk_weights)
    )
