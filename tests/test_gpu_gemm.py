"""The two grouped FP8 GEMM kernels alone (``grouped_gemm_l1`` / ``grouped_gemm_l2``) against a
pure-JAX f32 computation per expert, on Hopper GPUs (``pytest -m gpu``; skipped elsewhere).

Pools hold fresh random data everywhere (padding rows included), experts with uneven counts
(0, 1, 64, 65 rows, ...), and poisoned row blocks past ``num_blocks``: they name a real expert
and real destinations in ``y``, so an L2 that ran them would overwrite rows that are checked.
"""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_megamoe import calc_diff, dequantize, quantize_per_token
from jax_megamoe.constants import BLOCK_M, EXPERT_ALIGN_M
from jax_megamoe.grouped_gemm import grouped_gemm_l1, grouped_gemm_l2
from jax_megamoe.pool import pool_layout, pool_rows
from jax_megamoe.quant import row_calc_diff
from jax_megamoe.reference import _swiglu
from jax_megamoe.testing import ROW_DIFF_BOUND, make_weights

pytestmark = pytest.mark.gpu

HIGHEST = jax.lax.Precision.HIGHEST
# name: (hidden, intermediate, per-expert row counts)
SHAPES = {
    "small": (512, 256, (0, 64, 65, 37)),
    # H % 256 != 0: L2 takes its 128-column tiles.
    "narrow": (384, 384, (65, 0, 130)),
    "dsv3": (7168, 2048, (0, 64, 65, 200, 1, 130, 7, 300)),
    # L1's swap-AB tail: an expert's last block rides along with its last full pair when it
    # has at most 16 rows (144: 16, 257: 1), not with 17 (145) or without a full pair before it
    # (16, 64 + 16 = 80 is a pair).
    "tails": (512, 256, (144, 145, 257, 16, 80, 0, 271)),
    # 25 pairs: more than the last 16 that the kernels claim most expensive first (pairs with a
    # tail, full pairs, lone blocks; scheduler/sm90_grouped_tiles.cuh), so both orders run, and
    # every kind of pair is among those 16.
    "sorted_end": (512, 256, (144, 64, 257, 300, 130, 16, 200, 271, 65, 400, 137, 30)),
}
EXTRA_BLOCKS = 2  # poisoned row blocks past num_blocks


@functools.cache
def weights_for(h, i, e, device_index=0, seed=0):
    w = make_weights(jax.random.key(seed), num_experts=e, hidden=h, intermediate=i)
    return jax.device_put(w, jax.devices("gpu")[device_index])


class Pool:
    """One random pool in expert order, its layout, and each row's destination in ``y``."""

    def __init__(self, seed, counts, h, i, device=None, align_m=EXPERT_ALIGN_M):
        self.counts = tuple(int(c) for c in counts)
        rows = pool_rows(self.counts, align_m) + EXTRA_BLOCKS * BLOCK_M
        layout = pool_layout(self.counts, rows, align_m=align_m)
        rng = np.random.default_rng(seed)
        valid = np.asarray(layout.row_valid)
        self.rows, self.n = rows, int(valid.sum())
        self.starts = [int(s) for s in np.asarray(layout.starts)]
        nb = int(np.asarray(layout.num_blocks)[0])
        # Valid rows in expert order (the order of the reference's concatenation).
        self.valid_idx = np.concatenate(
            [np.arange(s, s + c) for s, c in zip(self.starts, self.counts, strict=True)]
        )

        x = rng.standard_normal((rows, h)).astype(np.float32)
        x[:, rng.integers(h)] *= 8.0  # an outlier channel: block scales differ
        v = rng.standard_normal((rows, i)).astype(np.float32) * 0.3
        v[:, rng.integers(i)] *= 8.0
        row_weight = rng.uniform(0.05, 1.0, rows).astype(np.float32)
        row_weight[~valid] = np.nan  # padding rows must not leak into real ones
        dest = np.full(rows, -1, np.int32)
        dest[valid] = rng.permutation(self.n)  # L2 scatters to a shuffled order
        block_expert = np.asarray(layout.block_expert).copy()
        block_expert[nb:] = rng.integers(len(self.counts), size=len(block_expert) - nb)
        dest[nb * BLOCK_M :] = rng.integers(self.n, size=rows - nb * BLOCK_M)

        put = functools.partial(jax.device_put, device=device)
        self.a, self.a_scale = (put(t) for t in quantize_per_token(jnp.asarray(x)))
        self.act_in, self.act_in_scale = (put(t) for t in quantize_per_token(jnp.asarray(v)))
        self.row_weight = put(row_weight)
        self.dest = dest
        self.row_src = put(dest)
        self.block_expert = put(block_expert.astype(np.int32))
        self.num_blocks = put(np.asarray(layout.num_blocks))

    def l1(self, w, clamp=None, num_ctas=0):
        return grouped_gemm_l1(
            self.a,
            self.a_scale,
            self.row_weight,
            self.row_src,
            self.block_expert,
            self.num_blocks,
            w.w1,
            w.w1_scale,
            activation_clamp=clamp,
            num_ctas=num_ctas,
        )

    def l2(self, w, act, act_scale, num_ctas=0):
        return grouped_gemm_l2(
            act,
            act_scale,
            self.row_src,
            self.block_expert,
            self.num_blocks,
            w.w2,
            w.w2_scale,
            out_rows=self.n,
            num_ctas=num_ctas,
        )

    def segments(self):
        pairs = zip(self.starts, self.counts, strict=True)
        return [(e, s, c) for e, (s, c) in enumerate(pairs) if c]


