"""The inference layer (router + quantize + MoE); the `python -m jax_megamoe` job is in
test_cli.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from oracle import moe_f64, route_f64

from jax_megamoe import (
    MegaMoE,
    calc_diff,
    fp8_mega_moe,
    init_weights,
    quantize_per_token,
    route,
)


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


def test_route_at_the_ends_of_f32():
    """Found by a numerics audit (2026-12-05), each against the float64 oracle: sigmoid scores
    that all underflow gave NaN weights (0 / 0 when renormalized); saturated scores (sigmoid
    near 1, softmax near 0) tied and chose the lower index over the larger logit; and with a
    bias of -inf in a kept group, a dropped group's expert (masked to -inf) could be chosen."""
    one = np.ones((1, 1), np.float32)
    cases = [
        (np.array([[-90.0, -95, -100, -120]], np.float32), 2, dict(scoring="sigmoid")),
        (np.array([[20.0, 30.0]], np.float32), 1, dict(scoring="sigmoid")),
        (np.array([[-200.0, -100.0, 0.0]], np.float32), 2, dict(scoring="softmax")),
        (
            np.array([[0.1, 0.2, 0.3, 0.4, 0.5, 0.6]], np.float32),
            3,
            dict(
                scoring="sigmoid",
                bias=np.array([-np.inf, -np.inf, 0, 0, 0, -np.inf], np.float32),
                groups=(2, 1),
            ),
        ),
    ]
    for router, k, opts in cases:
        groups = opts.get("groups", (1, None))
        normalize = opts["scoring"] == "sigmoid"
        want_ids, want_w = route_f64(one, router, k, normalize=normalize, scaling=1.0, **opts)
        ids, w = route(
            one,
            router,
            k,
            scoring=opts["scoring"],
            bias=None if opts.get("bias") is None else jnp.asarray(opts["bias"]),
            num_groups=groups[0],
            topk_groups=groups[1],
        )
        np.testing.assert_array_equal(np.asarray(ids), want_ids)
        assert np.isfinite(np.asarray(w)).all()
        np.testing.assert_allclose(np.asarray(w), want_w, rtol=1e-5, atol=1e-30)


ROUTINGS = {
    # DeepSeek-V3's gate: sigmoid, a bias to choose, 8 groups of which 4 kept, scaling 2.5.
    "dsv3": dict(scoring="sigmoid", bias=True, groups=(8, 4), normalize=True, scaling=2.5),
    "sigmoid_bias": dict(scoring="sigmoid", bias=True, groups=(1, None), normalize=True),
    "softmax_groups": dict(scoring="softmax", bias=False, groups=(4, 2), normalize=False),
}


@pytest.mark.parametrize("name", list(ROUTINGS))
def test_route_with_bias_and_groups_matches_oracle(name):
    spec = dict(ROUTINGS[name])
    rng = np.random.default_rng(7)
    e, k = 64, 8
    hidden = jnp.asarray(rng.standard_normal((48, 128)), jnp.bfloat16)
    router = jnp.asarray(rng.standard_normal((128, e)) / 8, jnp.float32)
    bias = jnp.asarray(rng.normal(0, 0.2, e), jnp.float32) if spec.pop("bias") else None
    (num_groups, kept), scaling = spec.pop("groups"), spec.get("scaling", 1.0)
    ids, w = route(hidden, router, k, bias=bias, num_groups=num_groups, topk_groups=kept, **spec)
    want_ids, want_w = route_f64(
        hidden, router, k, bias=bias, groups=(num_groups, kept), **{"scaling": scaling, **spec}
    )
    np.testing.assert_array_equal(np.asarray(ids), want_ids)
    np.testing.assert_allclose(np.asarray(w), want_w, rtol=5e-5)
    if num_groups > 1:  # every row's experts come from at most `kept` groups
        groups_used = np.asarray(ids) // (e // num_groups)
        assert max(len(set(row)) for row in groups_used) <= kept
    if bias is not None:  # the bias changes the choice (so ignoring it would fail above)
        plain, _ = route(hidden, router, k, num_groups=num_groups, topk_groups=kept, **spec)
        assert (np.sort(np.asarray(plain), 1) != np.sort(want_ids, 1)).any()


def test_layer_passes_the_bias_and_groups_to_route():
    router, weights = init_weights(jax.random.key(3), num_experts=16, hidden=256, intermediate=128)
    hidden = jax.random.normal(jax.random.key(4), (12, 256)).astype(jnp.bfloat16)
    bias = jax.random.normal(jax.random.key(5), (16,)) * 0.3
    opts = dict(scoring="sigmoid", scaling=2.5, num_groups=4, topk_groups=2)
    layer = MegaMoE(topk=4, impl="reference", **opts)
    y = jax.jit(layer)(hidden, router, weights, bias)
    ids, w = route(hidden, router, 4, bias=bias, **opts)
    want = fp8_mega_moe(*quantize_per_token(hidden), ids, w, weights, impl="reference")
    np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(want, np.float32))


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(bias=np.zeros(15, np.float32)), ValueError, r"bias must be \[E\] = \(16,\)"),
        (dict(bias=np.zeros(16, np.int32)), TypeError, "bias must be a real floating array"),
        (dict(num_groups=3, topk_groups=1), ValueError, r"num_groups \(3\) must divide"),
        (dict(num_groups=4), ValueError, "num_groups=4 needs topk_groups"),
        (dict(topk_groups=2), ValueError, r"topk_groups \(2\) needs num_groups > 1"),
        (dict(num_groups=4, topk_groups=5), ValueError, "topk_groups must be in"),
        (dict(num_groups=8, topk_groups=1), ValueError, r"topk \(4\) exceeds the 1 \* 2"),
        (
            dict(num_groups=16, topk_groups=4, bias=np.zeros(16, np.float32)),
            ValueError,
            "with a bias each group scores as its top two experts",
        ),
    ],
)
def test_route_refuses_bad_group_options(kwargs, error, match):
    hidden = jnp.ones((4, 128), jnp.float32)
    router = jnp.ones((128, 16), jnp.float32)
    with pytest.raises(error, match=f"route: {match}"):
        route(hidden, router, 4, **kwargs)


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
