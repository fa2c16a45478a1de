"""Bad input to the public API that used to pass silently, or fail with an error from deep inside
JAX or Python: each now gets an error at trace time that names the operand and the problem."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jax_megamoe import (
    MegaMoE,
    MoEWeights,
    calc_diff,
    dequantize,
    fp8_mega_moe,
    init_weights,
    quantize_blockwise,
    quantize_per_token,
    reference_mega_moe,
    route,
)
from jax_megamoe.testing import make_inputs

DIMS = dict(h=256, i=128, e=8, k=2)
NAMES = ("x", "x_scale", "topk_ids", "topk_weights", "weights")


@pytest.fixture(scope="module")
def inp():
    return make_inputs(5, m=16, **DIMS)


def call(inp, **kwargs):
    return fp8_mega_moe(*(inp[n] for n in NAMES), **kwargs)


def test_weights_sharded_over_another_axis_than_the_expert_axis(inp):
    """On a data x expert mesh, weights sharded over the expert axis but the call told the data
    axis: every shape fits (2 local experts x 2 ranks is not checked against E without a buffer)
    and the layer was silently wrong. Replicated weights without a buffer likewise."""
    mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("dp", "ep"))
    tokens = P(("dp", "ep"))

    def traced(axis_name, weight_spec):
        fn = functools.partial(fp8_mega_moe, axis_name=axis_name)
        step = jax.shard_map(
            fn, mesh=mesh, in_specs=(tokens,) * 4 + (weight_spec,), out_specs=tokens
        )
        return jax.eval_shape(step, *(inp[n] for n in NAMES))

    with pytest.raises(ValueError, match=r"vary over \['ep'\], not sharded over .* 'dp'"):
        traced("dp", P("ep"))
    with pytest.raises(ValueError, match=r"same on every rank, not sharded over .* 'ep'"):
        traced("ep", P())
    assert traced("ep", P("ep")).shape == (16, DIMS["h"])


def test_weights_sharded_over_the_expert_axis_and_another(inp):
    """Weights split over data and expert axes with axis_name the expert axis alone: each rank
    took its 1 expert for a quarter of them (E = 4 of 8) and silently dropped every token routed
    past it (calc_diff 0.65). Over both axes named, the layer is right; over a size-1 axis the
    weights may vary freely."""
    mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("dp", "ep"))
    tokens = P(("dp", "ep"))

    def run(axis_name, weight_spec, mesh=mesh, tokens=tokens):
        fn = functools.partial(fp8_mega_moe, axis_name=axis_name)
        step = jax.shard_map(
            fn, mesh=mesh, in_specs=(tokens,) * 4 + (weight_spec,), out_specs=tokens
        )
        return jax.jit(step)(*(inp[n] for n in NAMES))

    with pytest.raises(ValueError, match=r"vary over \['dp'\] besides the expert axis 'ep'"):
        run("ep", P(("dp", "ep")))
    assert calc_diff(run(("dp", "ep"), P(("dp", "ep"))), call(inp)) < 1e-6
    one_dp = Mesh(np.array(jax.devices()[:4]).reshape(1, 4), ("dp", "ep"))
    y = run("ep", P(("dp", "ep")), mesh=one_dp)
    assert calc_diff(y, call(inp)) < 1e-6


def test_numpy_weights_called_eagerly(inp):
    """NumPy weight leaves (transform_weights accepts them) failed an eager call deep inside the
    reference with a TracerArrayConversionError; they worked under jit."""
    weights = MoEWeights(*(np.asarray(leaf) for leaf in inp["weights"]))
    y = fp8_mega_moe(*(inp[n] for n in NAMES[:4]), weights)
    np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(call(inp), np.float32))


def test_numpy_int64_ids_past_int32_are_refused(inp):
    """Without jax_enable_x64 JAX wraps int64 into int32: an out-of-range id (masked by
    contract) became a valid expert. In-range int64 ids still give the int32 result."""
    ids = np.asarray(inp["topk_ids"], np.int64)
    same = call({**inp, "topk_ids": ids})
    np.testing.assert_array_equal(np.asarray(same), np.asarray(call(inp)))
    ids[0, 0] = 2**32 + 1
    with pytest.raises(ValueError, match=r"topk_ids \(int64\) holds values outside int32"):
        call({**inp, "topk_ids": ids})


def test_numpy_uint64_ids_past_uint32_name_int32(inp):
    """JAX wraps uint64 into uint32; the error named uint32 as the fix, which the ids' dtype
    check then refuses: it must name int32, the dtype topk_ids takes."""
    ids = np.asarray(inp["topk_ids"], np.uint64)
    ids[0, 0] = 2**40
    with pytest.raises(ValueError, match=r"outside uint32, .* Pass int32 values"):
        call({**inp, "topk_ids": ids})


@pytest.mark.parametrize(
    "clamp, error, match",
    [
        (True, TypeError, "activation_clamp must be a positive number or None"),
        ("5", TypeError, "activation_clamp must be a positive number or None"),
        (jnp.array([5.0]), TypeError, "activation_clamp must be a positive number or None"),
        (float("nan"), ValueError, "activation_clamp must be positive"),
    ],
)
def test_activation_clamp_must_be_a_number(inp, clamp, error, match):
    with pytest.raises(error, match=match):
        call(inp, activation_clamp=clamp)


def test_activation_clamp_traced_or_as_numpy_scalar(inp):
    with pytest.raises(TypeError, match="activation_clamp is traced"):
        jax.jit(lambda c: call(inp, activation_clamp=c))(5.0)
    np.testing.assert_array_equal(
        np.asarray(call(inp, activation_clamp=np.float32(1.5))),
        np.asarray(call(inp, activation_clamp=1.5)),
    )


def test_buffer_axis_name_and_weight_leaves_are_typed(inp):
    with pytest.raises(TypeError, match="buffer must be a SymmBuffer .* got str"):
        call(inp, buffer="abc")
    with pytest.raises(TypeError, match="axis_name must be a mesh axis name .* got 0"):
        call(inp, axis_name=0)
    w = inp["weights"]
    with pytest.raises(TypeError, match="w1_scale must be a jax or numpy array, got NoneType"):
        call({**inp, "weights": MoEWeights(w.w1, None, w.w2, w.w2_scale)})


@pytest.fixture(scope="module")
def layer_inputs():
    router, weights = init_weights(jax.random.key(1), num_experts=8, hidden=256, intermediate=128)
    hidden = jax.random.normal(jax.random.key(2), (16, 256), jnp.bfloat16)
    return hidden, router, weights


@pytest.mark.parametrize(
    "topk, error, match, layer_match",
    [
        (
            9,
            ValueError,
            r"topk \(9\) must be in \[1, num_experts=8\]",
            r"topk \(9\) must be in \[1, min\(num_experts=8, 32\)\]",
        ),
        (0, ValueError, r"topk \(0\) must be in", None),
        (2.5, TypeError, "topk must be an int", None),
        (None, TypeError, "topk must be an int", None),
    ],
)
def test_route_and_layer_check_topk(layer_inputs, topk, error, match, layer_match):
    """``route`` takes any k up to E; the layer names the kernels' bound too, as
    ``fp8_mega_moe`` does."""
    hidden, router, weights = layer_inputs
    with pytest.raises(error, match=f"route: {match}"):
        route(hidden, router, topk)
    with pytest.raises(error, match=f"MegaMoE: {layer_match or match}"):
        MegaMoE(topk=topk)(hidden, router, weights)


def test_route_checks_the_router_and_hidden(layer_inputs):
    hidden, router, _ = layer_inputs
    with pytest.raises(ValueError, match=r"route: router_weight must be \[H, E\], got \(256,\)"):
        route(hidden, router[:, 0], 2)
    with pytest.raises(ValueError, match=r"router_weight \(255, 8\) must be \[H, E\] with"):
        route(hidden, router[:-1], 2)
    with pytest.raises(TypeError, match="hidden must be a jax or numpy array, got list"):
        route(np.asarray(hidden, np.float32).tolist(), router, 2)
    with pytest.raises(
        TypeError, match="route: hidden must be bfloat16, float16 or float32, got int32"
    ):
        route(hidden.astype(jnp.int32), router, 2)
    with pytest.raises(TypeError, match="router_weight must be bfloat16, .* got float8_e4m3fn$"):
        route(hidden, router.astype(jnp.float8_e4m3fn), 2)


@pytest.mark.parametrize("dtype", [jnp.float8_e4m3fn, jnp.float8_e5m2])
def test_fp8_hidden_is_refused_and_pointed_to_fp8_mega_moe(layer_inputs, dtype):
    """FP8 activations without their scales used to be upcast, routed and requantized as if
    they were the layer's bf16 input."""
    hidden, router, weights = layer_inputs
    match = (
        rf"MegaMoE: hidden must be bfloat16, float16 or float32, got {jnp.dtype(dtype).name} "
        r"\(FP8 tokens and their scales go to fp8_mega_moe\)"
    )
    with pytest.raises(TypeError, match=match):
        MegaMoE(topk=2)(hidden.astype(dtype), router, weights)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