def reference_l1(pool, w, clamp):
    """Dequantized act of the valid rows, in expert order: f32 GEMM, SwiGLU, routing weight,
    1x128 requant."""

    @jax.jit
    def run(a, a_scale, rw, w1, w1s):
        xf = dequantize(a, a_scale)
        outs = []
        for e, s, c in pool.segments():
            h = jnp.dot(xf[s : s + c], dequantize(w1[e], w1s[e]).T, precision=HIGHEST)
            v = _swiglu(h, clamp) * rw[s : s + c, None]
            outs.append(dequantize(*quantize_per_token(v)))
        return jnp.concatenate(outs)

    return run(pool.a, pool.a_scale, pool.row_weight, w.w1, w.w1_scale)


def reference_l2(pool, w, act, act_scale):
    """f32 ``y`` [n, H]: each valid row's GEMM stored at its destination."""

    @jax.jit
    def run(act, act_scale, w2, w2s):
        af = dequantize(act, act_scale)
        return jnp.concatenate(
            [
                jnp.dot(af[s : s + c], dequantize(w2[e], w2s[e]).T, precision=HIGHEST)
                for e, s, c in pool.segments()
            ]
        )

    out = np.asarray(run(act, act_scale, w.w2, w.w2_scale))
    y = np.zeros_like(out)
    y[pool.dest[pool.valid_idx]] = out
    return y


def valid_act(pool, act, act_scale):
    return np.asarray(dequantize(act, act_scale))[pool.valid_idx]


def check_l1(pool, w, clamp=None, label=""):
    act, act_scale = pool.l1(w, clamp)
    assert act.dtype == jnp.float8_e4m3fn and act_scale.dtype == jnp.float32
    got = valid_act(pool, act, act_scale)
    want = np.asarray(reference_l1(pool, w, clamp))
    assert np.isfinite(got).all()
    assert (np.asarray(act_scale)[pool.valid_idx] > 0).all()
    assert np.abs(want).max() > 0
    diff = calc_diff(got, want)
    worst_row = float(row_calc_diff(got, want).max())
    print(f"L1 {label}: calc_diff {diff:.2e} over {pool.n} rows, worst row {worst_row:.2e}")
    assert diff <= 1e-4, (label, diff)
    assert worst_row <= ROW_DIFF_BOUND, (label, worst_row)
    return act, act_scale


def check_l2(pool, w, act, act_scale, label=""):
    y = pool.l2(w, act, act_scale)
    assert y.shape == (pool.n, w.w2.shape[1]) and y.dtype == jnp.bfloat16
    got = np.asarray(y, np.float32)
    want = reference_l2(pool, w, act, act_scale)
    assert np.isfinite(got).all()
    assert np.abs(want).max() > 0
    diff = calc_diff(got, want)
    worst_row = float(row_calc_diff(got, want).max())
    print(f"L2 {label}: calc_diff {diff:.2e} over {pool.n} rows, worst row {worst_row:.2e}")
    assert diff <= 1e-4, (label, diff)
    assert worst_row <= ROW_DIFF_BOUND, (label, worst_row)
    return y


