"""The fused path across processes (``jax.distributed``, CUDA IPC between processes) on one
host: N processes x 1 GPU and 2 processes x 2 GPUs give bitwise the single-process output, for a
1-D expert mesh and 2-D (data x expert) meshes. ``pytest -m gpu tests/test_gpu_multiprocess.py``
on a machine with 4 (or 2) Hopper GPUs; each case starts fresh processes with the launcher.

The cross-rank timeout (docs/design.md §3.3) needs a peer that is missing or late, i.e. another
process, and so does a launch that fails on one rank only: those three cases run two processes,
on two GPUs, or both on the one GPU there is. The
multi-rank paths of the kernels also run as 2 and 4 processes sharing GPU 0, so that one GPU
checks them too."""

import json
import os

import jax
import numpy as np
import pytest
from launcher import describe, launch
from mp_worker import LAUNCH_HOOK_ERROR, MESHES, WORKER, load_rows, summaries

pytestmark = pytest.mark.gpu

# No preallocation: the pytest process already holds most of each GPU. Bounded waits everywhere.
GPU_ENV = {
    "XLA_PYTHON_CLIENT_PREALLOCATE": "false",
    "JAX_MEGAMOE_TIMEOUT_S": "20",
    "JAX_MEGAMOE_SETUP_TIMEOUT_S": "60",
    "NCCL_NVLS_ENABLE": "0",
}
ARGS = ["--impls", "fused,reference", "--tokens", "32", "--repeat", "20"]
TIMEOUT_S = 150


def num_gpus():
    return min(4, len(jax.devices("gpu")))


def visible(n):
    """The first n GPUs as CUDA_VISIBLE_DEVICES entries, respecting the caller's own setting."""
    outer = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = outer.split(",") if outer else [str(i) for i in range(n)]
    return ids[:n]


def layouts(n):
    out = {
        f"{n}x1": dict(num_processes=n, local_devices=[[i] for i in range(n)]),
        f"{n}x1_visible": dict(num_processes=n, visible_devices=visible(n)),
    }
    if n == 4:
        out["2x2"] = dict(num_processes=2, local_devices=[[0, 1], [2, 3]])
    return out


def run_ok(out, **kw):
    results = launch([WORKER, "--out", str(out), *ARGS], platform="gpu", env=GPU_ENV, **kw)
    assert all(r.returncode == 0 for r in results), describe(results)
    return results


def check_summaries(out, num_processes):
    found = summaries(out)
    assert sorted(found) == list(range(num_processes))
    for s in found.values():
        for mesh, info in s["meshes"].items():
            assert info["allocated"] is True, (mesh, info)
            assert info["calc_diff"] <= 1e-4, (mesh, info)
            if num_processes > 1:
                assert info["processes"] == list(range(num_processes))
                assert info["spans_hosts"] is False


@pytest.fixture(scope="module")
def golden(tmp_path_factory):
    n = num_gpus()
    if n < 2:
        pytest.skip("needs 2 or 4 GPUs")
    out = tmp_path_factory.mktemp("single")
    run_ok(
        out,
        num_processes=1,
        distributed=False,
        visible_devices=[",".join(visible(n))],
        timeout_s=TIMEOUT_S,
    )
    check_summaries(out, 1)
    return n, out


@pytest.mark.parametrize("layout", ["Nx1", "Nx1_visible", "2x2"])
def test_processes_match_single_process_bitwise(golden, layout, tmp_path):
    n, single = golden
    name = layout.replace("N", str(n))
    cases = layouts(n)
    if name not in cases:
        pytest.skip(f"{layout} needs 4 GPUs")
    run_ok(tmp_path, timeout_s=TIMEOUT_S, **cases[name])
    check_summaries(tmp_path, cases[name]["num_processes"])
    for mesh in MESHES:
        np.testing.assert_array_equal(
            load_rows(tmp_path, mesh, "fused"),
            load_rows(single, mesh, "fused"),
            err_msg=f"{name} {mesh}: fused output differs from the single-process run",
        )


def two_processes_devices():
    """GPU ordinals of two processes: one GPU each, or both on GPU 0 when there is one (CUDA IPC
    maps a workspace of the same GPU from another process; the kernels then time-share it)."""
    return [[0], [1]] if num_gpus() >= 2 else [[0], [0]]


def run_two(tmp_path, scenario, timeout_s, *extra, env=()):
    results = launch(
        [WORKER, "--out", str(tmp_path), "--scenario", scenario, "--tokens", "32", *extra],
        2,
        platform="gpu",
        local_devices=two_processes_devices(),
        env={**GPU_ENV, "JAX_MEGAMOE_TIMEOUT_S": str(timeout_s), **dict(env)},
        timeout_s=TIMEOUT_S,
    )
    assert all(r.returncode == 0 for r in results), describe(results)
    out = []
    for p in (0, 1):
        with open(tmp_path / f"{scenario}.p{p}.json") as f:
            out.append(json.load(f))
    return out


def test_missing_peer_times_out_with_a_named_error(tmp_path):
    """Process 1 never calls on a buffer: process 0's dispatch wait ends after the timeout (3 s
    here) with NaN output instead of a trap; check() and the next call name the rank, phase,
    peer and epoch; the process stays usable (a jnp op, then both processes on a fresh buffer)."""
    p0, p1 = run_two(tmp_path, "timeout", 3)
    assert p0["all_nan"], p0
    assert 3 <= p0["elapsed_s"] < 60, p0
    err = p0["check"]
    assert isinstance(err, dict), p0
    assert (err["kind"], err["rank"], err["phase"], err["peer"], err["epoch"], err["seen"]) == (
        "timeout",
        0,
        "dispatch",
        1,
        1,
        0,
    ), err
    assert "timed out after 3 s waiting for rank 1" in err["message"], err
    assert "JAX_MEGAMOE_TIMEOUT_S" in err["message"] and "close() it" in err["message"], err
    assert "refused, an earlier call failed" in p0["next_call"], p0
    assert "timed out after 3 s waiting for rank 1" in p0["next_call"], p0
    assert p0["plain_op"] == 6.0
    for p in (p0, p1):
        assert p["fresh_check"] == "no error" and p["fresh_diff"] <= 1e-4, p


