"""The fused SM90 path against the mirror reference on Hopper GPUs (``pytest -m gpu``; skipped
elsewhere). On a GPU machine, benchmarks/device_run.sh builds and runs them in one command."""

import functools
import os
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jax_megamoe import calc_diff, fp8_mega_moe, quantize_per_token
from jax_megamoe.constants import GATHER_ROWS_PER_EXPERT, MAX_LOCAL_EXPERTS, ROUTE_BLOCKS_PER_SM
from jax_megamoe.quant import row_calc_diff
from jax_megamoe.testing import (
    ROW_DIFF_BOUND,
    make_activations,
    make_buffer,
    make_routing,
    make_weights,
)

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks"))
import timing  # noqa: E402  (benchmarks/timing.py: kernels from the profiler's trace)

pytestmark = pytest.mark.gpu

SMALL = dict(h=512, i=256, e=16, k=4)
DSV3 = dict(h=7168, i=2048, e=256, k=8)


def gpus():
    return [d for d in jax.devices("gpu")]


@functools.cache
def weights_for(h, i, e, seed=0):
    return make_weights(jax.random.key(seed), num_experts=e, hidden=h, intermediate=i)


class Runner:
    """fused / reference / ideal for one mesh over ``num_ranks`` GPUs and one buffer."""

    def __init__(self, num_ranks, dims, max_tokens, clamp=None, sm_budget=0):
        self.dims = dims
        self.mesh = Mesh(np.array(gpus()[:num_ranks]), ("ep",))
        self.buffer = make_buffer(self.mesh, dims, max_tokens, sm_budget=sm_budget)
        assert self.buffer.allocated and self.buffer.nbytes_per_rank > 0
        self.clamp = clamp
        w = weights_for(dims["h"], dims["i"], dims["e"])
        self.weights = jax.device_put(w, NamedSharding(self.mesh, P("ep")))
        self.step = {impl: self._compile(impl) for impl in ("fused", "reference")}

    def _compile(self, impl):
        fn = functools.partial(
            fp8_mega_moe, axis_name="ep", impl=impl, buffer=self.buffer, activation_clamp=self.clamp
        )
        return jax.jit(jax.shard_map(fn, mesh=self.mesh, in_specs=P("ep"), out_specs=P("ep")))

    def inputs(self, seed, m, routing="uniform"):
        r = self.mesh.size
        d = self.dims
        x, x_scale = make_activations(jax.random.key(seed), m * r, d["h"])
        rng = np.random.default_rng(seed)
        ids, tw = make_routing(rng, m * r, d["e"], d["k"], routing, r)
        sharding = NamedSharding(self.mesh, P("ep"))
        return [jax.device_put(a, sharding) for a in (x, x_scale, ids, tw)]

    def __call__(self, impl, args):
        return self.step[impl](*args, self.weights)

    def close(self):
        self.buffer.close()


def check(runner, seed, m, routing="uniform"):
    args = runner.inputs(seed, m, routing)
    fused = runner("fused", args)
    ref = runner("reference", args)
    assert fused.shape == ref.shape and fused.dtype == jnp.bfloat16
    assert bool(jnp.all(jnp.isfinite(fused.astype(jnp.float32))))
    assert float(jnp.max(jnp.abs(ref.astype(jnp.float32)))) > 0.0 or routing == "masked"
    diff = calc_diff(fused, ref)
    worst_row = float(row_calc_diff(fused, ref).max())
    print(
        f"R={runner.mesh.size} M={m} {routing}: calc_diff fused vs mirror {diff:.2e}, "
        f"worst row {worst_row:.2e}"
    )
    assert diff <= 1e-4, (m, routing, diff)
    assert worst_row <= ROW_DIFF_BOUND, (m, routing, worst_row)
    return fused, ref


@pytest.fixture(scope="module", params=[1, 2, 4], ids=lambda r: f"R{r}")
def small(request):
    if len(gpus()) < request.param:
        pytest.skip(f"needs {request.param} GPUs")
    r = Runner(request.param, SMALL, max_tokens=256)
    yield r
    r.close()


@pytest.mark.parametrize("m", [1, 7, 128, 256])
@pytest.mark.parametrize("routing", ["uniform", "masked", "hot", "one_rank", "skewed"])
def test_small_shape(small, m, routing):
    check(small, seed=m * 7 + len(routing), m=m, routing=routing)


