"""Misuse that used to pass silently or fail late: SymmBuffer arguments on CPU, a missing
axis_name inside shard_map, replicated weights, a closed buffer, a buffer made for another device
order, degenerate weights and Python lists as operands; how errors the kernels record on the
device reach Python (SymmBuffer.check; the GPU half is tests/test_gpu_errors.py); and closing
and setup failures (the allocation faked)."""

import copy
import functools
import pickle
import weakref

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from mp_worker import FakeExtension

import jax_megamoe
from jax_megamoe import (
    MegaMoE,
    MegaMoeDeviceError,
    SymmBuffer,
    _ffi,
    calc_diff,
    fp8_mega_moe,
    init_weights,
    transform_weights,
)
from jax_megamoe import distributed as dist
from jax_megamoe.symm_buffer import workspace_nbytes
from jax_megamoe.testing import make_inputs

DIMS = dict(h=256, i=128, e=8, k=2)
BUF = dict(num_experts=8, hidden=256, intermediate=128, topk=2, max_tokens_per_rank=16)
MESH = Mesh(np.array(jax.devices()[:4]), ("ep",))
NAMES = ("x", "x_scale", "topk_ids", "topk_weights", "weights")
EXPERT_AXIS = P("ep")


@pytest.fixture(scope="module")
def inp():
    return make_inputs(3, m=16, **DIMS)


def sharded_call(inp, fn, *, mesh=MESH, weight_spec=EXPERT_AXIS):
    step = jax.shard_map(fn, mesh=mesh, in_specs=(P("ep"),) * 4 + (weight_spec,), out_specs=P("ep"))
    return jax.eval_shape(step, *(inp[n] for n in NAMES))


# --- SymmBuffer.create validates on every backend and reports the GPU size ------------------


@pytest.mark.parametrize(
    "field, value, error, match",
    [
        ("hidden", 0, ValueError, r"hidden must be in \[1,"),
        ("hidden", 300, ValueError, r"hidden \(300\) must be a positive multiple of 128"),
        ("hidden", -128, ValueError, r"hidden must be in \[1,"),
        ("intermediate", 0, ValueError, r"intermediate must be in \[1,"),
        ("hidden", 256.0, TypeError, "hidden must be an int"),
        ("topk", 2.5, TypeError, "topk must be an int"),
        ("topk", True, TypeError, "topk must be an int"),
        ("max_tokens_per_rank", 1e15, TypeError, "max_tokens_per_rank must be an int"),
        ("max_tokens_per_rank", 10**15, ValueError, r"max_tokens_per_rank must be in \[1,"),
        ("max_tokens_per_rank", 2**27, ValueError, "too large: pool row indices are int32"),
        ("num_experts", 4 * 4097, ValueError, "4097 experts per rank exceed"),
        ("sm_budget", -1, ValueError, r"sm_budget must be in \[0,"),
        ("sm_budget", 0.5, TypeError, "sm_budget must be an int"),
        ("timeout_s", 0, ValueError, "timeout_s must be a positive number of seconds"),
        ("timeout_s", -3.0, ValueError, "timeout_s must be a positive number of seconds"),
        ("timeout_s", float("nan"), ValueError, r"at most 1e9\), got nan"),
        ("timeout_s", float("inf"), ValueError, r"at most 1e9\), got inf"),
        ("timeout_s", 2e9, ValueError, "timeout_s must be a positive number"),
        ("timeout_s", "30", TypeError, "timeout_s must be a number of seconds or None"),
        ("timeout_s", True, TypeError, "timeout_s must be a number of seconds or None"),
    ],
)
def test_create_validates_every_argument(field, value, error, match):
    dims = {**BUF, "topk": 8, "num_experts": 64}
    with pytest.raises(error, match=match):
        SymmBuffer.create(MESH, "ep", **{**dims, field: value})


def test_create_topk_limit_of_the_kernels():
    match = r"topk \(33\) must be in \[1, min\(num_experts=64, 32\)\]"
    with pytest.raises(ValueError, match=match):
        SymmBuffer.create(MESH, "ep", **{**BUF, "num_experts": 64, "topk": 33})


