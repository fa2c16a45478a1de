"""The FFI calls' results are typed like the values they are under ``jax.shard_map`` with
check_vma: varying over the mesh axes their operands vary over (and the fused layer's over its
expert axis), so a ``lax.scan`` can carry them. Tracing only: no GPU, and no extension except
where marked."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jax_megamoe import _ffi, mega_moe

AXIS = "ep"


def _trace(fn, args, in_specs, check_vma=True):
    """Trace ``fn`` per rank under shard_map over a one-device mesh (jaxpr only)."""
    mesh = jax.make_mesh((1,), (AXIS,))
    args = [jax.device_put(a, NamedSharding(mesh, s)) for a, s in zip(args, in_specs, strict=True)]
    smap = jax.shard_map(
        fn, mesh=mesh, in_specs=tuple(in_specs), out_specs=P(AXIS), check_vma=check_vma
    )
    return jax.make_jaxpr(smap)(*args)


def _dummy_call(shape):
    # Traced, never lowered: the target need not exist.
    return jax.ffi.ffi_call("jax_megamoe_test_never_run", jax.ShapeDtypeStruct(shape, jnp.float32))


def _varying(x):
    return set(jax.typeof(x).mat.varying)


def test_mixed_operands_and_varying_result():
    """A token shard beside replicated weights: the result varies over the shard's axis (plain
    ffi_call types it as identical on every device)."""
    x, w = np.random.default_rng(0).standard_normal((2, 8, 128), np.float32)
    seen = {}

    def per_rank(x, w):
        assert _varying(x) == {AXIS} and _varying(w) == set()
        y = _ffi.call_varying(_dummy_call(x.shape), x, w)
        seen["y"] = _varying(y)
        return y

    _trace(per_rank, (x, w), (P(AXIS), P()))
    assert seen["y"] == {AXIS}


def test_result_can_be_a_scan_carry():
    """The failure that found this: layers in a lax.scan carry the layer's output."""
    x = np.random.default_rng(1).standard_normal((8, 128), np.float32)

    def per_rank(x):
        def layer(h, _):
            return _ffi.call_varying(_dummy_call(h.shape), h), None

        return jax.lax.scan(layer, x, None, length=3)[0]

    _trace(per_rank, (x,), (P(AXIS),))


def test_extra_axes_and_unchecked_shard_map():
    """``axes`` marks a result varying even when no operand varies; with check_vma=False
    nothing is typed varying and the call still traces."""
    w = np.random.default_rng(2).standard_normal((8, 128), np.float32)
    seen = []

    def per_rank(w):
        y = _ffi.call_varying(_dummy_call(w.shape), w, axes=(AXIS,))
        seen.append(_varying(y))
        return y

    _trace(per_rank, (w,), (P(),))
    _trace(per_rank, (w,), (P(),), check_vma=False)
    assert seen == [{AXIS}, set()]


@pytest.mark.skipif(not _ffi.extension_available(), reason="needs the built extension")
def test_fused_layer_result_varies_over_the_expert_axis():
    """Even with every operand but the tokens replicated, the fused layer's output depends on
    every rank's tokens; and its call carries no JAX effect."""
    rng = np.random.default_rng(3)
    m, h, i, e, k = 8, 128, 128, 4, 2
    x = rng.standard_normal((m, h)).astype(jnp.float8_e4m3fn)
    x_scale = rng.random((m, h // 128), np.float32)
    ids = rng.integers(0, e, (m, k)).astype(np.int32)
    topk_w = rng.random((m, k), np.float32)
    weights = (
        rng.standard_normal((e, 2 * i, h)).astype(jnp.float8_e4m3fn),
        rng.random((e, 2 * i // 128, h // 128), np.float32),
        rng.standard_normal((e, h, i)).astype(jnp.float8_e4m3fn),
        rng.random((e, h // 128, i // 128), np.float32),
    )
    seen = {}

    def per_rank(x, x_scale, ids, topk_w, *weights):
        y = mega_moe.fused_mega_moe(
            x, x_scale, ids, topk_w, weights, buffer_id=0, clamp=None, axis_name=AXIS
        )
        seen["y"] = _varying(y)
        return y

    specs = (P(AXIS), P(AXIS), P(), P(), P(), P(), P(), P())
    jaxpr = _trace(per_rank, (x, x_scale, ids, topk_w, *weights), specs)
    assert seen["y"] == {AXIS}
    # No JAX effect: a jit holding the layer keeps JAX's fast dispatch path (kept_call).
    assert not jaxpr.effects


def _exported_text(fn, args, in_specs, target):
    """StableHLO of ``jit(shard_map(fn))`` lowered for CUDA (no GPU needed to lower), with a
    custom call to ``target``."""
    mesh = jax.make_mesh((1,), (AXIS,))
    smap = jax.shard_map(fn, mesh=mesh, in_specs=tuple(in_specs), out_specs=P(AXIS))
    shapes = [
        jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=NamedSharding(mesh, s))
        for a, s in zip(args, in_specs, strict=True)
    ]
    allow = [jax.export.DisabledSafetyCheck.custom_call(target)]
    exported = jax.export.export(jax.jit(smap), platforms=["cuda"], disabled_checks=allow)
    return exported(*shapes).mlir_module()


def test_kept_call_has_no_jax_effect_but_keeps_its_side_effect():
    """A JAX effect would send every call of an enclosing jit through jit's Python dispatch
    (~0.4 ms more per call on an H200 host); XLA must still see ``has_side_effect`` so it never
    dedupes or drops the call. The attributes reach the custom call; the result's shape and
    dtype, which only type it, do not."""
    x = np.random.default_rng(4).standard_normal((8, 128), np.float32)
    target = "jax_megamoe_test_never_run"

    def per_rank(x):
        call = _ffi.kept_call(target, jax.ShapeDtypeStruct(x.shape, jnp.bfloat16))
        y = _ffi.call_varying(call, x, axes=(AXIS,), buffer_id=np.int64(7))
        assert y.dtype == jnp.bfloat16 and y.shape == x.shape
        return y

    assert not _trace(per_rank, (x,), (P(AXIS),)).effects
    text = _exported_text(per_rank, (x,), (P(AXIS),), target)
    call = next(line for line in text.splitlines() if target in line)
    assert "has_side_effect = true" in call
    assert "buffer_id = 7" in call
    assert "shape" not in call.split("backend_config")[-1]