@pytest.mark.parametrize("name", list(SHAPES))
def test_l1_matches_reference(name):
    h, i, counts = SHAPES[name]
    w = weights_for(h, i, len(counts))
    pool = Pool(11, counts, h, i)
    check_l1(pool, w, label=name)


def test_l1_activation_clamp():
    h, i, counts = SHAPES["small"]
    pool = Pool(12, counts, h, i)
    check_l1(pool, weights_for(h, i, len(counts)), clamp=1.5, label="small clamp 1.5")


@pytest.mark.parametrize("name", ["small", "tails"])
def test_l1_extreme_gates(name):
    """Gates far below -88 (where exp(-g) overflows f32) beside moderate ones in the same row.
    L1's SwiGLU takes one reciprocal for two values of a row, 1 / d0 = d1 / (d0 d1); without its
    cap on the exponent an overflowing d0 makes the other value NaN. Half of the gate rows are
    -448 (the e4m3 maximum) on positive activations, so those gates are -150 ... -600; they
    alternate with random rows such that every pair the epilogue takes holds one of each:
    columns 32 q + j and 32 q + 16 + j in a pair's tile, 2 k and 2 k + 1 in a tail's."""
    h, i, counts = SHAPES[name]
    w = weights_for(h, i, len(counts))
    col = np.arange(i)
    extreme = (col % 32 < 16) ^ (col % 2 == 1)
    w1 = np.array(w.w1)
    w1[:, np.flatnonzero(extreme), :] = -448.0
    w = w._replace(w1=jax.device_put(w1, w.w1.devices().pop()))
    pool = Pool(19, counts, h, i)
    x = jnp.abs(dequantize(pool.a, pool.a_scale)) * 4.0
    pool.a, pool.a_scale = quantize_per_token(x)
    xs = np.asarray(dequantize(pool.a, pool.a_scale))
    for e, s, c in pool.segments():  # the premise: every pair holds an overflowing gate
        gate = xs[s : s + c] @ np.asarray(dequantize(w.w1[e], w.w1_scale[e]))[:i].T
        assert gate[:, extreme].max() < -100 and np.median(np.abs(gate[:, ~extreme])) < 20
    check_l1(pool, w, label=f"{name} extreme gates")


@pytest.mark.parametrize("name", list(SHAPES))
def test_l2_matches_reference(name):
    h, i, counts = SHAPES[name]
    w = weights_for(h, i, len(counts))
    pool = Pool(13, counts, h, i)
    check_l2(pool, w, pool.act_in, pool.act_in_scale, label=name)


@pytest.mark.parametrize("name", ["small", "dsv3", "tails"])
def test_l1_then_l2(name):
    """L2 on L1's real output (the fused layer's data path, without dispatch/combine)."""
    h, i, counts = SHAPES[name]
    w = weights_for(h, i, len(counts))
    pool = Pool(14, counts, h, i)
    act, act_scale = check_l1(pool, w, label=f"{name} chained")
    check_l2(pool, w, act, act_scale, label=f"{name} chained")


@pytest.mark.parametrize("name", ["small", "dsv3", "tails", "sorted_end"])
def test_pairs_straddling_two_experts(name):
    """Experts on every 64-row block (not the dispatch's 128): a CTA's pair of row blocks may
    name two experts and num_blocks may be odd; each block must still get its own expert."""
    h, i, counts = SHAPES[name]
    w = weights_for(h, i, len(counts))
    pool = Pool(18, counts, h, i, align_m=BLOCK_M)
    experts = np.asarray(pool.block_expert)[: int(np.asarray(pool.num_blocks)[0])]
    assert (experts[0::2][: len(experts[1::2])] != experts[1::2]).any()
    act, act_scale = check_l1(pool, w, label=f"{name} 64-aligned")
    check_l2(pool, w, act, act_scale, label=f"{name} 64-aligned")


