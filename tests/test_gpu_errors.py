"""Failures the fused kernels record on the device instead of trapping (docs/design.md §3.3),
here a buffer made for another device order than the mesh the call runs under, which plain
``shard_map`` cannot see at trace time. The call is aborted on every rank with NaN output,
``SymmBuffer.check()`` raises ``MegaMoeDeviceError``, the next call on the buffer is refused at
its handler, and the process stays usable: a fresh buffer gives the right answer. Also a kernel
launch that fails on a one-rank buffer: that call raises, and the buffer stays usable. ``pytest
-m gpu tests/test_gpu_errors.py``; one Hopper GPU runs the R = 1 cases (a wrong expected rank
passed through the private hook, the launch failure through the extension's test hook), 2 or 4
GPUs the reordered meshes. Timeouts and a launch that fails on one of several ranks need another
process: tests/test_gpu_multiprocess.py."""

import functools

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from mp_worker import LAUNCH_HOOK_ERROR

from jax_megamoe import MegaMoeDeviceError, _ffi, calc_diff, fp8_mega_moe, testing
from jax_megamoe.mega_moe import fused_mega_moe
from jax_megamoe.testing import make_inputs

pytestmark = pytest.mark.gpu

DIMS = dict(h=512, i=256, e=16, k=4)
NAMES = ("x", "x_scale", "topk_ids", "topk_weights", "weights")
M = 64  # tokens per rank
BF16_NAN = 0x7FC0  # what the combine kernel writes into every element of an aborted call


def gpus():
    return jax.devices("gpu")


def make_buffer(mesh):
    return testing.make_buffer(mesh, DIMS, M)


def assert_all_nan(y):
    bits = np.asarray(y).view(np.uint16)
    assert (bits == BF16_NAN).all(), f"{(bits != BF16_NAN).sum()} of {bits.size} are not NaN"


def one_gpu_case():
    mesh = Mesh(np.array(gpus()[:1]), ("ep",))
    inp = make_inputs(11, m=M, **DIMS)
    return mesh, [inp[n] for n in NAMES]


def wrong_rank_call(buf):
    """The fused op with expected rank 1 on an R = 1 buffer, as if the mesh had moved it."""
    return jax.jit(
        functools.partial(
            fused_mega_moe, buffer_id=buf.buffer_id, clamp=None, axis_name=None, expected_rank=1
        )
    )


def test_wrong_expected_rank_poisons_the_call_and_the_buffer():
    mesh, args = one_gpu_case()
    buf = make_buffer(mesh)
    try:
        assert_all_nan(wrong_rank_call(buf)(*args).block_until_ready())
        with pytest.raises(MegaMoeDeviceError, match="device order mismatch") as info:
            buf.check()
        err = info.value
        fields = (err.kind, err.rank, err.phase, err.peer, err.expected_rank, err.epoch)
        assert fields == ("device_order", 0, "dispatch", 0, 1, 1), fields
        assert "rank 0 of the buffer ran this call as index 1" in str(err)
        assert "SymmBuffer.create(mesh, axis_name" in str(err) and "close() it" in str(err)
        # A new program, so its handler runs whether or not XLA uses command buffers.
        normal = jax.jit(functools.partial(fp8_mega_moe, buffer=buf, impl="fused"))
        with pytest.raises(jax.errors.JaxRuntimeError, match="refused, an earlier call failed"):
            normal(*args).block_until_ready()
    finally:
        buf.close()
    assert buf.check() is None  # closed: nothing left to report

    fresh = make_buffer(mesh)
    try:
        check_runs_right(fresh, args)
    finally:
        fresh.close()


def check_runs_right(buf, args):
    """A fused call on ``buf`` records no error and matches the reference."""
    y = jax.jit(functools.partial(fp8_mega_moe, buffer=buf, impl="fused"))(*args)
    assert buf.check() is None
    ref = jax.jit(functools.partial(fp8_mega_moe, impl="reference"))(*args)
    assert calc_diff(y, ref) <= 1e-4


def test_a_failed_launch_raises_and_leaves_a_one_rank_buffer_usable():
    """With one rank nobody waits for this rank's flags, so a launch that fails mid-call (the
    extension's test hook: L1's launch with an empty grid) only raises, with or without command
    buffers; nothing is recorded, and the next call on the buffer is right. (With peers the rank
    also closes the call for them: tests/test_gpu_multiprocess.py.)"""
    mesh, args = one_gpu_case()
    buf = make_buffer(mesh)
    try:
        _ffi.extension().inject_launch_failure(gpus()[0].local_hardware_id)
        step = jax.jit(functools.partial(fp8_mega_moe, buffer=buf, impl="fused"))
        with pytest.raises(jax.errors.JaxRuntimeError, match=LAUNCH_HOOK_ERROR[1]):
            step(*args).block_until_ready()
        check_runs_right(buf, args)
    finally:
        buf.close()