def test_tails_ride_along(small):
    """132 tokens per rank with slot 0 of every token on one expert: 132 R rows, so that expert
    ends in a block of 4, 8 or 16 rows (R = 1, 2, 4) after a full pair, which L1 computes inside
    that pair's tiles (the swap-AB tail), and L2, launched under L1, runs as a lone tile once
    L1's counts of that block say both warpgroups of its tail have stored it."""
    check(small, seed=11, m=132, routing="hot")


def test_bitwise_stable_over_repeated_calls(small):
    args = small.inputs(5, 64)
    first = np.asarray(small("fused", args))
    for _ in range(200):
        out = small("fused", args)
    np.testing.assert_array_equal(np.asarray(out).view(np.uint16), first.view(np.uint16))


def kernels_of_one_call(runner, args):
    t = timing.time_calls(lambda *a: runner("fused", a), [args], iters=3, warmup=1)
    assert t.source == "profiler", t.source
    return " ".join(t.kernel_totals)


def test_kernels_of_one_call(small):
    """What one call enqueues, from the profiler's trace (docs/design.md §3.2): route count and
    fill, L1, L2 and combine, and the stage and the two epoch syncs only where there are peers
    to stage for and wait for; with one rank and a block per token, route count and fill are
    one launch (route_alone), which decides the call."""
    names = kernels_of_one_call(small, small.inputs(8, 64))
    peers = small.mesh.size > 1
    route = ("route_count_kernel", "route_fill_kernel") if peers else ("route_alone_kernel",)
    for kernel in (*route, "combine_kernel", "sm90_fp8_mega_moe_l1", "sm90_fp8_mega_moe_l2"):
        assert kernel in names, (kernel, names)
    assert ("route_alone_kernel" in names) != peers, names
    assert ("stage_kernel" in names) == peers, names
    assert ("epoch_sync_kernel" in names) == peers, names


def check_one_rank_paths(last_m, extra, check_kernels):
    """One rank at the last M of one path (extra 0) or the first of the next (extra 1): the
    kernels of one call (check_kernels(m, names)), the mirror on all three routings, then the
    other path and this one again, all on one buffer."""
    m = last_m + extra
    r = Runner(1, SMALL, max_tokens=last_m + 1)
    try:
        check_kernels(m, kernels_of_one_call(r, r.inputs(3, m)))
        for routing in ("uniform", "hot", "skewed"):
            check(r, seed=m + len(routing), m=m, routing=routing)
        check(r, seed=5, m=m + 1 - 2 * extra)
        check(r, seed=6, m=m)
    finally:
        r.close()


@pytest.mark.parametrize("extra", [0, 1])
def test_one_rank_route_paths(extra):
    """With one rank, route_alone takes the call up to ROUTE_BLOCKS_PER_SM tokens per SM (a block
    each), and route_count + route_fill above that (whose counters must be zero after
    route_alone's calls)."""

    def check_kernels(m, names):
        assert ("route_alone_kernel" in names) == (extra == 0), (m, names)
        assert ("route_count_kernel" in names) == (extra == 1), (m, names)

    check_one_rank_paths(ROUTE_BLOCKS_PER_SM * gpus()[0].core_count, extra, check_kernels)


