"""``jax.export`` of programs that take ``MoEWeights``: serialized to bytes, read back and called,
the result is bitwise the un-exported jit's (CPU, reference path)."""

import functools

import jax
import numpy as np
import pytest
from jax import export
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jax_megamoe import MoEWeights, fp8_mega_moe
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