def test_layer_takes_every_activation_dtype_it_names(layer_inputs, dtype):
    hidden, router, weights = layer_inputs
    """The output comes back in hidden's dtype (it was bf16 for every input, so an f16 or f32
    residual stream changed dtype, and a lax.scan carrying it failed)."""
    y = MegaMoE(topk=2)(hidden.astype(dtype), router, weights)
    y_bf16 = MegaMoE(topk=2)(hidden, router, weights)
    assert y.shape == hidden.shape and y.dtype == dtype
    assert calc_diff(y, y_bf16) < 1e-6  # the bf16 values, exactly representable in each dtype

    def layer_step(h, _):
        return h + MegaMoE(topk=2)(h, router, weights), None

    h = hidden.astype(dtype)
    assert jax.lax.scan(layer_step, h, length=2)[0].dtype == dtype


def test_megamoe_configuration_as_arrays_under_jit(layer_inputs):
    """jax.jit(layer) hashes the layer: a 0-d array as scaling or activation_clamp (accepted by
    the checks) failed with "unhashable type: 'ArrayImpl'"; they are now the numbers they hold."""
    hidden, router, weights = layer_inputs
    want = MegaMoE(topk=2, scaling=2.0, activation_clamp=3.0)(hidden, router, weights)
    layer = MegaMoE(topk=2, scaling=jnp.float32(2.0), activation_clamp=np.float32(3.0))
    assert layer.scaling == 2.0 and layer.activation_clamp == 3.0 and hash(layer)
    np.testing.assert_array_equal(
        np.asarray(jax.jit(layer)(hidden, router, weights)), np.asarray(want)
    )
    with pytest.raises(TypeError, match="MegaMoE: scaling is traced"):
        jax.jit(lambda s: MegaMoE(topk=2, scaling=s)(hidden, router, weights))(2.0)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(num_experts=-1), ValueError, r"num_experts must be in \[1,"),
        (dict(intermediate=0), ValueError, r"intermediate must be in \[1,"),
        (dict(hidden=256.0), TypeError, "hidden must be an int"),
        (dict(hidden=200), ValueError, r"init_weights: hidden \(200\) must be a positive multiple"),
        (dict(intermediate=96), ValueError, r"init_weights: intermediate \(96\) must be a "),
        (dict(std=float("nan")), ValueError, "std must be a positive, finite number"),
    ],
)
def test_init_weights_checks_its_arguments(kwargs, error, match):
    args = dict(num_experts=4, hidden=256, intermediate=128) | kwargs
    with pytest.raises(error, match=match):
        init_weights(jax.random.key(0), **args)


