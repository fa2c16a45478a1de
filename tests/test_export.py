"""``jax.export`` of programs that take ``MoEWeights``: serialized to bytes, read back and called,
the result is bitwise the un-exported jit's (CPU, reference path)."""

import functools

import jax
import numpy as np
import pytest
from jax import export
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jax_megamoe import MoEWeights, SymmBuffer, fp8_mega_moe
from jax_megamoe.testing import make_inputs

DIMS = dict(h=256, i=128, e=8, k=3)
OPERANDS = ("x", "x_scale", "topk_ids", "topk_weights", "weights")


def round_trip(fn, args):
    """Exports ``fn`` for ``args``, serializes, deserializes and calls it."""
    blob = export.export(fn)(*args).serialize()
    assert isinstance(blob, bytearray | bytes) and len(blob) > 0
    return export.deserialize(blob).call(*args)


def test_weights_pytree_survives_serialization():
    inp = make_inputs(11, m=8, **DIMS)
    exp = export.deserialize(export.export(jax.jit(lambda w: w))(inp["weights"]).serialize())
    # The in-tree names MoEWeights, so a caller's pytree matches and the output is MoEWeights.
    assert exp.in_tree == jax.tree.structure(((inp["weights"],), {}))
    out = exp.call(inp["weights"])
    assert isinstance(out, MoEWeights)
    for got, want in zip(out, inp["weights"], strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


@pytest.mark.parametrize("seed", [1, 2])
def test_single_device_bitwise(seed):
    inp = make_inputs(seed, m=24, routing="masked", **DIMS)
    args = [inp[name] for name in OPERANDS]
    step = jax.jit(functools.partial(fp8_mega_moe, impl="reference"))
    want = step(*args)
    got = round_trip(step, args)
    assert got.dtype == want.dtype and got.shape == want.shape
    assert np.abs(np.asarray(want, np.float32)).max() > 0  # a real output, not all zeros
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_shard_map_bitwise():
    num_ranks = len(jax.devices())
    assert num_ranks == 8, "conftest sets 8 host devices"
    mesh = Mesh(np.array(jax.devices()), ("ep",))
    inp = make_inputs(3, m=8 * num_ranks, routing="skewed", num_ranks=num_ranks, **DIMS)
    sharding = NamedSharding(mesh, P("ep"))
    args = [jax.device_put(inp[name], sharding) for name in OPERANDS]
    step = jax.jit(
        jax.shard_map(
            functools.partial(fp8_mega_moe, axis_name="ep", impl="reference"),
            mesh=mesh,
            in_specs=P("ep"),
            out_specs=P("ep"),
        )
    )
    want = step(*args)
    exp = export.deserialize(export.export(step)(*args).serialize())
    assert exp.nr_devices == num_ranks
    got = exp.call(*args)
    assert got.sharding.is_equivalent_to(want.sharding, got.ndim)
    assert np.abs(np.asarray(want, np.float32)).max() > 0
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_symbolic_token_count():
    """Exported once for any M: the reference sized its pool with min(E_l, M·K), which a
    symbolic M cannot decide (InconclusiveDimensionOperation); each M then bitwise the jit's."""
    inp = make_inputs(4, m=8, **DIMS)
    step = jax.jit(functools.partial(fp8_mega_moe, impl="reference"))
    (m,) = export.symbolic_shape("m")
    h, k = DIMS["h"], DIMS["k"]
    specs = [
        jax.ShapeDtypeStruct((m, h), inp["x"].dtype),
        jax.ShapeDtypeStruct((m, h // 128), inp["x_scale"].dtype),
        jax.ShapeDtypeStruct((m, k), inp["topk_ids"].dtype),
        jax.ShapeDtypeStruct((m, k), inp["topk_weights"].dtype),
        inp["weights"],
    ]
    exp = export.deserialize(export.export(step)(*specs).serialize())
    for tokens, seed in ((1, 5), (24, 6)):
        args = [make_inputs(seed, m=tokens, **DIMS)[name] for name in OPERANDS[:4]]
        args.append(inp["weights"])
        want = step(*args)
        assert np.abs(np.asarray(want, np.float32)).max() > 0
        np.testing.assert_array_equal(np.asarray(exp.call(*args)), np.asarray(want))


def test_symbolic_token_count_with_a_buffer_is_refused():
    inp = make_inputs(4, m=8, **DIMS)
    buf = SymmBuffer.create(
        Mesh(np.array(jax.devices()[:1]), ("ep",)),
        "ep",
        num_experts=DIMS["e"],
        hidden=DIMS["h"],
        intermediate=DIMS["i"],
        topk=DIMS["k"],
        max_tokens_per_rank=16,
    )
    (m,) = export.symbolic_shape("m")
    specs = [jax.ShapeDtypeStruct((m, *inp[n].shape[1:]), inp[n].dtype) for n in OPERANDS[:4]]
    step = jax.jit(functools.partial(fp8_mega_moe, buffer=buf, impl="reference"))
    with pytest.raises(ValueError, match="capacity needs a concrete token count"):
        export.export(step)(*specs, inp["weights"])