def test_jit_layout_grid_size_and_determinism():
    """Both kernels in one jit with the layout computed on the device and the indices promised
    in range, against eager calls (default mode "drop"): bit-identical, for the default grid and
    for a small persistent grid."""
    h, i, counts = SHAPES["small"]
    w = weights_for(h, i, len(counts))
    pool = Pool(15, counts, h, i)
    rows = pool.rows

    @functools.partial(jax.jit, static_argnames="num_ctas")
    def both(counts, a, a_scale, rw, row_src, w, num_ctas=0):
        layout = pool_layout(counts, rows)
        src = jnp.where(layout.row_valid, row_src, -1)
        act, act_scale = grouped_gemm_l1(
            a,
            a_scale,
            rw,
            src,
            layout.block_expert,
            layout.num_blocks,
            w.w1,
            w.w1_scale,
            num_ctas=num_ctas,
            mode="promise_in_bounds",
        )
        y = grouped_gemm_l2(
            act,
            act_scale,
            src,
            layout.block_expert,
            layout.num_blocks,
            w.w2,
            w.w2_scale,
            out_rows=pool.n,
            num_ctas=num_ctas,
            mode="promise_in_bounds",
        )
        return act, act_scale, y

    args = (jnp.asarray(counts, jnp.int32), pool.a, pool.a_scale, pool.row_weight, pool.row_src, w)
    act, act_scale, y = both(*args)
    eager_act, eager_scale = pool.l1(w)
    v = pool.valid_idx
    np.testing.assert_array_equal(
        np.asarray(act).view(np.uint8)[v], np.asarray(eager_act).view(np.uint8)[v]
    )
    np.testing.assert_array_equal(np.asarray(act_scale)[v], np.asarray(eager_scale)[v])
    # The poisoned blocks past num_blocks are -1 in the jitted layout; y must not depend on it.
    eager_y = pool.l2(w, eager_act, eager_scale)
    np.testing.assert_array_equal(
        np.asarray(y).view(np.uint16), np.asarray(eager_y).view(np.uint16)
    )
    for n in (1, 3):
        _, _, y_small_grid = both(*args, num_ctas=n)
        np.testing.assert_array_equal(
            np.asarray(y_small_grid).view(np.uint16), np.asarray(y).view(np.uint16)
        )
    for _ in range(50):  # repeated calls (command buffers replay after the first runs)
        again = both(*args)[2]
    np.testing.assert_array_equal(np.asarray(again).view(np.uint16), np.asarray(y).view(np.uint16))


def test_no_blocks():
    """num_blocks = 0: no block is read or written. Every block names an expert far past w1/w2
    and every row a destination far past y, so touching any of them would fault; the next full
    calls on the same GPU then give bitwise the output of the ones before."""
    h, i, counts = SHAPES["small"]
    w = weights_for(h, i, len(counts))
    pool = Pool(16, counts, h, i)
    before = np.asarray(pool.l2(w, *pool.l1(w))).view(np.uint16)
    far_experts = jnp.full(pool.block_expert.shape, 1 << 20, jnp.int32)
    far_rows = jnp.full(pool.row_src.shape, 1 << 28, jnp.int32)
    zero = jnp.zeros((1,), jnp.int32)
    # Promised in range, so the far values reach the kernels ("drop" would make them -1).
    act, act_scale = grouped_gemm_l1(
        pool.a,
        pool.a_scale,
        pool.row_weight,
        far_rows,
        far_experts,
        zero,
        w.w1,
        w.w1_scale,
        mode="promise_in_bounds",
    )
    y = grouped_gemm_l2(
        act,
        act_scale,
        far_rows,
        far_experts,
        zero,
        w.w2,
        w.w2_scale,
        out_rows=pool.n,
        mode="promise_in_bounds",
    )
    assert y.shape == (pool.n, h)
    jax.block_until_ready(y)  # a kernel that touched a block would fault here
    if os.environ.get("JAX_MEGAMOE_POISON_OUTPUTS") == "1":  # conftest's: nothing written
        assert np.isnan(np.asarray(act, np.float32)).all()
        assert np.isnan(np.asarray(y, np.float32)).all()
    after = np.asarray(pool.l2(w, *pool.l1(w))).view(np.uint16)
    np.testing.assert_array_equal(after, before)


