"""Every trace-time validation error of the public API, and the inference-only guard."""

import functools
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from jax_megamoe import SymmBuffer, _ffi, fp8_mega_moe, transform_weights
from jax_megamoe.constants import MAX_GEMM_CTAS
from jax_megamoe.grouped_gemm import grouped_gemm_l1, grouped_gemm_l2, in_range_or_skip
from jax_megamoe.testing import make_inputs

DIMS = dict(h=256, i=128, e=8, k=2)
CPU_MESH = Mesh(np.array(jax.devices()[:4]), ("ep",))


@pytest.fixture(scope="module")
def inp():
    return make_inputs(0, m=16, **DIMS)


def call(inp, **overrides):
    args = {**inp, **{k: v for k, v in overrides.items() if k in inp}}
    kw = {k: v for k, v in overrides.items() if k not in inp}
    kw.setdefault("impl", "reference")
    return jax.eval_shape(
        functools.partial(fp8_mega_moe, **kw),
        args["x"],
        args["x_scale"],
        args["topk_ids"],
        args["topk_weights"],
        args["weights"],
    )


def test_valid_call_traces(inp):
    out = call(inp)
    assert out.shape == (16, 256) and out.dtype == jnp.bfloat16


@pytest.mark.parametrize(
    "field, value, error, match",
    [
        ("x", jnp.zeros((16, 256), jnp.bfloat16), TypeError, "x has dtype bfloat16"),
        ("x", jnp.zeros((2, 16, 256), jnp.float8_e4m3fn), ValueError, r"x must be \[M, H\]"),
        ("x_scale", jnp.ones((16, 3), jnp.float32), ValueError, "x_scale has shape"),
        ("x_scale", jnp.ones((16, 2), jnp.bfloat16), TypeError, "x_scale has dtype"),
        ("topk_ids", jnp.zeros((16, 2), jnp.float32), TypeError, "topk_ids has dtype"),
        ("topk_ids", jnp.zeros((15, 2), jnp.int32), ValueError, "topk_ids has shape"),
        ("topk_ids", jnp.zeros((16,), jnp.int32), ValueError, r"topk_ids must be \[M, K\]"),
        ("topk_weights", jnp.ones((16, 3), jnp.float32), ValueError, "topk_weights has shape"),
        ("topk_weights", jnp.ones((16, 2), jnp.int32), TypeError, "topk_weights has dtype"),
        ("x", jnp.zeros((0, 256), jnp.float8_e4m3fn), ValueError, "at least one token"),
    ],
)
def test_bad_operands(inp, field, value, error, match):
    if field == "x" and value.shape[0] == 0:
        inp = {
            **inp,
            "x_scale": jnp.ones((0, 2)),
            "topk_ids": jnp.zeros((0, 2), jnp.int32),
            "topk_weights": jnp.ones((0, 2)),
        }
    with pytest.raises(error, match=match):
        call(inp, **{field: value})


def test_hidden_mismatch_between_x_and_weights(inp):
    x = jnp.zeros((16, 384), jnp.float8_e4m3fn)
    with pytest.raises(ValueError, match="x has hidden 384 but the weights have hidden 256"):
        call(inp, x=x, x_scale=jnp.ones((16, 3)))