def test_explicit_sharding_outside_shard_map_says_to_use_shard_map(inp):
    """Under AxisType.Explicit the reference's repeats and gathers failed deep inside JAX
    ("Please pass sharding to jnp.repeat via out_sharding"); inside shard_map it is right."""
    mesh = jax.make_mesh((4,), ("ep",), axis_types=(AxisType.Explicit,), devices=jax.devices()[:4])
    sharded = jax.device_put([inp[n] for n in NAMES], NamedSharding(mesh, P("ep")))
    with jax.sharding.set_mesh(mesh):
        with pytest.raises(ValueError, match=r"x is explicitly sharded over \['ep'\]"):
            jax.jit(fp8_mega_moe)(*sharded)
        fn = functools.partial(fp8_mega_moe, axis_name="ep")
        step = jax.jit(jax.shard_map(fn, in_specs=(P("ep"),) * 5, out_specs=P("ep")))
        y = step(*sharded)
    assert calc_diff(y, call(inp)) < 1e-6


def test_megamoe_without_tokens_names_hidden(layer_inputs):
    hidden, router, weights = layer_inputs
    with pytest.raises(ValueError, match=r"MegaMoE: hidden must hold at least one token"):
        MegaMoE(topk=2)(hidden[:0], router, weights)


# --- Found by an audit of the public API on 2026-12-05: each passed silently or failed deep ---


