"""The extension's setup calls (workspace creation, memory queries, kernel loading):
- they make their device current for the call and then the calling thread's earlier CUDA context
  again, or none if it had none (ffi/ffi_common.h's DeviceGuard). Restoring the earlier device by
  number instead bound device 0's primary context to a thread that had no context, e.g. a worker
  thread that creates a buffer for device 1;
- the cross-rank timeout a buffer's kernels use is the one SymmBuffer waits on in close().
``pytest -m gpu``; one Hopper GPU runs all but the two-GPU case."""

import ctypes
import threading

import jax
import numpy as np
import pytest
from jax.sharding import Mesh

from jax_megamoe import SymmBuffer, _ffi

pytestmark = pytest.mark.gpu


def driver():
    cuda = ctypes.CDLL("libcuda.so.1")
    assert cuda.cuInit(0) == 0
    return cuda


def current_context(cuda):
    ctx = ctypes.c_void_p()
    assert cuda.cuCtxGetCurrent(ctypes.byref(ctx)) == 0
    return ctx.value


def in_fresh_thread(fn):
    """fn() on a new thread (which starts with no CUDA context); its result or its error."""
    out = {}

    def run():
        try:
            out["value"] = fn()
        except BaseException as e:  # noqa: BLE001  (re-raised on the caller's thread)
            out["error"] = e

    t = threading.Thread(target=run)
    t.start()
    t.join()
    if "error" in out:
        raise out["error"]
    return out["value"]


def test_a_thread_without_a_context_keeps_none():
    jax.devices("gpu")  # JAX's own contexts exist, as in any program that uses the layer
    cuda = driver()
    c = _ffi.extension()

    def query():
        before = current_context(cuda)
        free = c.device_free_bytes(0)
        return before, free, current_context(cuda)

    before, free, after = in_fresh_thread(query)
    assert before is None, "a new thread starts with no current context"
    assert free > 0
    assert after is None, f"device_free_bytes(0) left context {after:#x} current on the thread"


def test_a_thread_keeps_its_own_context():
    """A thread current on a context of its own (not device 1's primary one, which restoring the
    device by number would also have given back) has that context again after a call for
    device 0."""
    if len(jax.devices("gpu")) < 2:
        pytest.skip("needs 2 GPUs")
    cuda = driver()
    c = _ffi.extension()
    device1 = ctypes.c_int()
    assert cuda.cuDeviceGet(ctypes.byref(device1), 1) == 0

    def query():
        ctx = ctypes.c_void_p()
        # cuCtxCreate's CUDA 3.2 ABI (the driver keeps it): makes the new context current.
        assert cuda.cuCtxCreate_v2(ctypes.byref(ctx), 0, device1) == 0
        try:
            c.device_free_bytes(0)
            return ctx.value, current_context(cuda)
        finally:
            cuda.cuCtxSetCurrent(None)
            cuda.cuCtxDestroy_v2(ctx)

    mine, after = in_fresh_thread(query)
    assert after == mine, "device_free_bytes(0) did not give the thread's own context back"


@pytest.mark.parametrize("timeout_s, env", [(7.5, "12"), (None, "12.25"), (None, None)])
def test_close_waits_on_the_timeout_the_kernels_use(timeout_s, env, monkeypatch):
    """close() waits for peers up to the setup timeout plus the kernels' cross-rank timeout: the
    value create_workspace resolved (timeout_s, else JAX_MEGAMOE_TIMEOUT_S, else the default),
    read back from the extension rather than worked out again in Python."""
    if env is None:
        monkeypatch.delenv("JAX_MEGAMOE_TIMEOUT_S", raising=False)
    else:
        monkeypatch.setenv("JAX_MEGAMOE_TIMEOUT_S", env)
    mesh = Mesh(np.array(jax.devices("gpu")[:1]), ("ep",))
    dims = dict(num_experts=8, hidden=512, intermediate=256, topk=2, max_tokens_per_rank=8)
    with SymmBuffer.create(mesh, "ep", **dims, timeout_s=timeout_s) as buf:
        c = _ffi.extension()
        ordinal = mesh.devices.flat[0].local_hardware_id
        want = timeout_s or float(env or c.constants()["DEFAULT_TIMEOUT_S"])
        assert c.workspace_timeout_s(buf.buffer_id, ordinal) == pytest.approx(want, rel=1e-9)
        assert buf._kernel_timeout_s == pytest.approx(want, rel=1e-9)