def test_out_of_range_indices_are_skipped():
    """Default mode "drop": the blocks of one expert name an expert past w1/w2 and some rows of
    the others a destination past y; those blocks and rows are skipped (nothing read past the
    weights, nothing stored past y), and every other row is right."""
    h, i, counts = SHAPES["small"]
    w = weights_for(h, i, len(counts))
    pool = Pool(20, counts, h, i)
    want_act = np.asarray(reference_l1(pool, w, None))  # valid rows in expert order
    want_y = reference_l2(pool, w, pool.act_in, pool.act_in_scale)
    e_far, s_far, c_far = pool.segments()[0]
    block_expert = np.asarray(pool.block_expert).copy()
    block_expert[s_far // BLOCK_M : -(-(s_far + c_far) // BLOCK_M)] = 1 << 20
    others = pool.valid_idx[(pool.valid_idx < s_far) | (pool.valid_idx >= s_far + c_far)]
    far_rows = np.random.default_rng(20).choice(others, 9, replace=False)
    dest = pool.dest.copy()
    dest[far_rows] = pool.n + np.arange(9) * 1000  # just past y, and far past it
    args = (jax.device_put(dest), jax.device_put(block_expert.astype(np.int32)), pool.num_blocks)

    act, act_scale = grouped_gemm_l1(
        pool.a, pool.a_scale, pool.row_weight, args[0], args[1], args[2], w.w1, w.w1_scale
    )
    got = valid_act(pool, act, act_scale)
    kept = (pool.valid_idx < s_far) | (pool.valid_idx >= s_far + c_far)
    assert calc_diff(got[kept], want_act[kept]) <= 1e-4
    assert float(row_calc_diff(got[kept], want_act[kept]).max()) <= ROW_DIFF_BOUND

    y = grouped_gemm_l2(pool.act_in, pool.act_in_scale, *args, w.w2, w.w2_scale, out_rows=pool.n)
    y = np.asarray(y, np.float32)
    stored = np.setdiff1d(others, far_rows)
    rows = pool.dest[stored]
    assert calc_diff(y[rows], want_y[rows]) <= 1e-4
    assert float(row_calc_diff(y[rows], want_y[rows]).max()) <= ROW_DIFF_BOUND
    if os.environ.get("JAX_MEGAMOE_POISON_OUTPUTS") == "1":  # conftest's: the rest not written
        skipped = np.setdiff1d(np.arange(pool.n), rows)
        assert len(skipped) == c_far + 9
        assert np.isnan(y[skipped]).all()
        assert np.isnan(np.asarray(act, np.float32)[s_far : s_far + c_far]).all()


def test_every_gpu():
    """Kernels are prepared and run on each local GPU, not only the first."""
    h, i, counts = SHAPES["small"]
    for index, device in enumerate(jax.devices("gpu")):
        w = weights_for(h, i, len(counts), device_index=index)
        pool = Pool(17 + index, counts, h, i, device=device)
        act, act_scale = check_l1(pool, w, label=f"GPU {index}")
        assert act.devices() == {device}
        check_l2(pool, w, act, act_scale, label=f"GPU {index}")


def test_shape_errors_are_reported():
    h, i, counts = SHAPES["small"]
    w = weights_for(h, i, len(counts))
    pool = Pool(18, counts, h, i)
    bad_scale = jnp.ones((pool.rows, h // 128 + 1), jnp.float32)
    # Caught at trace time: the FFI handler's own shape checks are a second line of defence.
    with pytest.raises(ValueError, match="grouped_gemm_l1: a_scale has shape"):
        grouped_gemm_l1(
            pool.a,
            bad_scale,
            pool.row_weight,
            pool.row_src,
            pool.block_expert,
            pool.num_blocks,
            w.w1,
            w.w1_scale,
        )
    with pytest.raises(ValueError, match="multiple of 64"):
        grouped_gemm_l2(
            pool.act_in[:-1],
            pool.act_in_scale[:-1],
            pool.row_src[:-1],
            pool.block_expert,
            pool.num_blocks,
            w.w2,
            w.w2_scale,
        )
