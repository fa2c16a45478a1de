import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from oracle import quantize_rows

from jax_megamoe import calc_diff, dequantize, fp8_mega_moe, quantize_blockwise, quantize_per_token
from jax_megamoe.quant import row_calc_diff
from jax_megamoe.testing import make_inputs


@pytest.mark.parametrize("seed", [0, 1])
def test_per_token_matches_formula(seed):
    rng = np.random.default_rng(seed)
    v = rng.standard_normal((5, 384)).astype(np.float32) * rng.uniform(0.01, 100, (5, 1))
    v[2, 128:256] = 0.0  # an all-zero block takes the 1e-4 floor
    q, s = quantize_per_token(jnp.asarray(v))
    q_ref, s_ref = quantize_rows(v.astype(np.float64))
    assert q.dtype == jnp.float8_e4m3fn and s.dtype == jnp.float32
    assert s.shape == (5, 3)
    np.testing.assert_array_equal(np.asarray(s), s_ref)
    np.testing.assert_array_equal(np.asarray(q).view(np.uint8), q_ref.view(np.uint8))
    assert float(s[2, 1]) == np.float32(1e-4) / np.float32(448)


def test_per_token_round_trip_error_is_fp8_sized():
    rng = np.random.default_rng(3)
    v = rng.standard_normal((64, 512)).astype(np.float32)
    back = dequantize(*quantize_per_token(jnp.asarray(v)))
    assert 1e-5 < calc_diff(back, v) < 1e-3
    # e4m3 keeps 3 mantissa bits: relative error per element at most 2^-4 (above subnormals)
    big = np.abs(v) > 0.05 * np.abs(v).max()
    assert np.max(np.abs(np.asarray(back) - v)[big] / np.abs(v)[big]) <= 2**-4 + 1e-6


def test_amax_maps_to_448():
    rng = np.random.default_rng(4)
    v = rng.standard_normal((3, 128)).astype(np.float32)
    q, _ = quantize_per_token(jnp.asarray(v))
    qf = np.asarray(q).astype(np.float32)
    np.testing.assert_array_equal(np.abs(qf).max(-1), 448.0)


def test_rounding_is_nearest_even():
    # 448 / 2^k-spaced values: 17 lies halfway between 16 and 18 in e4m3 (spacing 2), so the
    # even mantissa (16) wins; 19 goes to 20.
    v = np.zeros((1, 128), np.float32)
    v[0, :4] = [448.0, 17.0, 19.0, -17.0]
    v[0, 4:] = 1.0
    q, s = quantize_per_token(jnp.asarray(v))
    assert float(s[0, 0]) == 1.0
    got = np.asarray(q).astype(np.float32)[0, :4]
    np.testing.assert_array_equal(got, [448.0, 16.0, 20.0, -16.0])
    assert ml_dtypes.float8_e4m3fn(17.0) == 16.0  # the same rule as ml_dtypes


def test_blockwise_matches_formula():
    rng = np.random.default_rng(5)
    w = rng.standard_normal((2, 256, 384)).astype(np.float32)
    q, s = quantize_blockwise(jnp.asarray(w))
    assert s.shape == (2, 2, 3)
    blocks = w.reshape(2, 2, 128, 3, 128)
    s_ref = np.maximum(np.abs(blocks).max((2, 4)), np.float32(1e-4)) / np.float32(448)
    np.testing.assert_array_equal(np.asarray(s), s_ref)
    q_ref = np.clip(blocks / s_ref[:, :, None, :, None], -448, 448).astype(ml_dtypes.float8_e4m3fn)
    np.testing.assert_array_equal(
        np.asarray(q).view(np.uint8), q_ref.reshape(w.shape).view(np.uint8)
    )
    back = dequantize(q, s)
    assert calc_diff(back, w) < 1e-3


@pytest.mark.parametrize(
    "fn, shape",
    [
        (quantize_per_token, (4, 100)),
        (quantize_blockwise, (128, 100)),
        (quantize_blockwise, (100, 128)),
    ],
)
def test_quantize_rejects_non_multiple_of_128(fn, shape):
    with pytest.raises(ValueError, match="multiple of 128"):
        fn(jnp.ones(shape, jnp.float32))


def test_too_few_dimensions_are_named():
    with pytest.raises(ValueError, match="quantize_per_token: x must have at least one dimension"):
        quantize_per_token(jnp.float32(1.0))
    with pytest.raises(ValueError, match="quantize_blockwise: w must have at least two dimensions"):
        quantize_blockwise(jnp.ones((256,)))
    q, s = quantize_per_token(jnp.ones((4, 256)))
    with pytest.raises(ValueError, match=r"dequantize: q \(4, 256\) and scale \(8,\) need"):
        dequantize(q, s.reshape(-1))
    with pytest.raises(ValueError, match="row_calc_diff: shapes .* must be one"):
        row_calc_diff(np.ones(4), np.ones(4))


