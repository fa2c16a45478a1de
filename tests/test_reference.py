"""The pure-JAX reference against the independent float64 oracle, on one device and under
expert parallelism over host devices."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from oracle import moe_f64

from jax_megamoe import calc_diff, fp8_mega_moe, reference_mega_moe
from jax_megamoe.testing import ROUTINGS, make_inputs

SMALL = dict(h=256, i=128, e=16, k=4)


def oracle(inp, **kw):
    w = inp["weights"]
    return moe_f64(inp["x"], inp["x_scale"], inp["topk_ids"], inp["topk_weights"], *w, **kw)


def run_single(inp, **kw):
    fn = jax.jit(functools.partial(fp8_mega_moe, impl="reference", **kw))
    return fn(inp["x"], inp["x_scale"], inp["topk_ids"], inp["topk_weights"], inp["weights"])


def run_ep(inp, num_ranks, **kw):
    mesh = Mesh(np.array(jax.devices()[:num_ranks]), ("ep",))
    fn = functools.partial(fp8_mega_moe, axis_name="ep", impl="reference", **kw)
    step = jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=P("ep"), out_specs=P("ep")))
    args = [inp[n] for n in ("x", "x_scale", "topk_ids", "topk_weights", "weights")]
    args = jax.device_put(args, NamedSharding(mesh, P("ep")))
    return step(*args)


@pytest.mark.parametrize("routing", ROUTINGS)
def test_single_device_matches_f64_oracle(routing):
    inp = make_inputs(10 + ROUTINGS.index(routing), m=48, routing=routing, **SMALL)
    y = run_single(inp)
    assert y.dtype == jnp.bfloat16 and y.shape == (48, 256)
    ref = oracle(inp)
    assert np.abs(ref).max() > 0.1  # the check is not on a trivial output
    assert calc_diff(y, ref) <= 1e-5


def test_ideal_and_mirror_bounds():
    inp = make_inputs(20, m=64, **SMALL)
    ideal = oracle(inp, requant=False)
    mirror = run_single(inp)
    assert calc_diff(mirror, oracle(inp)) <= 1e-5
    assert 1e-6 < calc_diff(mirror, ideal) <= 2e-3  # the requant is real and within bound
    no_requant = reference_mega_moe(
        inp["x"],
        inp["x_scale"],
        inp["topk_ids"],
        inp["topk_weights"],
        inp["weights"],
        requant=False,
    )
    assert calc_diff(no_requant, ideal) <= 1e-5


def test_activation_clamp():
    inp = make_inputs(21, m=32, **SMALL)
    inp["x_scale"] = inp["x_scale"] * 40.0  # large activations so the clamp bites
    y = run_single(inp, activation_clamp=2.0)
    ref = oracle(inp, clamp=2.0)
    assert calc_diff(y, ref) <= 1e-5
    assert calc_diff(y, oracle(inp)) > 1e-3


def test_masked_slots_add_nothing():
    inp = make_inputs(22, m=24, routing="masked", **SMALL)
    ids = np.asarray(inp["topk_ids"])
    y = np.asarray(run_single(inp).astype(jnp.float32))
    dead = np.all((ids < 0) | (ids >= SMALL["e"]), axis=1)
    assert dead.any() and not dead.all()
    assert np.all(y[dead] == 0.0)
    # dropping the masked slots' weights changes nothing
    inp2 = dict(inp, topk_weights=jnp.where(jnp.asarray(ids) < 0, 123.0, inp["topk_weights"]))
    np.testing.assert_array_equal(np.asarray(run_single(inp2).astype(jnp.float32)), y)


def test_single_token():
    inp = make_inputs(23, m=1, **SMALL)
    assert calc_diff(run_single(inp), oracle(inp)) <= 1e-5


@pytest.mark.parametrize("num_ranks", [2, 4, 8])
@pytest.mark.parametrize("routing", ["uniform", "masked", "hot", "one_rank", "skewed"])
def test_expert_parallel_equals_single_device(num_ranks, routing):
    m = 8 * num_ranks  # 8 tokens per rank
    inp = make_inputs(30 + num_ranks, m=m, routing=routing, num_ranks=num_ranks, **SMALL)
    single = run_single(inp)
    ep = run_ep(inp, num_ranks)
    np.testing.assert_array_equal(
        np.asarray(ep).view(np.uint16) & 0x7FFF, np.asarray(single).view(np.uint16) & 0x7FFF
    )
    assert calc_diff(ep, oracle(inp)) <= 1e-5


def test_expert_parallel_hot_expert_uneven_tokens():
    # all tokens of all 8 ranks send a slot to one expert; the other slots are uneven
    inp = make_inputs(40, m=8 * 5, routing="hot", num_ranks=8, h=256, i=256, e=32, k=6)
    assert calc_diff(run_ep(inp, 8), oracle(inp)) <= 1e-5