@pytest.mark.parametrize(
    "h, i, bad, good", [(200, 128, "hidden", "intermediate"), (256, 100, "intermediate", "hidden")]
)
def test_dimensions_must_be_multiples_of_128(h, i, bad, good):
    """The error names the dimension that is wrong, and only that one."""
    value = {"hidden": h, "intermediate": i}[bad]
    with pytest.raises(
        ValueError, match=rf"{bad} \({value}\) must be a positive multiple of 128"
    ) as e:
        transform_weights(
            jnp.zeros((2, 2 * i, h), jnp.float8_e4m3fn),
            jnp.ones((2, max(1, 2 * i // 128), max(1, h // 128))),
            jnp.zeros((2, h, i), jnp.float8_e4m3fn),
            jnp.ones((2, max(1, h // 128), max(1, i // 128))),
        )
    assert good not in str(e.value)


def test_weights_report_their_dimensions():
    w = make_inputs(1, m=8, h=384, i=256, e=3, k=2)["weights"]
    assert (w.num_local_experts, w.hidden, w.intermediate) == (3, 384, 256)


def test_weights_wrong_scale_shape_and_type(inp):
    w = inp["weights"]
    with pytest.raises(ValueError, match="w2_scale has shape"):
        transform_weights(w.w1, w.w1_scale, w.w2, w.w2_scale[:, :1])
    with pytest.raises(TypeError, match="w1 has dtype"):
        transform_weights(w.w1.astype(jnp.bfloat16), w.w1_scale, w.w2, w.w2_scale)
    with pytest.raises(TypeError, match="MoEWeights made by transform_weights"):
        call(inp, weights=tuple(w))


def test_topk_larger_than_experts():
    inp = make_inputs(1, m=4, h=256, i=128, e=2, k=2)
    inp["topk_ids"] = jnp.zeros((4, 3), jnp.int32)
    inp["topk_weights"] = jnp.ones((4, 3), jnp.float32)
    with pytest.raises(ValueError, match=r"topk \(3\) must be in \[1, min\(num_experts=2, 32\)\]"):
        call(inp)


def test_unknown_axis_name(inp):
    with pytest.raises(ValueError, match="axis_name 'experts' is not bound"):
        call(inp, axis_name="experts")


def test_bad_impl_and_clamp(inp):
    with pytest.raises(ValueError, match="impl must be one of"):
        call(inp, impl="triton")
    with pytest.raises(ValueError, match="activation_clamp must be positive"):
        call(inp, activation_clamp=0.0)


def test_fused_needs_extension_buffer_and_hopper(inp):
    if not _ffi.extension_available():
        reason = _ffi.missing_extension_reason(Path(_ffi.__file__).parent, _ffi._LOAD_ERROR)
        with pytest.raises(RuntimeError, match=re.escape(reason)):
            call(inp, impl="fused")
        return
    with pytest.raises(ValueError, match="needs buffer=SymmBuffer.create"):
        call(inp, impl="fused")
    buf = SymmBuffer.create(
        Mesh(np.array(jax.devices()[:1]), ("ep",)),
        "ep",
        num_experts=8,
        hidden=256,
        intermediate=128,
        topk=2,
        max_tokens_per_rank=16,
    )
    assert not buf.allocated  # CPU devices: capacity only
    with pytest.raises(ValueError, match="needs Hopper"):
        call(inp, impl="fused", buffer=buf)


def test_token_count_over_buffer_capacity(inp):
    buf = SymmBuffer.create(
        Mesh(np.array(jax.devices()[:1]), ("ep",)),
        "ep",
        num_experts=8,
        hidden=256,
        intermediate=128,
        topk=2,
        max_tokens_per_rank=8,
    )
    with pytest.raises(ValueError, match="16 tokens per rank exceed the buffer's capacity of 8"):
        call(inp, buffer=buf)


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("hidden", 512, "hidden=512"),
        ("topk", 1, "topk=1"),
        ("intermediate", 256, "intermediate=256"),
    ],
)
def test_buffer_shape_mismatch(inp, field, value, match):
    dims = dict(num_experts=8, hidden=256, intermediate=128, topk=2, max_tokens_per_rank=64)
    dims[field] = value
    buf = SymmBuffer.create(Mesh(np.array(jax.devices()[:1]), ("ep",)), "ep", **dims)
    with pytest.raises(ValueError, match=match):
        call(inp, buffer=buf)


def test_buffer_rank_count_must_match_axis(inp):
    buf = SymmBuffer.create(
        CPU_MESH,
        "ep",
        num_experts=8,
        hidden=256,
        intermediate=128,
        topk=2,
        max_tokens_per_rank=64,
    )
    with pytest.raises(
        ValueError,
        match="buffer has 4 ranks, the call runs over 1: call fp8_mega_moe inside jax.shard_map "
        "over 'ep' with axis_name='ep'",
    ):
        call(inp, buffer=buf)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_experts=10), r"num_experts \(10\) must be divisible by the expert-axis size"),
        (dict(topk=9), r"topk \(9\) must be in"),
        (dict(hidden=300), "positive multiple of 128"),
        (dict(max_tokens_per_rank=0), r"max_tokens_per_rank must be in \[1,"),
    ],
)
def test_buffer_create_validation(kwargs, match):
    dims = dict(num_experts=8, hidden=256, intermediate=128, topk=2, max_tokens_per_rank=8)
    with pytest.raises(ValueError, match=match):
        SymmBuffer.create(CPU_MESH, "ep", **{**dims, **kwargs})
    with pytest.raises(ValueError, match="is not an axis of the mesh"):
        SymmBuffer.create(CPU_MESH, "tp", **dims)


