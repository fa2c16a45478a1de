"""Starts N local JAX processes joined by ``jax.distributed`` through a loopback coordinator, for
the multi-process tests. Bounded: every process is killed at the deadline, the others soon after
one fails (they would wait for it), and always on the way out. Logs are returned, not piped
(no pipe can fill up and block a child).

Parent: ``launch([script, *args], num_processes, ...)``. Child: ``init_process()`` first thing,
before any JAX computation; it reads what ``launch`` put in the environment.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

COORDINATOR = "JAX_MEGAMOE_TEST_COORDINATOR"
NUM_PROCESSES = "JAX_MEGAMOE_TEST_NUM_PROCESSES"
PROCESS_ID = "JAX_MEGAMOE_TEST_PROCESS_ID"
LOCAL_DEVICES = "JAX_MEGAMOE_TEST_LOCAL_DEVICES"  # comma-separated GPU ordinals
PLATFORM = "JAX_MEGAMOE_TEST_PLATFORM"  # cpu | gpu
CPU_DEVICES = "JAX_MEGAMOE_TEST_CPU_DEVICES"  # host devices per process (cpu)
INIT_TIMEOUT_S = 60


def free_port() -> int:
    """A TCP port that was free a moment ago on 127.0.0.1 (the coordinator binds it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Result:
    process_id: int
    returncode: int | None  # None: killed (timeout, or a peer failed first)
    log: str
    timed_out: bool


def _child_env(base: dict[str, str], extra: dict[str, str]) -> dict[str, str]:
    env = dict(base)
    # The test session forces 8 host devices through XLA_FLAGS; children set their own count.
    flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "", env.get("XLA_FLAGS", ""))
    env["XLA_FLAGS"] = flags.strip()
    env.update(extra)
    return env


def launch(
    argv: list[str],
    num_processes: int,
    *,
    platform: str = "cpu",
    cpu_devices: int = 1,
    local_devices: list[list[int]] | None = None,
    visible_devices: list[str] | None = None,
    distributed: bool = True,
    env: dict[str, str] | None = None,
    per_process_env: list[dict[str, str]] | None = None,
    timeout_s: float = 120.0,
    grace_s: float = 10.0,
    cwd: str | None = None,
) -> list[Result]:
    """Runs ``python *argv`` as ``num_processes`` processes and waits for all of them.

    ``local_devices[i]``: GPU ordinals process ``i`` drives (``local_device_ids``);
    ``visible_devices[i]``: its ``CUDA_VISIBLE_DEVICES`` instead (each process then sees its
    GPUs from ordinal 0). ``distributed=False`` (one process) skips ``jax.distributed``.
    A process still running ``timeout_s`` after the start, or ``grace_s`` after another one
    failed, is killed with its process group."""
    if num_processes < 1:
        raise ValueError("num_processes must be >= 1")
    port = free_port()
    procs: list[subprocess.Popen] = []
    logs = []
    timed_out = [False] * num_processes
    with tempfile.TemporaryDirectory(prefix="jmm-launch-") as tmp:
        try:
            for i in range(num_processes):
                extra = {
                    PLATFORM: platform,
                    CPU_DEVICES: str(cpu_devices),
                    "PYTHONUNBUFFERED": "1",
                    **(env or {}),
                }
                if distributed:
                    extra.update(
                        {
                            COORDINATOR: f"127.0.0.1:{port}",
                            NUM_PROCESSES: str(num_processes),
                            PROCESS_ID: str(i),
                        }
                    )
                if local_devices is not None:
                    extra[LOCAL_DEVICES] = ",".join(map(str, local_devices[i]))
                if visible_devices is not None:
                    extra["CUDA_VISIBLE_DEVICES"] = visible_devices[i]
                if per_process_env is not None:
                    extra.update(per_process_env[i])
                log = open(os.path.join(tmp, f"{i}.log"), "w+b")  # noqa: SIM115 - closed below
                logs.append(log)
                procs.append(
                    subprocess.Popen(
                        [sys.executable, *argv],
                        env=_child_env(dict(os.environ), extra),
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        stdin=subprocess.DEVNULL,
                        cwd=cwd,
                        start_new_session=True,  # its own process group: killed as a whole
                    )
                )
            deadline = time.monotonic() + timeout_s
            failed_at = None
            while any(p.poll() is None for p in procs):
                now = time.monotonic()
                if failed_at is None and any(p.poll() not in (None, 0) for p in procs):
                    failed_at = now
                if now > deadline or (failed_at is not None and now > failed_at + grace_s):
                    for i, p in enumerate(procs):
                        if p.poll() is None:
                            timed_out[i] = now > deadline
                            _kill(p)
                    break
                time.sleep(0.05)
        finally:
            for p in procs:
                if p.poll() is None:
                    _kill(p)
            results = []
            for i, (p, log) in enumerate(zip(procs, logs, strict=True)):
                log.seek(0)
                text = log.read().decode(errors="replace")
                log.close()
                rc = p.returncode
                results.append(
                    Result(i, None if rc is not None and rc < 0 else rc, text, timed_out[i])
                )
    return results


def _kill(p: subprocess.Popen) -> None:
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        p.wait(timeout=10)
    except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL does not fail
        pass


def describe(results: list[Result], tail: int = 4000) -> str:
    """Every process's exit and the end of its log, for assertion messages."""
    parts = []
    for r in results:
        state = "timed out" if r.timed_out else f"exit {r.returncode}"
        parts.append(f"--- process {r.process_id}: {state} ---\n{r.log[-tail:]}")
    return "\n".join(parts)


def init_process() -> tuple[int, int]:
    """In a child: configures JAX for its platform and joins ``jax.distributed`` when the
    launcher asked for it. Returns ``(process_id, num_processes)``."""
    import jax

    platform = os.environ.get(PLATFORM, "cpu")
    if platform == "cpu":
        jax.config.update("jax_platforms", "cpu")
        jax.config.update("jax_num_cpu_devices", int(os.environ.get(CPU_DEVICES, "1")))
        # Cross-process collectives on CPU go through gloo (the default has none).
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if COORDINATOR not in os.environ:
        return 0, 1
    local = os.environ.get(LOCAL_DEVICES)
    jax.distributed.initialize(
        coordinator_address=os.environ[COORDINATOR],
        num_processes=int(os.environ[NUM_PROCESSES]),
        process_id=int(os.environ[PROCESS_ID]),
        local_device_ids=[int(x) for x in local.split(",")] if local else None,
        initialization_timeout=INIT_TIMEOUT_S,
    )
    return jax.process_index(), jax.process_count()