def test_a_jitted_program_refuses_its_closed_buffer():
    """Its cached copy holds the freed workspace's address, and with command buffers XLA would
    replay its kernels without the handler's check: close() makes it retrace, and the trace
    refuses. A new buffer created meanwhile (likely at the freed address) is left intact."""
    mesh, args = one_gpu_case()
    buf = make_buffer(mesh)
    step = jax.jit(functools.partial(fp8_mega_moe, buffer=buf, impl="fused"))
    step(*args).block_until_ready()
    step(*args).block_until_ready()  # a replay, with command buffers
    buf.close()
    fresh = make_buffer(mesh)
    try:
        with pytest.raises(ValueError, match=f"buffer {buf.buffer_id} was closed"):
            step(*args)
        check_runs_right(fresh, args)
    finally:
        fresh.close()


def test_calls_enqueued_behind_a_failed_one_do_nothing():
    """Two calls in one program, the first aborted: the second is enqueued before the error is
    recorded, so its handler may not see it (with command buffers it never does: both are
    captured before either runs); then the kernels skip it and it is NaN too. If the host is
    slower than the kernels, the handler refuses it instead. Either way the record names the
    first call and nothing hangs."""
    mesh, args = one_gpu_case()
    buf = make_buffer(mesh)
    bad = functools.partial(
        fused_mega_moe, buffer_id=buf.buffer_id, clamp=None, axis_name=None, expected_rank=1
    )
    good = functools.partial(fp8_mega_moe, buffer=buf, impl="fused")
    try:

        def both(*a):
            first = bad(*a)
            # Two calls with no data between them may run in either order: tie the second's
            # inputs to the first's output, as consecutive layers are tied.
            first, x = jax.lax.optimization_barrier((first, a[0]))
            return first, good(x, *a[1:])

        try:
            first, second = jax.jit(both)(*args)
            assert_all_nan(first)
            assert_all_nan(second)
        except jax.errors.JaxRuntimeError as e:
            assert "refused, an earlier call failed" in str(e), e
        with pytest.raises(MegaMoeDeviceError) as info:
            buf.check()
        assert (info.value.kind, info.value.epoch) == ("device_order", 1)
    finally:
        buf.close()


@pytest.mark.parametrize("num_ranks", [2, 4])
def test_buffer_for_another_device_order_under_plain_shard_map(num_ranks):
    """The buffer orders the GPUs [0, 1, ...], the call's mesh [1, 0, ...]. Under plain
    shard_map the trace shows no concrete mesh, so the device catches it: every rank aborts,
    those still in order too (with 4 GPUs, ranks 2 and 3), and every device names the first rank
    out of order and the index it ran as."""
    if len(gpus()) < num_ranks:
        pytest.skip(f"needs {num_ranks} GPUs")
    devices = gpus()[:num_ranks]
    swapped = Mesh(np.array([devices[1], devices[0], *devices[2:]]), ("ep",))
    inp = make_inputs(12, m=M * num_ranks, num_ranks=num_ranks, **DIMS)
    sharded = NamedSharding(swapped, P("ep"))
    args = [jax.device_put(inp[n], sharded) for n in NAMES]

    def run(buf, impl="fused"):
        fn = functools.partial(fp8_mega_moe, axis_name="ep", buffer=buf, impl=impl)
        return jax.jit(jax.shard_map(fn, mesh=swapped, in_specs=P("ep"), out_specs=P("ep")))(*args)

    buf = make_buffer(Mesh(np.array(devices), ("ep",)))
    try:
        assert_all_nan(run(buf))
        with pytest.raises(MegaMoeDeviceError, match="device order mismatch"):
            buf.check()
        c = _ffi.extension()
        for rank, d in enumerate(devices):
            got = c.buffer_error(buf.buffer_id, d.local_hardware_id)
            want = {"kind": "device_order", "rank": rank, "peer": 0, "expected_rank": 1}
            assert {k: got[k] for k in want} == want, (d, got)
    finally:
        buf.close()

    fresh = make_buffer(swapped)  # the mesh the call runs under: right
    try:
        y = run(fresh)
        assert fresh.check() is None
        assert calc_diff(y, run(None, impl="reference")) <= 1e-4
    finally:
        fresh.close()