def test_gradient_raises(inp):
    def loss(scale):
        y = fp8_mega_moe(
            inp["x"], scale, inp["topk_ids"], inp["topk_weights"], inp["weights"], impl="reference"
        )
        return jnp.sum(y.astype(jnp.float32))

    with pytest.raises(NotImplementedError, match="inference-only"):
        jax.grad(loss)(inp["x_scale"])


def test_standalone_gemm_operands_checked_at_trace_time():
    """The checks run before the extension is needed: they hold on every install."""
    rows, h, i, e = 128, 256, 128, 2
    f8 = jnp.float8_e4m3fn
    args = dict(
        a=jnp.zeros((rows, h), f8),
        a_scale=jnp.ones((rows, h // 128)),
        row_weight=jnp.ones((rows,)),
        row_src=jnp.zeros((rows,), jnp.int32),
        block_expert=jnp.zeros((rows // 64,), jnp.int32),
        num_blocks=jnp.int32(2),
        w1=jnp.zeros((e, 2 * i, h), f8),
        w1_scale=jnp.ones((e, 2 * i // 128, h // 128)),
    )
    with pytest.raises(ValueError, match="grouped_gemm_l1: row_weight has shape"):
        grouped_gemm_l1(**{**args, "row_weight": jnp.ones((rows - 1,))})
    with pytest.raises(ValueError, match=r"block_expert has shape \(3,\), expected \(2,\)"):
        grouped_gemm_l1(**{**args, "block_expert": jnp.zeros((3,), jnp.int32)})
    with pytest.raises(TypeError, match="grouped_gemm_l1: a has dtype"):
        grouped_gemm_l1(**{**args, "a": jnp.zeros((rows, h), jnp.bfloat16)})
    for bad, error in ((-1, ValueError), (MAX_GEMM_CTAS + 1, ValueError), (2.0, TypeError)):
        with pytest.raises(error, match=f"grouped_gemm_l1: num_ctas .*{bad!r}"):
            grouped_gemm_l1(**args, num_ctas=bad)
    l2_args = (
        jnp.zeros((rows, i), f8),
        jnp.ones((rows, i // 128)),
        args["row_src"],
        args["block_expert"],
        args["num_blocks"],
        jnp.zeros((e, h, i), f8),
    )
    with pytest.raises(ValueError, match="grouped_gemm_l2: w2_scale has shape"):
        grouped_gemm_l2(*l2_args, jnp.ones((e, h // 128, 2)))
    with pytest.raises(ValueError, match=f"grouped_gemm_l2: num_ctas .*{MAX_GEMM_CTAS}"):
        grouped_gemm_l2(*l2_args, jnp.ones((e, h // 128, i // 128)), num_ctas=MAX_GEMM_CTAS + 1)
    for bad in ("clip", None):
        with pytest.raises(ValueError, match="grouped_gemm_l1: mode must be one of"):
            grouped_gemm_l1(**args, mode=bad)
        with pytest.raises(ValueError, match="grouped_gemm_l2: mode must be one of"):
            grouped_gemm_l2(*l2_args, jnp.ones((e, h // 128, i // 128)), mode=bad)


def test_standalone_gemms_without_a_hopper_gpu_fail_at_trace_time(monkeypatch):
    """With the extension built but no Hopper GPU (JAX on the CPU, as in these tests) the call
    traced, and failed only when run: "No FFI handler registered for jax_megamoe_l1_gemm on a
    platform Host"."""
    from jax_megamoe import grouped_gemm as gg

    class Ext:
        def prepare_standalone(self, ordinal):
            raise AssertionError("no device to prepare")

    monkeypatch.setattr(_ffi, "extension", lambda: Ext())
    gg.prepare_standalone.cache_clear()
    rows, h, i, e = 128, 256, 128, 2
    f8 = jnp.float8_e4m3fn
    pool = (jnp.zeros((rows, h), f8), jnp.ones((rows, h // 128)), jnp.ones((rows,)))
    index = (jnp.zeros((rows,), jnp.int32), jnp.zeros((rows // 64,), jnp.int32), 2)
    w1 = (jnp.zeros((e, 2 * i, h), f8), jnp.ones((e, 2 * i // 128, h // 128)))
    with pytest.raises(RuntimeError, match=r"run only on a Hopper \(SM90\) GPU, .* \['cpu'\]"):
        jax.jit(gg.grouped_gemm_l1).lower(*pool, *index, *w1)
    act = (jnp.zeros((rows, i), f8), jnp.ones((rows, i // 128)))
    w2 = (jnp.zeros((e, h, i), f8), jnp.ones((e, h // 128, i // 128)))
    with pytest.raises(RuntimeError, match=r"run only on a Hopper \(SM90\) GPU"):
        gg.grouped_gemm_l2(*act, *index, *w2)


def test_standalone_gemms_pass_their_indices_through_the_drop(monkeypatch):
    """What each GEMM hands its FFI call (the call stubbed on CPU): experts bounded by the
    weights' E, L2's destinations by out_rows, L1's row_src untouched (only its sign counts);
    under "promise_in_bounds" all three as given."""
    from jax_megamoe import grouped_gemm as gg

    seen = []

    def call_varying(call, *operands, **attributes):
        seen.append(operands)
        return (jnp.zeros((1,)),) * 3

    class Ext:
        L1_GEMM_TARGET, L2_GEMM_TARGET = "l1_stub", "l2_stub"

    monkeypatch.setattr(_ffi, "call_varying", call_varying)
    monkeypatch.setattr(_ffi, "extension", lambda: Ext())
    monkeypatch.setattr(_ffi, "register_targets", lambda: None)
    monkeypatch.setattr(gg, "prepare_standalone", lambda: None)
    rows, h, i, e, out_rows = 256, 256, 128, 3, 200
    f8 = jnp.float8_e4m3fn
    src = jnp.asarray(np.r_[-1, 0, 199, 200, 255, 10**6, np.arange(250)], jnp.int32)
    experts = jnp.asarray([0, 2, 3, -5], jnp.int32)
    a, a_scale = jnp.zeros((rows, h), f8), jnp.ones((rows, h // 128))
    w1, w1s = jnp.zeros((e, 2 * i, h), f8), jnp.ones((e, 2 * i // 128, h // 128))
    act, act_scale = jnp.zeros((rows, i), f8), jnp.ones((rows, i // 128))
    w2, w2s = jnp.zeros((e, h, i), f8), jnp.ones((e, h // 128, i // 128))
    for mode in ("drop", "promise_in_bounds"):
        seen.clear()
        gg.grouped_gemm_l1(a, a_scale, jnp.ones((rows,)), src, experts, 4, w1, w1s, mode=mode)
        gg.grouped_gemm_l2(act, act_scale, src, experts, 4, w2, w2s, out_rows=out_rows, mode=mode)
        (l1_src, l1_experts), (l2_src, l2_experts) = seen[0][3:5], seen[1][2:4]
        drop = mode == "drop"
        np.testing.assert_array_equal(l1_src, src)
        want_experts = [0, 2, -1, -1] if drop else [0, 2, 3, -5]
        for got in (l1_experts, l2_experts):
            np.testing.assert_array_equal(got, want_experts)
        want_src = np.where((src >= 0) & (src < out_rows), src, -1) if drop else src
        np.testing.assert_array_equal(l2_src, want_src)


def test_standalone_gemm_indices_out_of_range_are_skipped():
    """The kernels skip negative experts and destinations only: "drop" makes every other value
    out of range negative first (on a GPU, test_gpu_gemm.py checks what the kernels then do)."""
    rng = np.random.default_rng(5)
    index = jnp.asarray(rng.integers(-(2**31), 2**31, 1000), jnp.int32)
    index = index.at[:8].set(jnp.asarray([-(2**31), -2, -1, 0, 6, 7, 8, 2**31 - 1], jnp.int32))
    got = np.asarray(in_range_or_skip(index, 8, "drop"))
    want = np.where((np.asarray(index) >= 0) & (np.asarray(index) < 8), np.asarray(index), -1)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(got[:8], [-1, -1, -1, 0, 6, 7, -1, -1])
    assert in_range_or_skip(index, 8, "promise_in_bounds") is index
