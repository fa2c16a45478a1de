"""The layer under the JAX settings and styles an inference stack may use, found by an audit of
2026-12-05: 64-bit mode with strict dtype promotion and rank promotion refused, a shard_map that
leaves some mesh axes automatic, and eager calls (each used to compile anew)."""

import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

from jax_megamoe import MegaMoE, calc_diff, fp8_mega_moe, init_weights, route
from jax_megamoe.testing import make_inputs

E, H, INTER, K, M = 8, 256, 128, 2, 32


@pytest.fixture(scope="module")
def layer_inputs():
    router, weights = init_weights(jax.random.key(0), num_experts=E, hidden=H, intermediate=INTER)
    hidden = jax.random.normal(jax.random.key(1), (M, H), jnp.bfloat16)
    bias = jax.random.normal(jax.random.key(2), (E,), jnp.float32) * 0.1
    return hidden, router, weights, bias


@pytest.mark.parametrize("x64", [False, True])
def test_strict_promotion_rank_promotion_and_x64(layer_inputs, x64):
    """With jax_enable_x64 the reference's argsort gave int64 indices, scattered into int32 (a
    FutureWarning, an error under strict promotion); route's bias and group masks broadcast by
    rank promotion, which jax_numpy_rank_promotion='raise' refuses."""
    hidden, router, weights, bias = layer_inputs
    dsv3 = dict(scoring="sigmoid", num_groups=4, topk_groups=2)
    layer = MegaMoE(topk=K, **dsv3)
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:4]), ("ep",))
    sharded = jax.jit(
        jax.shard_map(
            MegaMoE(topk=K, axis_name="ep", **dsv3),
            mesh=mesh,
            in_specs=(P("ep"), P(), P("ep"), P()),
            out_specs=P("ep"),
        )
    )
    want = layer(hidden, router, weights, bias)
    want_ids, want_w = route(hidden, router, K, bias=bias, **dsv3)
    assert np.abs(np.asarray(want, np.float32)).max() > 0
    with (
        jax.enable_x64(x64),
        jax.numpy_dtype_promotion("strict"),
        jax.numpy_rank_promotion("raise"),
    ):
        ids, w = route(hidden, router, K, bias=bias, **dsv3)
        got = [layer(hidden, router, weights, bias), sharded(hidden, router, weights, bias)]
    np.testing.assert_array_equal(np.asarray(ids), np.asarray(want_ids))
    np.testing.assert_allclose(np.asarray(w), np.asarray(want_w), rtol=1e-6)
    for y in got:
        assert y.dtype == want.dtype and calc_diff(y, want) < 1e-6


def test_shard_map_over_some_of_the_mesh_axes(layer_inputs):
    """shard_map(..., axis_names={'ep'}) on a data x expert mesh failed with a bare
    AssertionError from jnp.searchsorted in the pool layout."""
    hidden, router, weights, _ = layer_inputs
    mesh = jax.make_mesh((2, 4), ("data", "ep"), axis_types=(AxisType.Auto,) * 2)
    step = jax.shard_map(
        MegaMoE(topk=K, axis_name="ep"),
        mesh=mesh,
        in_specs=(P("ep"), P(), P("ep")),
        out_specs=P("ep"),
        axis_names={"ep"},
    )
    y = jax.jit(step)(hidden, router, weights)
    assert calc_diff(y, MegaMoE(topk=K)(hidden, router, weights)) < 1e-6


def test_eager_calls_compile_once():
    """An eager fp8_mega_moe or MegaMoE call traced and compiled the reference's lax.map body
    each time (~0.25 s on a CPU): a second call with the same shapes compiles nothing."""
    inp = make_inputs(4, m=16, h=H, i=INTER, e=E, k=K)
    args = [inp[n] for n in ("x", "x_scale", "topk_ids", "topk_weights", "weights")]
    hidden = jax.random.normal(jax.random.key(3), (16, H), jnp.bfloat16)
    router = jax.random.normal(jax.random.key(5), (H, E), jnp.float32)
    calls = [
        lambda: fp8_mega_moe(*args),
        lambda: MegaMoE(topk=K)(hidden, router, args[4]),
        functools.partial(fp8_mega_moe, *args, activation_clamp=2.0),
    ]
    for call in calls:
        call().block_until_ready()

    compiled = []

    class Compiles(logging.Handler):
        def emit(self, record):
            if record.getMessage().startswith("Compiling"):
                compiled.append(record.getMessage())

    handler = Compiles()
    logger = logging.getLogger("jax")
    logger.addHandler(handler)
    try:
        with jax.log_compiles():
            for call in calls:
                call().block_until_ready()
    finally:
        logger.removeHandler(handler)
    assert compiled == []