def test_late_peer_within_the_timeout_is_waited_for(tmp_path):
    """Process 1 starts its first call 8 s after process 0: the wait spans the delay and both
    get the right answer. The default timeout is 300 s (DEFAULT_TIMEOUT_S; it was 30 s, which a
    peer still compiling or loading could exceed); the test sets 20 s and an 8 s delay so that a
    regression fails in seconds, not minutes."""
    p0, p1 = run_two(tmp_path, "slow", 20, "--delay-s", "8")
    assert p0["elapsed_s"] >= 4, p0  # process 0 really waited for the late peer
    for p in (p0, p1):
        assert p["check"] == "no error" and p["diff"] <= 1e-4, p


def test_failed_launch_aborts_the_peers_without_a_timeout(tmp_path):
    """Process 1's L1 launch fails (the extension's test hook: an empty grid, which CUDA 13
    refuses with cudaErrorInvalidValue) after its dispatch sync. Its call raises that error,
    and it still closes the call, so process 0 aborts at its combine sync (peer_aborted, NaN
    output) instead of waiting out the 20 s timeout for rows that will not come (kind "timeout":
    what happened before). Command buffers are off in both processes: under capture a failed
    launch discards the capture, and nothing of the call runs on that rank."""
    env = {"XLA_FLAGS": "--xla_gpu_enable_command_buffer="}
    p0, p1 = run_two(tmp_path, "launch_failure", 20, env=env)
    assert p0["call"] == "no error" and p0["all_nan"], p0
    assert p0["elapsed_s"] < 20, p0
    assert "kernel launch failed on device" in p1["call"], p1
    assert LAUNCH_HOOK_ERROR[1] in p1["call"], p1
    e0, e1 = p0["check"], p1["check"]
    assert isinstance(e0, dict) and isinstance(e1, dict), (p0, p1)
    assert (e0["kind"], e0["rank"], e0["phase"], e0["peer"], e0["epoch"]) == (
        "peer_aborted",
        0,
        "combine",
        1,
        1,
    ), e0
    assert (e1["kind"], e1["rank"], e1["phase"], e1["peer"], e1["epoch"]) == (
        "launch_failed",
        1,
        "combine",
        1,
        1,
    ), e1
    assert LAUNCH_HOOK_ERROR[0] in e1["message"], e1
    assert "close() it" in e1["message"], e1
    for p in (p0, p1):
        assert p["fresh_check"] == "no error" and p["fresh_diff"] <= 1e-4, p


@pytest.mark.parametrize(
    "num_processes, routing", [(2, "uniform"), (4, "uniform"), (4, "hot"), (4, "one_rank")]
)
def test_ranks_sharing_one_gpu(num_processes, routing, tmp_path):
    """R ranks as R processes on GPU 0: CUDA IPC maps each process's workspace into the others,
    and the kernels time-share the GPU. So every R > 1 path of the kernels (the stage, both
    syncs, route work over the peers' staged tokens, the pool pulled from peers, L2's stores into
    a peer's combine slots) runs where only one GPU is lent. On each mesh, each process's rows
    match the reference of the whole batch, five calls are bitwise equal, and check() finds no
    error; at R = 4 also with a hot expert and with every token routed to one rank's experts."""
    meshes = {"1d": num_processes, "2d": num_processes // 2, "2d_t": num_processes // 2}
    results = launch(
        [WORKER, "--out", str(tmp_path), "--scenario", "share", "--tokens", "32"]
        + ["--repeat", "5", "--meshes", ",".join(meshes), "--routing", routing],
        num_processes,
        platform="gpu",
        local_devices=[[0]] * num_processes,
        env=GPU_ENV,
        timeout_s=TIMEOUT_S,
    )
    assert all(r.returncode == 0 for r in results), describe(results)
    for p in range(num_processes):
        with open(tmp_path / f"share.p{p}.json") as f:
            found = json.load(f)
        assert sorted(found) == sorted(meshes), found
        for mesh, info in found.items():
            print(
                f"R={info['ranks']} as {num_processes} processes, {routing}, {mesh}, process {p}: "
                f"calc_diff {info['diff']:.2e}"
            )
            assert info["ranks"] == meshes[mesh], (p, mesh, info)
            assert info["check"] == "no error", (p, mesh, info)
            assert info["bitwise_repeat"], (p, mesh, info)
            assert info["diff"] <= 1e-4, (p, mesh, info)


def test_expert_group_across_hosts_is_refused(tmp_path):
    """Two GPU processes claiming different hosts: a 1-D expert axis spans them, and
    SymmBuffer.create refuses in both (the same processes on one host are the 2x1/4x1 cases)."""
    if num_gpus() < 2:
        pytest.skip("needs 2 GPUs")
    results = launch(
        [WORKER, "--out", str(tmp_path), "--scenario", "hosts"],
        2,
        platform="gpu",
        local_devices=[[0], [1]],
        env=GPU_ENV,
        per_process_env=[{"JAX_MEGAMOE_HOST_ID": h} for h in ("host-a", "host-b")],
        timeout_s=TIMEOUT_S,
    )
    assert all(r.returncode == 0 for r in results), describe(results)
    for p in (0, 1):
        with open(tmp_path / f"hosts.p{p}.json") as f:
            got = json.load(f)
        assert "spans 2 hosts" in got.get("error", ""), got
