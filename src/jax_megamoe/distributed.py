"""What ``SymmBuffer`` needs when a mesh spans several processes (``jax.distributed``): which
host a process runs on, and a small all-gather of setup data through the coordinator's
key-value store.

Why the key-value store and not an all-gather inside a setup ``shard_map``: the data are host
values (CUDA IPC handles, host names, error texts), not arrays; the store needs no compiled
computation and no cross-process collective on the backend (CPU processes would need gloo);
it also gives the barrier ``close()`` needs, and each wait has a deadline, so a process that
failed or never arrived ends in an error that names it instead of a hang.

Keys are ``jax_megamoe/symm/{setup}/{phase}/{process}``, where ``setup`` (see
:func:`setup_name`) names the buffer by the processes of its mesh and how many buffers those
processes created together before it. The processes of a mesh call ``SymmBuffer.create`` (and
``close``) for the same buffers in the same order, as for any other collective; a process
outside a mesh does not call create for it, so its own count of buffers may differ from theirs,
and a per-process counter would name the next common buffer differently in each process.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax

TIMEOUT_ENV = "JAX_MEGAMOE_SETUP_TIMEOUT_S"
HOST_ENV = "JAX_MEGAMOE_HOST_ID"
DEFAULT_TIMEOUT_S = 300.0
KEY_PREFIX = "jax_megamoe/symm"


class SetupError(RuntimeError):
    """Another process failed, or did not arrive in time, during a collective buffer setup."""


def setup_timeout_s() -> float:
    """Seconds a process waits for its peers at each setup step (``JAX_MEGAMOE_SETUP_TIMEOUT_S``,
    default 300: peers may still be compiling or loading weights)."""
    text = os.environ.get(TIMEOUT_ENV, "")
    if not text:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value < 1e7:
        raise ValueError(f"{TIMEOUT_ENV}={text!r} must be a positive number of seconds")
    return value


def host_id() -> str:
    """This machine's identity: host name and kernel boot id (two machines with the same host
    name differ in boot id; processes of one machine agree). ``JAX_MEGAMOE_HOST_ID`` overrides
    it (tests use it to pretend to be several hosts)."""
    override = os.environ.get(HOST_ENV)
    if override:
        return override
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = ""
    return f"{socket.gethostname()}/{boot}" if boot else socket.gethostname()


def client():
    """The ``jax.distributed`` client; raises if ``jax.distributed.initialize`` was not called."""
    from jax._src import distributed

    c = distributed.global_state.client
    if c is None:
        raise RuntimeError(
            "the mesh spans several processes but jax.distributed is not initialized: call "
            "jax.distributed.initialize(...) in every process before SymmBuffer.create"
        )
    return c


def setup_name(processes: Sequence[int], number: int) -> str:
    """The name of a buffer every process of ``processes`` agrees on: those processes, sorted,
    as runs (``0-3``, ``0-1.4``) and ``number``, this buffer's place among the buffers they
    created together (``0-3/2``)."""
    runs: list[list[int]] = []
    for p in sorted(set(processes)):
        if runs and p == runs[-1][-1] + 1:
            runs[-1].append(p)
        else:
            runs.append([p])
    text = ".".join(str(r[0]) if len(r) == 1 else f"{r[0]}-{r[-1]}" for r in runs)
    return f"{text}/{number}"


def key(setup: str, phase: str, process: int | None = None) -> str:
    base = f"{KEY_PREFIX}/{setup}/{phase}"
    return base if process is None else f"{base}/{process}"


def _set(c, k: str, value: str) -> None:
    # Overwriting lets a close() that timed out be retried.
    try:
        c.key_value_set(k, value, allow_overwrite=True)
    except TypeError:  # a client without the keyword (older or newer jaxlib)
        c.key_value_set(k, value)


def all_gather(
    setup: str,
    phase: str,
    processes: Sequence[int],
    value: Any = None,
    *,
    error: str | None = None,
    extra_s: float = 0.0,
) -> dict[int, Any]:
    """Publishes this process's JSON-serialisable ``value`` (or an ``error`` text) for ``phase``
    and returns ``{process: value}`` for every process in ``processes``.

    With ``error`` set it publishes the error and returns ``{}`` at once (the caller raises its
    own exception; the others learn of it here). Raises :class:`SetupError` naming the processes
    that published an error, or the first that did not publish within the timeout (the setup
    timeout plus ``extra_s``). A process alone in ``processes`` needs no store (nor
    ``jax.distributed``): it gets its own value."""
    me = jax.process_index()
    if list(processes) == [me]:
        return {} if error is not None else {me: value}
    c = client()
    payload = {"error": error} if error is not None else {"value": value}
    _set(c, key(setup, phase, me), json.dumps(payload))
    if error is not None:
        return {}
    timeout = setup_timeout_s() + extra_s
    deadline = time.monotonic() + timeout
    got: dict[int, dict] = {me: payload}
    for p in processes:
        if p == me:
            continue
        wait_ms = max(1, int((deadline - time.monotonic()) * 1000))
        try:
            text = c.blocking_key_value_get(key(setup, phase, p), wait_ms)
        except Exception as e:  # the client raises XlaRuntimeError (DEADLINE_EXCEEDED) on timeout
            raise SetupError(
                f"SymmBuffer {setup}: process {me} waited {timeout:g} s for process {p} at "
                f"setup step {phase!r}; every process of the mesh must call SymmBuffer.create "
                f"and close for the same buffers in the same order (raise {TIMEOUT_ENV} if a "
                f"process is merely slow): {e}"
            ) from e
        got[p] = json.loads(text)
    errors = {p: v["error"] for p, v in sorted(got.items()) if "error" in v}
    if errors:
        detail = "; ".join(f"process {p}: {msg}" for p, msg in errors.items())
        raise SetupError(f"SymmBuffer {setup}: setup step {phase!r} failed on {detail}")
    return {p: v["value"] for p, v in got.items()}


def exchange(
    setup: str, phase: str, processes: Sequence[int], compute: Callable[[], Any]
) -> dict[int, Any]:
    """Runs ``compute()`` here and all-gathers its result (``{me: result}`` for a process alone
    in ``processes``); if it raises, the peers are told (so they fail at once instead of at
    the timeout) and the exception propagates here, KeyboardInterrupt included."""
    try:
        value = compute()
    except BaseException as e:
        try:
            all_gather(setup, phase, processes, error=f"{type(e).__name__}: {e}")
        except Exception:  # the original error matters more than failing to report it
            pass
        raise
    return all_gather(setup, phase, processes, value)


def forget(setup: str, processes: Sequence[int], *phases: str) -> None:
    """Deletes this process's keys of ``phases`` (call once every peer has read them); a
    process alone in ``processes`` published none."""
    me = jax.process_index()
    if list(processes) == [me]:
        return
    c = client()
    for phase in phases:
        try:
            c.key_value_delete(key(setup, phase, me))
        except Exception:  # best effort: a stale key only costs a few bytes on the coordinator
            pass