def test_size_reported_on_cpu_and_numpy_ints_accepted():
    buf = SymmBuffer.create(MESH, "ep", **{**BUF, "max_tokens_per_rank": np.int64(16)})
    assert not buf.allocated and not buf.closed
    want = workspace_nbytes(
        num_ranks=4, num_experts=8, hidden=256, intermediate=128, topk=2, max_tokens_per_rank=16
    )
    assert buf.nbytes_per_rank == want and want > 16 * 256
    assert type(buf.max_tokens_per_rank) is int
    buf.close()
    assert buf.closed and buf.nbytes_per_rank == want  # the size stays; allocated is apart


def test_timeout_is_kept_as_given():
    buf = SymmBuffer.create(MESH, "ep", **BUF, timeout_s=np.float32(2.5))
    assert buf.timeout_s == 2.5 and type(buf.timeout_s) is float
    assert SymmBuffer.create(MESH, "ep", **BUF, timeout_s=7).timeout_s == 7.0
    # None: the extension reads JAX_MEGAMOE_TIMEOUT_S, else DEFAULT_TIMEOUT_S, when it allocates.
    assert SymmBuffer.create(MESH, "ep", **BUF).timeout_s is None
    assert jax_megamoe.constants.DEFAULT_TIMEOUT_S == 300


# --- Errors the kernels record on the device ---------------------------------------------------


def test_device_error_type_is_exported():
    assert issubclass(MegaMoeDeviceError, RuntimeError)
    assert "MegaMoeDeviceError" in jax_megamoe.__all__


def test_check_is_a_no_op_where_nothing_is_allocated():
    buf = SymmBuffer.create(MESH, "ep", **BUF)
    assert not buf.allocated and buf.check() is None
    buf.close()
    assert buf.check() is None


class RecordingExtension:
    """Stands in for _C.buffer_error: device 1 of buffer 7 holds a recorded timeout."""

    RECORD = dict(
        kind="timeout",
        code=2,
        rank=1,
        phase="combine",
        peer=3,
        epoch=12,
        seen=11,
        expected_rank=-1,
        message="SymmBuffer 7 on device 1 (rank 1), call 12, phase 'combine': timed out",
    )

    def buffer_error(self, buffer_id, ordinal):
        return dict(self.RECORD) if (buffer_id, ordinal) == (7, 1) else None


def test_check_raises_the_recorded_error_with_its_fields(monkeypatch):
    monkeypatch.setattr(_ffi, "extension", RecordingExtension)
    buf = SymmBuffer.create(MESH, "ep", **BUF)
    buf.buffer_id, buf.allocated, buf._ordinals = 7, True, [0, 1]  # as if allocated on 2 GPUs
    try:
        with pytest.raises(
            MegaMoeDeviceError, match=r"^jax_megamoe: SymmBuffer 7 on device 1"
        ) as e:
            buf.check()
    finally:
        buf.allocated = False  # nothing to free
    err = e.value
    got = (err.kind, err.rank, err.phase, err.peer, err.epoch, err.seen, err.expected_rank)
    assert got == ("timeout", 1, "combine", 3, 12, 11, -1)
    assert (err.buffer_id, err.device) == (7, 1)


# --- axis_name inside shard_map --------------------------------------------------------------


def test_missing_axis_name_inside_shard_map_names_the_axis(inp):
    fn = functools.partial(fp8_mega_moe, impl="reference")
    with pytest.raises(ValueError, match="pass axis_name='ep'"):
        sharded_call(inp, fn)
    sharded_call(inp, functools.partial(fn, axis_name="ep"))  # the fix traces


def test_missing_axis_name_names_the_axis_the_weights_vary_over(inp):
    """On a data x expert mesh the message named the first manual axis ('dp'), whose advice
    then failed on the weights."""
    mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("dp", "ep"))
    fn = functools.partial(fp8_mega_moe, impl="reference")
    with pytest.raises(ValueError, match="pass axis_name='ep'"):
        sharded_call(inp, fn, mesh=mesh)
    # Over two axes the weights' typing gives no order: the fix names the mesh's, for both.
    with pytest.raises(
        ValueError,
        match=r"sharded over \['dp', 'ep'\]: pass axis_name=\('dp', 'ep'\) and shard the weights",
    ):
        sharded_call(inp, fn, mesh=mesh, weight_spec=P(("ep", "dp")))