def test_dequantize_rejects_mismatched_scale():
    q, s = quantize_per_token(jnp.ones((4, 256)))
    with pytest.raises(ValueError, match="tile"):
        dequantize(q, s[:, :1].repeat(3, axis=1))


def test_calc_diff_properties():
    rng = np.random.default_rng(6)
    a = rng.standard_normal(1000)
    assert calc_diff(a, a) == pytest.approx(0.0, abs=1e-15)
    assert calc_diff(a, -a) == pytest.approx(2.0)
    assert calc_diff(a, 2 * a) == pytest.approx(1 - 4 / 5)
    assert calc_diff(np.zeros(3), np.zeros(3)) == 0.0
    with pytest.raises(ValueError, match="shapes differ"):
        calc_diff(a, a[:10])


def test_calc_diff_at_any_magnitude_and_on_non_finite_input():
    """Scaled before the sums: tiny values do not underflow into "identical", huge ones do not
    overflow into NaN. A NaN or infinity in either input gives NaN, so a bound check fails."""
    a = np.random.default_rng(7).standard_normal(100)
    for scale in (1e-200, 1e200):
        assert calc_diff(a * scale, -a * scale) == pytest.approx(2.0)
        assert calc_diff(a * scale, 2 * a * scale) == pytest.approx(1 - 4 / 5)
    for bad in (np.nan, np.inf):
        b = a.copy()
        b[3] = bad
        assert np.isnan(calc_diff(a, b)) and np.isnan(calc_diff(b, a))


def test_dequantize_empty_round_trip():
    q, s = quantize_per_token(jnp.zeros((0, 256)))
    assert dequantize(q, s).shape == (0, 256)
    with pytest.raises(ValueError, match="tile"):
        dequantize(jnp.zeros((4, 256), jnp.float8_e4m3fn), jnp.zeros((4, 0)))


def test_quantization_under_vmap_is_the_formula():
    """Under jax.vmap the divisor's broadcast had gained its batch dimension outside the
    optimization barrier, and XLA turned the division into a multiply by the reciprocal: over
    half of these scales came out one ulp off (106 of 192); and so did the layer's output."""
    rng = np.random.default_rng()
    x = rng.standard_normal((6, 12, 256)) * rng.uniform(1e-3, 1e3, (6, 12, 1))
    x = jnp.asarray(x, jnp.float32)
    for transform in (lambda f: f, jax.jit):
        q, scale = transform(jax.vmap(quantize_per_token))(x)
        for b in range(x.shape[0]):
            want_q, want_scale = quantize_rows(np.asarray(x[b], np.float64))
            np.testing.assert_array_equal(np.asarray(scale[b]), want_scale)
            np.testing.assert_array_equal(np.asarray(q[b]).view(np.uint8), want_q.view(np.uint8))
    inp = make_inputs(3, m=16, h=256, i=128, e=8, k=2)
    names = ("x", "x_scale", "topk_ids", "topk_weights")
    batch = [make_inputs(s, m=16, h=256, i=128, e=8, k=2) for s in (4, 5)]
    stacked = [jnp.stack([b[n] for b in batch]) for n in names]
    y = jax.jit(jax.vmap(lambda *a: fp8_mega_moe(*a, inp["weights"])))(*stacked)
    for j, b in enumerate(batch):
        one = fp8_mega_moe(*(b[n] for n in names), inp["weights"])
        np.testing.assert_array_equal(np.asarray(y[j], np.float32), np.asarray(one, np.float32))


def test_a_nan_makes_its_blocks_scale_nan_at_every_size():
    """The formula's amax of a block with a NaN is NaN. XLA:CPU's max over 4096 or more values
    skipped the NaN: a 128 x 128 weight block got the floor scale and its other values
    saturated to +-448, and a per-token scale depended on the array's size."""
    rng = np.random.default_rng(7)
    w = rng.standard_normal((256, 256)).astype(np.float32)
    w[127, 127] = np.nan  # the last value of block (0, 0)
    q, s = quantize_blockwise(jnp.asarray(w))
    s = np.asarray(s)
    assert np.isnan(s[0, 0]) and np.isfinite(np.delete(s.ravel(), 0)).all()
    q_clean, s_clean = quantize_blockwise(jnp.asarray(np.nan_to_num(w)))
    np.testing.assert_array_equal(
        np.delete(s.ravel(), 0), np.delete(np.asarray(s_clean).ravel(), 0)
    )
    for m in (16, 64):  # 2048 and 8192 values
        x = rng.standard_normal((m, 128)).astype(np.float32)
        x[0, 5] = np.nan
        q, s = quantize_per_token(jnp.asarray(x))
        assert np.isnan(np.asarray(s)[0, 0]) and np.isfinite(np.asarray(s)[1:]).all()
        assert np.isnan(np.asarray(q[0], np.float32)).all()  # v / NaN