def test_replicated_weights_with_replicated_tokens(inp):
    """The weights' typing was checked only when the tokens varied across ranks: with tokens and
    weights both replicated each rank took its copy for 1/4 of the experts (calc_diff 0.41 with
    ids past E masked on one device but not here), and on a data x expert mesh weights over the
    data axis failed inside lax.cond ("branches must have equal output types")."""
    mesh = Mesh(np.array(jax.devices()[:4]), ("ep",))

    def run(weight_spec, mesh=mesh, check_vma=True):
        fn = functools.partial(fp8_mega_moe, axis_name="ep")
        step = jax.shard_map(
            fn,
            mesh=mesh,
            in_specs=(P(),) * 4 + (weight_spec,),
            out_specs=P(mesh.axis_names),  # each rank's rows, stacked
            check_vma=check_vma,
        )
        return jax.jit(step)(*(inp[n] for n in NAMES))

    with pytest.raises(ValueError, match=r"\(w1\) are the same on every rank, not sharded over"):
        run(P())
    grid = Mesh(np.array(jax.devices()).reshape(2, 4), ("dp", "ep"))
    with pytest.raises(ValueError, match=r"\(w1\) vary over \['dp'\], not sharded over .* 'ep'"):
        run(P("dp"), mesh=grid)
    # Replicated tokens with sharded weights are a valid layer: every rank computes all tokens.
    # With check_vma off nothing is typed, so nothing can be checked (design.md §1.5).
    want = np.asarray(call(inp), np.float32)
    for check_vma in (True, False):
        got = np.asarray(run(P("ep"), check_vma=check_vma), np.float32).reshape(4, *want.shape)
        assert max(calc_diff(rows, want) for rows in got) < 1e-6


def test_a_tuple_axis_name_follows_the_mesh_order(inp):
    """Weights sharded P(('dp', 'ep')) with axis_name=('ep', 'dp'): each rank took another
    rank's experts (calc_diff 0.51), and the error for a forgotten axis_name advised a tuple in
    "the order of the weights' PartitionSpec", which the call cannot see."""
    mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("dp", "ep"))
    tokens = P(("dp", "ep"))

    def run(axis_name, fn=fp8_mega_moe):
        step = jax.shard_map(
            functools.partial(fn, axis_name=axis_name),
            mesh=mesh,
            in_specs=(tokens,) * 5,
            out_specs=tokens,
        )
        return jax.jit(step)(*(inp[n] for n in NAMES))

    fix = r"pass axis_name=\('dp', 'ep'\) and shard the weights with P\(\('dp', 'ep'\)\)"
    with pytest.raises(ValueError, match=r"axis_name \('ep', 'dp'\) must name .* order: " + fix):
        run(("ep", "dp"))
    with pytest.raises(ValueError, match=r"reference_mega_moe: axis_name \('ep', 'dp'\)"):
        run(("ep", "dp"), fn=reference_mega_moe)
    with pytest.raises(ValueError, match=r"once each, in the mesh's order: pass axis_name='ep'"):
        run(("ep", "ep"))
    assert calc_diff(run(("dp", "ep")), call(inp)) < 1e-6


def test_reference_mega_moe_checks_what_fp8_mega_moe_checks(inp):
    """The exported reference ran unchecked: a wrong x_scale gave calc_diff 0.86, fewer ids
    than tokens returned fewer rows, bf16 x ran as if FP8, and block_rows=0 divided by zero."""
    args = [inp[n] for n in NAMES]
    np.testing.assert_array_equal(
        np.asarray(reference_mega_moe(*args)), np.asarray(call(inp, impl="reference"))
    )
    bad = [
        (1, args[1][:, :1], ValueError, r"x_scale has shape \(16, 1\), expected \(16, 2\)"),
        (2, args[2][:8], ValueError, r"topk_ids has shape \(8, 2\), expected \(16, 2\)"),
        (0, args[0].astype(jnp.bfloat16), TypeError, "x has dtype bfloat16, expected float8"),
    ]
    for index, value, error, match in bad:
        with pytest.raises(error, match=match):
            reference_mega_moe(*args[:index], value, *args[index + 1 :])
    for kwargs, error, match in [
        (dict(activation_clamp=-1.0), ValueError, "activation_clamp must be positive"),
        (dict(block_rows=0), ValueError, r"reference_mega_moe: block_rows must be in \[1,"),
        (dict(requant="no"), TypeError, "reference_mega_moe: requant must be a bool"),
    ]:
        with pytest.raises(error, match=match):
            reference_mega_moe(*args, **kwargs)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(scaling=float("nan")), ValueError, "scaling must be finite, got nan"),
        (dict(scaling=float("inf")), ValueError, "scaling must be finite, got inf"),
        (dict(scaling="2.5"), TypeError, "scaling must be a real number, got '2.5'"),
        (dict(scaling=None), TypeError, "scaling must be a real number, got None"),
        (dict(scaling=True), TypeError, "scaling must be a real number, got True"),
        (dict(normalize="no"), TypeError, "normalize must be a bool or None, got 'no'"),
    ],
)
def test_route_options_are_checked(layer_inputs, kwargs, error, match):
    """A NaN scaling made every output NaN, a string one failed inside JAX, and normalize="no"
    (truthy) normalized."""
    hidden, router, weights = layer_inputs
    with pytest.raises(error, match="route: " + match):
        route(hidden, router, 2, **kwargs)
    with pytest.raises(error, match="MegaMoE: " + match):
        MegaMoE(topk=2, **kwargs)(hidden, router, weights)