def test_replicated_weights_without_axis_name_run_data_parallel(inp):
    """Every device holding all experts (weights P(), typed replicated by check_vma) with
    axis_name=None is a data-parallel layer: it was refused, with advice to call the layer
    outside the shard_map, which a step that is one shard_map cannot do. With check_vma off
    the weights' sharding cannot be read, so it is still refused."""
    mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("dp", "ep"))

    def run(check_vma=True):
        step = jax.shard_map(
            functools.partial(fp8_mega_moe, impl="reference"),
            mesh=mesh,
            in_specs=(P(("dp", "ep")),) * 4 + (P(),),
            out_specs=P(("dp", "ep")),
            check_vma=check_vma,
        )
        return jax.jit(step)(*(inp[n] for n in NAMES))

    assert calc_diff(run(), fp8_mega_moe(*(inp[n] for n in NAMES))) < 1e-6
    with pytest.raises(ValueError, match="axis_name=None: pass axis_name, .* check_vma off"):
        run(check_vma=False)


def test_missing_axis_name_in_megamoe_names_the_axis():
    router, weights = init_weights(jax.random.key(1), num_experts=8, hidden=256, intermediate=128)
    hidden = jax.random.normal(jax.random.key(2), (16, 256))

    def run(layer):
        step = jax.shard_map(layer, mesh=MESH, in_specs=(P("ep"), P(), P("ep")), out_specs=P("ep"))
        return jax.eval_shape(step, hidden, router, weights)

    with pytest.raises(ValueError, match="MegaMoE is called inside shard_map.*axis_name='ep'"):
        run(MegaMoE(topk=2))
    assert run(MegaMoE(topk=2, axis_name="ep")).shape == (16, 256)


def test_axis_of_size_one_needs_no_axis_name(inp):
    one = Mesh(np.array(jax.devices()[:1]), ("ep",))
    fn = functools.partial(fp8_mega_moe, impl="reference")
    assert sharded_call(inp, fn, mesh=one).shape == (16, 256)


# --- Weights sharded over the expert axis ------------------------------------------------------


def test_replicated_weights_in_megamoe():
    router, weights = init_weights(jax.random.key(1), num_experts=8, hidden=256, intermediate=128)
    hidden = jax.random.normal(jax.random.key(2), (16, 256))
    layer = MegaMoE(topk=2, axis_name="ep")
    step = jax.shard_map(layer, mesh=MESH, in_specs=(P("ep"), P(), P()), out_specs=P("ep"))
    with pytest.raises(ValueError, match=r"shard the weights with P\('ep'\)"):
        jax.eval_shape(step, hidden, router, weights)


def test_replicated_weights_with_a_buffer(inp):
    buf = SymmBuffer.create(MESH, "ep", **BUF)
    fn = functools.partial(fp8_mega_moe, axis_name="ep", buffer=buf)
    with pytest.raises(ValueError, match=r"shard the weights with P\('ep'\)"):
        sharded_call(inp, fn, weight_spec=P())
    assert sharded_call(inp, fn).shape == (16, 256)


def test_megamoe_weights_that_are_not_the_routers_experts():
    """A router over 8 experts with 3 experts' weights on one device: not a sharding mistake,
    a mismatch, and the message says so."""
    router, weights = init_weights(jax.random.key(1), num_experts=8, hidden=256, intermediate=128)
    hidden = jax.random.normal(jax.random.key(2), (16, 256))
    three = jax.tree.map(lambda leaf: leaf[:3], weights)
    with pytest.raises(ValueError, match=r"MegaMoE: 3 local experts x 1 ranks != 8 experts"):
        MegaMoE(topk=2)(hidden, router, three)