@pytest.mark.parametrize("extra", [0, 1])
def test_one_rank_gather_paths(extra):
    """With one rank and a block per token, L1 reads A from the tokens' own rows (route_alone
    copies none into the pool) while the local experts average at most half a row block of rows
    (GATHER_ROWS_PER_EXPERT), and from the pool that route_alone fills above that."""
    gather = extra == 0

    def check_kernels(m, names):
        assert ("route_alone_kernel<false>" in names) == gather, (m, names)
        assert ("route_alone_kernel<true>" in names) != gather, (m, names)
        assert bool(re.search(r"mega_moe_l1<\d+, true>", names)) == gather, (m, names)

    check_one_rank_paths(GATHER_ROWS_PER_EXPERT * SMALL["e"] // SMALL["k"], extra, check_kernels)


def test_most_local_experts():
    """MAX_LOCAL_EXPERTS experts on one rank, on both route paths: route_alone keeps three ints
    per local expert in shared memory, 48 KiB here, more than a launch gets unless its kernel
    opts in (launch/runtime.cu); route_count keeps two."""
    alone_m = ROUTE_BLOCKS_PER_SM * gpus()[0].core_count
    r = Runner(1, dict(h=256, i=128, e=MAX_LOCAL_EXPERTS, k=8), max_tokens=alone_m + 1)
    try:
        for m, route in ((64, "route_alone_kernel"), (alone_m + 1, "route_count_kernel")):
            assert route in kernels_of_one_call(r, r.inputs(m, m)), (m, route)
            for routing in ("uniform", "hot"):
                check(r, seed=m + len(routing), m=m, routing=routing)
    finally:
        r.close()


def test_two_layers_share_one_buffer_in_one_jit(small):
    fn = functools.partial(fp8_mega_moe, axis_name="ep", buffer=small.buffer, impl="fused")
    ref = functools.partial(fp8_mega_moe, axis_name="ep", impl="reference")

    def two_layers(x, xs, ids, tw, w):
        y1 = fn(x, xs, ids, tw, w)
        x2, xs2 = quantize_per_token(y1)
        return y1, x2, xs2, fn(x2, xs2, ids, tw, w)

    sm = functools.partial(jax.shard_map, mesh=small.mesh, in_specs=P("ep"), out_specs=P("ep"))
    x, xs, ids, tw = small.inputs(6, 32)
    y1, x2, xs2, y2 = jax.jit(sm(two_layers))(x, xs, ids, tw, small.weights)
    # Layer 2 is checked on the input layer 1 really produced: FP8 requantization of a
    # slightly different bf16 y1 would amplify bf16 rounding into FP8 rounding flips.
    ref_step = jax.jit(sm(ref))
    assert calc_diff(y1, ref_step(x, xs, ids, tw, small.weights)) <= 1e-4
    assert calc_diff(y2, ref_step(x2, xs2, ids, tw, small.weights)) <= 1e-4


def test_inside_scan(small):
    """The layer in a lax.scan body, typed and computed like the reference there."""

    def scanned(impl):
        buffer = small.buffer if impl == "fused" else None

        def body(x, xs, ids, tw, w):
            def step(carry, i):
                ids_i = (ids + i) % small.dims["e"]
                y = fp8_mega_moe(x, xs, ids_i, tw, w, axis_name="ep", buffer=buffer, impl=impl)
                return carry + y.astype(jnp.float32), None

            # The body reads this rank's tokens, so its carry varies over "ep" (JAX's scan rule
            # under shard_map); the fused result must be typed so too, or the carry types differ.
            init = jax.lax.pcast(jnp.zeros(x.shape, jnp.float32), ("ep",), to="varying")
            return jax.lax.scan(step, init, jnp.arange(3))[0]

        sm = jax.shard_map(body, mesh=small.mesh, in_specs=P("ep"), out_specs=P("ep"))
        return jax.jit(sm)

    args = small.inputs(7, 16)
    got = scanned("fused")(*args, small.weights)
    want = scanned("reference")(*args, small.weights)
    assert calc_diff(got, want) <= 1e-4


@pytest.fixture(scope="module")
def budget8(small):
    r = Runner(small.mesh.size, SMALL, max_tokens=256, sm_budget=8)
    yield r
    r.close()


@pytest.mark.parametrize("m", [7, 256])
@pytest.mark.parametrize("routing", ["uniform", "hot"])
def test_sm_budget(budget8, m, routing):
    """A budget of 8 SMs, where every grid is sized to it, no kernel overlaps another
    (programmatic launches need the whole device) and route_fill hands a token to a warp once
    the tokens outnumber the budget's blocks (256 > 8 x 4), to a block below that (7): the
    results are checked, not the grids."""
    check(budget8, seed=m * 5 + len(routing), m=m, routing=routing)


def test_activation_clamp(small):
    r = Runner(small.mesh.size, SMALL, max_tokens=32, clamp=1.5)
    try:
        check(r, seed=8, m=32)
    finally:
        r.close()


@pytest.mark.parametrize("num_ranks", [1, 2, 4])
def test_deepseek_v3_shape(num_ranks):
    if len(gpus()) < num_ranks:
        pytest.skip(f"needs {num_ranks} GPUs")
    r = Runner(num_ranks, DSV3, max_tokens=128)
    try:
        for m, routing in [(1, "uniform"), (7, "masked"), (128, "uniform"), (128, "hot")]:
            fused, ref = check(r, seed=m, m=m, routing=routing)
        ideal = jax.jit(
            jax.shard_map(
                functools.partial(_ideal, axis_name="ep"),
                mesh=r.mesh,
                in_specs=P("ep"),
                out_specs=P("ep"),
            )
        )(*r.inputs(128, 128, "hot"), r.weights)
        assert calc_diff(fused, ideal) <= 2e-3
        assert calc_diff(ref, ideal) <= 2e-3
    finally:
        r.close()


def _ideal(x, xs, ids, tw, w, axis_name):
    from jax_megamoe import reference_mega_moe

    return reference_mega_moe(x, xs, ids, tw, w, axis_name=axis_name, requant=False)
