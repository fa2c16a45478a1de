"""The inference layer (router + quantize + MoE); the `python -m jax_megamoe` job is in
test_cli.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from oracle import moe_f64

from jax_megamoe import MegaMoE, calc_diff, init_weights, quantize_per_token, route


def test_route_softmax_and_sigmoid():
    rng = np.random.default_rng(0)
    hidden = jnp.asarray(rng.standard_normal((32, 128)), jnp.bfloat16)
    router = jnp.asarray(rng.standard_normal((128, 16)), jnp.float32)
    logits = np.asarray(hidden, np.float64) @ np.asarray(router, np.float64)
    ids, w = route(hidden, router, 4, scoring="softmax")
    expect = np.argsort(-logits, axis=1)[:, :4]
    np.testing.assert_array_equal(np.sort(np.asarray(ids), 1), np.sort(expect, 1))
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    # route's logits are f32 sums of 128 products, and how XLA's CPU dot orders them differs
    # between builds and CPUs by ~1e-6 of a logit of ~10: a probability carries that as a
    # relative error of ~1e-5 (1.2e-5 seen on one CI machine). A softmax normalized over the
    # top k only would be off by the mass outside them: over 5e-5 in 13 of these 32 rows.
    np.testing.assert_allclose(np.asarray(w), np.take_along_axis(p, np.asarray(ids), 1), rtol=5e-5)
    ids_s, w_s = route(hidden, router, 4, scoring="sigmoid", scaling=2.5)
    np.testing.assert_allclose(np.asarray(w_s).sum(1), 2.5, rtol=1e-5)
    assert ids_s.dtype == jnp.int32 and w_s.dtype == jnp.float32
    with pytest.raises(ValueError, match="scoring must be"):
        route(hidden, router, 4, scoring="relu")


def test_layer_under_shard_map_matches_oracle():
    mesh = Mesh(np.array(jax.devices()[:4]), ("ep",))
    router, weights = init_weights(jax.random.key(1), num_experts=16, hidden=256, intermediate=128)
    hidden = jax.random.normal(jax.random.key(2), (4 * 12, 256)).astype(jnp.bfloat16)
    layer = MegaMoE(topk=3, scoring="sigmoid", axis_name="ep")
    step = jax.jit(
        jax.shard_map(layer, mesh=mesh, in_specs=(P("ep"), P(), P("ep")), out_specs=P("ep"))
    )
    y = step(
        jax.device_put(hidden, NamedSharding(mesh, P("ep"))),
        router,
        jax.device_put(weights, NamedSharding(mesh, P("ep"))),
    )
    ids, tw = route(hidden, router, 3, scoring="sigmoid")
    x, xs = quantize_per_token(hidden)
    ref = moe_f64(x, xs, ids, tw, *weights)
    assert np.abs(ref).max() > 0.05
    assert calc_diff(y, ref) <= 1e-5
    with pytest.raises(ValueError, match=r"hidden must be \[M, H\]"):
        layer(hidden[None], router, weights)