def test_buffer_made_for_another_axis_name(inp):
    mesh = Mesh(np.array(jax.devices()[:4]), ("x",))
    buf = SymmBuffer.create(mesh, "x", **BUF)
    fn = functools.partial(fp8_mega_moe, axis_name="ep", buffer=buf)
    with pytest.raises(ValueError, match=r"buffer was made for axis 'x', the call runs over 'ep'"):
        sharded_call(inp, fn)


@pytest.mark.parametrize(
    "w1_shape, match",
    [
        ((256, 256), r"w1 \(256, 256\) and w2 \(2, 256, 128\) must be \[experts, rows, cols\]"),
        ((2, 257, 256), r"w1 \(2, 257, 256\): dimension 1 must be 2\*intermediate"),
    ],
)
def test_w1_that_is_not_experts_by_gate_and_up_rows(w1_shape, match):
    w1 = jax.random.normal(jax.random.key(0), w1_shape).astype(jnp.float8_e4m3fn)
    with pytest.raises(ValueError, match=match):
        transform_weights(
            w1, jnp.ones((2, 2, 2)), jnp.ones((2, 256, 128), jnp.float8_e4m3fn), jnp.ones((2, 2, 1))
        )


@pytest.mark.parametrize(
    "e, h, i, match",
    [
        (2, 256, 0, r"w1 \(2, 0, 256\): intermediate .0. must be a positive multiple of 128"),
        (2, 0, 128, r"w1 \(2, 256, 0\): hidden .0. must be a positive multiple of 128"),
        (0, 256, 128, "the weights hold no expert"),
    ],
)
def test_degenerate_weights(e, h, i, match):
    f8 = jnp.float8_e4m3fn
    with pytest.raises(ValueError, match=match):
        transform_weights(
            jnp.zeros((e, 2 * i, h), f8),
            jnp.ones((e, 2 * i // 128, h // 128)),
            jnp.zeros((e, h, i), f8),
            jnp.ones((e, h // 128, i // 128)),
        )


# --- Closed buffers and device order -----------------------------------------------------------


def test_closed_buffer_raises_with_auto(inp):
    buf = SymmBuffer.create(MESH, "ep", **BUF)
    fn = functools.partial(fp8_mega_moe, axis_name="ep", buffer=buf)
    assert sharded_call(inp, fn).shape == (16, 256)
    buf.close()
    with pytest.raises(ValueError, match="was closed"):
        sharded_call(inp, fn)
    sharded_call(inp, functools.partial(fn, impl="reference"))  # the reference needs no buffer


def test_a_copied_buffer_is_the_buffer_and_pickling_is_refused():
    """copy.copy and copy.deepcopy made a second object with its own `closed` and `traced`:
    closing one left the other usable, and on a GPU its programs would have outlived the
    workspace. Pickling failed on a Device object."""
    buf = SymmBuffer.create(MESH, "ep", **BUF)
    layer = MegaMoE(topk=2, axis_name="ep", buffer=buf)
    assert copy.copy(buf) is buf and copy.deepcopy(buf) is buf
    assert copy.deepcopy(layer).buffer is buf
    with pytest.raises(TypeError, match=f"SymmBuffer {buf.buffer_id} cannot be pickled"):
        pickle.dumps(buf)
    buf.close()
    assert copy.copy(buf).closed


@pytest.mark.parametrize("traced", [False, True])
def test_close_makes_programs_traced_with_the_fused_kernels_retrace(monkeypatch, traced):
    """Such a program holds the workspace's address, and XLA replays its recorded kernels
    without the handler's check, so close() clears JAX's caches: the next call retraces, and the
    trace refuses the closed buffer. A buffer never traced fused leaves the caches alone. On CPU
    nothing is allocated or traced fused, so both are faked here; test_gpu_errors.py has the
    real case."""
    buf = SymmBuffer.create(MESH, "ep", **BUF)
    monkeypatch.setattr(SymmBuffer, "_teardown", lambda self, strict: None)
    buf._finalizer = weakref.finalize(buf, lambda: None)  # as if allocated
    buf.traced = traced
    traces = []

    @jax.jit
    def step(x):
        traces.append(None)
        return x * 2

    x = jnp.arange(4.0)
    step(x), step(x)
    assert len(traces) == 1
    buf.close()
    step(x)
    assert len(traces) == (2 if traced else 1)


def _as_if_allocated(buf, monkeypatch, ext):
    """A CPU buffer made to look allocated across processes 0 and 1, with ``ext`` as the
    extension and the key-value store's calls recorded."""
    buf._finalizer = weakref.finalize(buf, lambda: None)
    buf._ordinals = [0]
    buf.processes, buf.setup = (0, 1), "0-1/9"
    monkeypatch.setattr(_ffi, "extension", lambda: ext)
    calls = []
    monkeypatch.setattr(dist, "all_gather", lambda *a, **kw: calls.append((a, kw)) or {})
    monkeypatch.setattr(dist, "forget", lambda *a: None)
    return calls


class _Unmaps:
    def __init__(self, fail=False):
        self.fail = fail

    def close_ipc_handles(self, buffer_id, ordinal):
        if self.fail:
            raise RuntimeError("unmap failed")


def _fake_extension(monkeypatch, ext):
    monkeypatch.setattr(_ffi, "extension_available", lambda: True)
    monkeypatch.setattr(_ffi, "is_sm90", lambda d: True)
    monkeypatch.setattr(_ffi, "extension", lambda: ext)
    return Mesh(np.array(jax.devices()[:2]), ("ep",))


def test_close_waits_for_peers_past_the_kernels_timeout(monkeypatch):
    """A peer may reach close() only after one of its calls waited out the kernels' timeout for
    this process (which failed at trace time and closed at once): close() waits that long on
    top of the setup timeout, the longest of this process's workspaces as the extension resolved
    it at create (the fake's: 40 s + the device's ordinal; tests/test_gpu_setup.py checks the
    real resolution)."""
    mesh = _fake_extension(monkeypatch, FakeExtension(0))
    buf = SymmBuffer.create(mesh, "ep", **BUF)
    assert buf.allocated
    calls = []
    monkeypatch.setattr(dist, "all_gather", lambda *a, **kw: calls.append((a, kw)) or {})
    buf.close()
    assert [kw for a, kw in calls if a[1] == "closed"] == [{"extra_s": 41.0}]


def test_one_process_close_reads_no_setup_timeout(monkeypatch):
    """With no peer there is no wait, so a bad JAX_MEGAMOE_SETUP_TIMEOUT_S must not stop close()
    from freeing the workspaces."""
    ext = FakeExtension(0)
    buf = SymmBuffer.create(_fake_extension(monkeypatch, ext), "ep", **BUF)
    monkeypatch.setenv("JAX_MEGAMOE_SETUP_TIMEOUT_S", "abc")
    buf.close()
    assert [c[0] for c in ext.calls].count("destroy") == 2


def test_with_block_keeps_its_own_error_when_close_fails(monkeypatch):
    first, second = (SymmBuffer.create(MESH, "ep", **BUF) for _ in range(2))
    for buf in (first, second):
        _as_if_allocated(buf, monkeypatch, _Unmaps(fail=True))
    with pytest.raises(KeyError, match="in the block") as info:
        with first:
            raise KeyError("in the block")
    assert any("unmap failed" in note for note in info.value.__notes__)
    with pytest.raises(RuntimeError, match="unmap failed"):  # nothing else to report
        with second:
            pass


def test_setup_error_survives_a_failed_cleanup(monkeypatch):
    """Connecting fails, then unmapping in the cleanup fails too: the first error is raised,
    the second noted, and the workspaces are freed."""

    class Ext(FakeExtension):
        def connect_workspace(self, *args):
            raise RuntimeError("connect failed")

        def close_ipc_handles(self, buffer_id, ordinal):
            self._log("unmap", buffer_id, ordinal)
            raise RuntimeError("unmap failed")

    ext = Ext(0)
    mesh = _fake_extension(monkeypatch, ext)
    gathers, gather = [], dist.all_gather
    monkeypatch.setattr(dist, "all_gather", lambda *a, **kw: gathers.append(kw) or gather(*a, **kw))
    with pytest.raises(RuntimeError, match="connect failed") as info:
        SymmBuffer.create(mesh, "ep", **BUF)
    assert any("unmap failed" in note for note in info.value.__notes__)
    assert [c[0] for c in ext.calls].count("destroy") == 2
    assert gathers[-1] == {"extra_s": 0.0}  # the cleanup of a setup no call ran on


def test_setup_tells_the_peers_of_a_keyboard_interrupt(monkeypatch):
    published = []
    monkeypatch.setattr(dist, "all_gather", lambda *a, **kw: published.append(kw) or {})

    def interrupted():
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        dist.exchange("0-1/1", "handles", (0, 1), interrupted)
    assert published == [{"error": "KeyboardInterrupt: "}]


def test_fused_call_under_vmap_says_how_to_batch(inp, monkeypatch):
    """The fused path traced on CPU (extension and allocation faked): under jax.vmap JAX's own
    error named an internal primitive; the reference path vmaps (test_quant.py)."""

    class Ext:
        FP8_MEGA_MOE_TARGET = "jax_megamoe_fp8_mega_moe"

        def registrations(self):
            return {}

    monkeypatch.setattr(_ffi, "extension", lambda: Ext())
    monkeypatch.setattr(_ffi, "register_targets", lambda: None)  # its cache stays unfilled
    buf = SymmBuffer.create(Mesh(np.array(jax.devices()[:1]), ("ep",)), "ep", **BUF)
    buf.allocated = True
    fn = functools.partial(fp8_mega_moe, buffer=buf, impl="fused")
    args = [inp[n] for n in NAMES]
    assert not buf.traced
    assert "fp8_mega_moe_kept" in str(jax.make_jaxpr(fn)(*args))
    assert buf.traced  # so close() clears the caches that hold this program
    batched = [jnp.stack([a, a]) for a in args[:4]]
    with pytest.raises(NotImplementedError, match="fold the batch into the token axis"):
        jax.make_jaxpr(jax.vmap(lambda *b: fn(*b, args[4])))(*batched)


def test_buffer_made_for_another_device_order(inp):
    reversed_mesh = Mesh(np.array(jax.devices()[:4][::-1]), ("ep",))
    buf = SymmBuffer.create(reversed_mesh, "ep", **BUF)
    fn = functools.partial(fp8_mega_moe, axis_name="ep", buffer=buf, impl="reference")
    with jax.sharding.set_mesh(MESH):
        with pytest.raises(ValueError, match="a rank would exchange tokens with the wrong peers"):
            sharded_call(inp, fn)
    with jax.sharding.set_mesh(reversed_mesh):
        assert sharded_call(inp, fn, mesh=reversed_mesh).shape == (16, 256)


# --- Operands that are not arrays --------------------------------------------------------------


def test_python_lists_are_refused_numpy_arrays_accepted(inp):
    args = [inp[n] for n in NAMES]
    with pytest.raises(TypeError, match=r"topk_ids must be a jax or numpy array, got list"):
        fp8_mega_moe(*args[:2], np.asarray(args[2]).tolist(), *args[3:], impl="reference")
    w = inp["weights"]
    with pytest.raises(TypeError, match=r"w1_scale must be a jax or numpy array, got list"):
        transform_weights(w.w1, np.asarray(w.w1_scale).tolist(), w.w2, w.w2_scale)
    want = fp8_mega_moe(*args, impl="reference")
    got = fp8_mega_moe(*(np.asarray(a) for a in args[:4]), args[4], impl="reference")
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
    assert np.abs(np.asarray(want, np.float32)).max() > 0


def test_sharded_global_arrays_still_accepted(inp):
    sharding = NamedSharding(MESH, P("ep"))
    args = jax.device_put([inp[n] for n in NAMES], sharding)
    fn = functools.partial(fp8_mega_moe, axis_name="ep", impl="reference")
    step = jax.jit(jax.shard_map(fn, mesh=MESH, in_specs=P("ep"), out_specs=P("ep")))
    one_device = fp8_mega_moe(*(inp[n] for n in NAMES), impl="reference")
    np.testing.assert_array_equal(  # expert parallelism is bitwise the one-device result
        np.asarray(step(*args), np.float32), np.asarray(one_device, np.float32)
    )