def test_route_scaling_as_an_array_or_traced(layer_inputs):
    hidden, router, _ = layer_inputs
    want = np.asarray(route(hidden, router, 2, scaling=2.5)[1])
    assert np.abs(want).max() > 0
    for scaling in (np.float32(2.5), jnp.float32(2.5)):
        np.testing.assert_array_equal(
            np.asarray(route(hidden, router, 2, scaling=scaling)[1]), want
        )
    traced = jax.jit(lambda s: route(hidden, router, 2, scaling=s)[1])(2.5)
    np.testing.assert_allclose(np.asarray(traced), want, rtol=1e-6)


def test_only_the_token_count_may_be_symbolic(inp):
    """A symbolic topk or expert count failed inside a later comparison: "Symbolic dimension
    comparison 'k' <= '16' is inconclusive"."""
    scope = export.SymbolicScope()

    def spec(shape, dtype):
        return jax.ShapeDtypeStruct(export.symbolic_shape(shape, scope=scope), dtype)

    h, e = DIMS["h"], DIMS["e"]
    tokens = [
        spec(f"m, {h}", jnp.float8_e4m3fn),
        spec(f"m, {h // 128}", jnp.float32),
        spec("m, k", jnp.int32),
        spec("m, k", jnp.float32),
    ]
    step = jax.jit(fp8_mega_moe)
    with pytest.raises(ValueError, match=r"topk_ids' topk \(K\) is the symbolic dimension k"):
        export.export(step)(*tokens, inp["weights"])
    k = DIMS["k"]
    tokens[2:] = [spec(f"m, {k}", jnp.int32), spec(f"m, {k}", jnp.float32)]
    w = inp["weights"]
    weights = MoEWeights(
        spec(f"e, {w.w1.shape[1]}, {h}", w.w1.dtype),
        spec(f"e, {w.w1_scale.shape[1]}, {h // 128}", w.w1_scale.dtype),
        spec(f"e, {h}, {w.w2.shape[2]}", w.w2.dtype),
        spec(f"e, {h // 128}, {w.w2_scale.shape[2]}", w.w2_scale.dtype),
    )
    with pytest.raises(ValueError, match=r"w1's experts is the symbolic dimension e: only the"):
        export.export(step)(*tokens, weights)
    assert e == w.w1.shape[0]
    assert export.export(step)(*tokens, w).out_avals[0].shape[0] == tokens[0].shape[0]


def test_quantization_and_calc_diff_refuse_complex_and_traced_values(inp):
    """Complex input lost its imaginary part with a ComplexWarning; calc_diff under jit failed
    with a TracerArrayConversionError."""
    z = jnp.ones((4, 128), jnp.complex64)
    for fn, args in [
        (quantize_per_token, (z,)),
        (quantize_blockwise, (jnp.ones((128, 128), jnp.complex64),)),
        (dequantize, (z, jnp.ones((4, 1)))),
        (calc_diff, (np.ones(3, np.complex128), np.ones(3))),
    ]:
        with pytest.raises(TypeError, match=r"must be real, got complex"):
            fn(*args)
    with pytest.raises(TypeError, match=r"calc_diff runs on the host in float64, but a is traced"):
        jax.jit(calc_diff)(jnp.ones(3), jnp.ones(3))


def test_init_weights_std_as_an_array_and_not_a_bool():
    """std=jnp.float32(0.1) was refused as "not a positive, finite number"; std=True passed."""
    key = jax.random.key(0)
    dims = dict(num_experts=4, hidden=256, intermediate=128)
    want = init_weights(key, **dims, std=0.1)[1]
    for std in (np.float32(0.1), jnp.float32(0.1)):
        got = init_weights(key, **dims, std=std)[1]
        for a, b in zip(got, want, strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(TypeError, match="init_weights: std must be a number or None, got True"):
        init_weights(key, **dims, std=True)
