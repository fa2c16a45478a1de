"""The extension's setup calls (workspace creation, memory queries, kernel loading) make their
device current for the call and then the calling thread's earlier CUDA context again, or none if
it had none (ffi/ffi_common.h's DeviceGuard). Restoring the earlier device by number instead bound
device 0's primary context to a thread that had no context, e.g. a worker thread that creates a
buffer for device 1. ``pytest -m gpu``; one Hopper GPU runs the first case, two the second."""

import ctypes
import threading

import jax
import pytest

from jax_megamoe import _ffi

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


def test_a_thread_keeps_its_own_device():
    if len(jax.devices("gpu")) < 2:
        pytest.skip("needs 2 GPUs")
    cuda = driver()
    c = _ffi.extension()
    device1 = ctypes.c_int()
    assert cuda.cuDeviceGet(ctypes.byref(device1), 1) == 0

    def query():
        ctx = ctypes.c_void_p()
        assert cuda.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), device1) == 0
        try:
            assert cuda.cuCtxSetCurrent(ctx) == 0
            c.device_free_bytes(0)
            return ctx.value, current_context(cuda)
        finally:
            cuda.cuCtxSetCurrent(None)
            cuda.cuDevicePrimaryCtxRelease_v2(device1)

    mine, after = in_fresh_thread(query)
    assert after == mine, "device_free_bytes(0) did not give device 1's context back"
