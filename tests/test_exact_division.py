"""The L1 epilogue's division by a requantization scale (``ScaleDivisor`` in
csrc/include/jax_megamoe/epilogue/fp8_quant.cuh) gives the IEEE quotient bit for bit.

The kernel divides every value v of a 1x128 group by the group's scale s as
``y = RN(1/s)``, ``q0 = RN(v y)``, ``r = RN(q0 s - v)`` (one FMA), ``q = RN(q0 - r y)`` (one
FMA), instead of an IEEE division per value, because the numerics contract (docs/design.md
§2.1) says v / s is an IEEE division. These tests run the same steps in exact rational
arithmetic, each rounded once to float32 as the GPU's FMUL and FFMA round, and compare with the
correctly rounded quotient over the scales the epilogue can produce."""

import math
from fractions import Fraction

import ml_dtypes
import numpy as np
import pytest

E4M3_MAX = 448.0
MIN_AMAX = 1e-4


def rn32(x: Fraction) -> float:
    """x rounded to the nearest float32 (ties to even), subnormals and overflow included."""
    if x == 0:
        return 0.0
    sign = -1.0 if x < 0 else 1.0
    a = abs(x)
    e = a.numerator.bit_length() - a.denominator.bit_length()
    if Fraction(2) ** e > a:  # now 2^e <= a < 2^(e+1)
        e -= 1
    quantum = Fraction(2) ** (max(e, -126) - 23)
    n = round(a / quantum)  # Fraction.__round__ rounds half to even
    value = n * quantum
    if value >= Fraction(2) ** 128:
        return sign * math.inf
    return sign * float(value)


def f32(x: float) -> float:
    return float(np.float32(x))


def divide_like_the_kernel(v: float, s: float) -> float:
    """ScaleDivisor(s).quotient(v) for a finite scale, every step rounded to float32."""
    y = rn32(1 / Fraction(s))
    q0 = rn32(Fraction(v) * Fraction(y))
    r = rn32(Fraction(q0) * Fraction(s) - Fraction(v))
    if q0 == 0 and r == 0:  # zeros: the sign rules of IEEE addition, as the FMA applies them
        return math.copysign(0.0, v)
    return rn32(Fraction(q0) - Fraction(r) * Fraction(y))


def e4m3(q: float) -> int:
    clipped = np.float32(min(max(q, -E4M3_MAX), E4M3_MAX))
    return int(clipped.astype(ml_dtypes.float8_e4m3fn).view(np.uint8))


def scale_of(amax: float) -> float:
    return rn32(Fraction(f32(max(amax, MIN_AMAX))) / Fraction(E4M3_MAX))


def cases(rng, n):
    """(v, s) pairs: amax log-uniform over the whole float32 range, v uniform in [-amax, amax],
    the group's own amax, values at e4m3 rounding midpoints, and tiny values."""
    for _ in range(n):
        amax = f32(10.0 ** rng.uniform(-40, 38.5))
        s = scale_of(amax)
        yield f32(rng.uniform(-1, 1) * amax), s
        yield -amax, s
        # A midpoint between two e4m3 values (here 1.0625 = 1 + 1/16, between 1 and 1.125),
        # times s, where a quotient off by one ulp rounds the other way.
        yield f32(1.0625 * s * (1 + rng.uniform(-1e-6, 1e-6))), s
        yield f32(rng.uniform(-1, 1) * 1e-40), s


def test_quotient_is_the_ieee_quotient():
    rng = np.random.default_rng(0)
    exact = 0
    for v, s in cases(rng, 3000):
        want = rn32(Fraction(v) / Fraction(s))
        got = divide_like_the_kernel(v, s)
        if abs(want) >= 2.0**-10:  # e4m3's rounding range: the float32 quotient itself
            assert np.float32(got).view(np.uint32) == np.float32(want).view(np.uint32), (v, s)
            exact += 1
        else:  # the residual may underflow here; the e4m3 value is a zero either way
            assert e4m3(got) == e4m3(want), (v, s, got, want)
    assert exact > 6000  # over half of the 12000 cases are in the range that matters


@pytest.mark.parametrize("v", [0.0, -0.0, 1e-30, -1e-30, 1.0, -1.0])
def test_zero_and_sign_for_finite_scales(v):
    s = scale_of(1.0)  # |v| <= amax = 1
    assert math.copysign(1.0, divide_like_the_kernel(v, s)) == math.copysign(1.0, v)


@pytest.mark.parametrize("v", [0.0, -0.0, 1.5, -3e38, math.inf, -math.inf, math.nan])
def test_infinite_scale_divides_as_v_over_inf(v):
    """amax = inf: the kernel takes y = RN(1/inf) = 0 and s = 0, so the steps give v * 0."""
    y, s = 0.0, 0.0
    q0 = v * y
    r = q0 * s - v  # exact here: the product is a zero, a NaN or an inf
    got = (-r) * y + q0
    want = v / math.inf if not math.isinf(v) else math.nan
    if math.isnan(want):
        assert math.isnan(got)
    else:
        assert got == want and math.copysign(1.0, got) == math.copysign(1.0, want)
