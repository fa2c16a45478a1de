"""Multi-process runs on CPU: the launcher, and SymmBuffer + the reference path across
``jax.distributed`` processes (gloo collectives) giving bitwise the single-process output."""

import json
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import numpy as np
import pytest
from launcher import describe, launch
from mp_worker import MESHES, WORKER, FakeExtension, load_rows, summaries

from jax_megamoe.distributed import setup_name
from jax_megamoe.symm_buffer import check_groups_on_one_host


def assert_ok(results):
    assert all(r.returncode == 0 for r in results), describe(results)


def run_scenario(tmp_path, scenario, num_processes, *, setup_timeout_s, timeout_s, **kw):
    """mp_worker's CPU ``scenario`` in ``num_processes`` processes: ``{process: its JSON}``."""
    results = launch(
        [WORKER, "--out", str(tmp_path), "--scenario", scenario],
        num_processes,
        env={"JAX_MEGAMOE_SETUP_TIMEOUT_S": str(setup_timeout_s)},
        timeout_s=timeout_s,
        **kw,
    )
    assert_ok(results)
    got = {}
    for p in range(num_processes):
        with open(tmp_path / f"{scenario}.p{p}.json") as f:
            got[p] = json.load(f)
    return got


def test_launcher_kills_processes_at_the_deadline():
    start = time.monotonic()
    results = launch(["-c", "import time; time.sleep(60)"], 2, distributed=False, timeout_s=1)
    assert time.monotonic() - start < 20
    assert all(r.timed_out and r.returncode is None for r in results), describe(results)


def test_launcher_stops_the_others_when_one_fails():
    code = (
        "import os, sys, time\n"
        "if os.environ['JAX_MEGAMOE_TEST_PROCESS_ID'] == '0':\n"
        "    print('failing'); sys.exit(3)\n"
        "time.sleep(60)\n"
    )
    start = time.monotonic()
    results = launch(["-c", code], 3, grace_s=0.5, timeout_s=60)
    assert time.monotonic() - start < 20
    assert results[0].returncode == 3 and "failing" in results[0].log
    assert all(r.returncode is None and not r.timed_out for r in results[1:]), describe(results)


def test_two_processes_match_one_bitwise(tmp_path):
    """2 processes x 2 host devices vs 1 process x 4: 1-D and both 2-D meshes, reference path
    (the KV-store setup runs in SymmBuffer.create; nothing is allocated on CPU). The processes
    claim different hosts, so the expert groups that span them are detected."""
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir()
    two.mkdir()
    hosts = [{"JAX_MEGAMOE_HOST_ID": "host-a"}, {"JAX_MEGAMOE_HOST_ID": "host-b"}]
    with ThreadPoolExecutor(2) as pool:
        args = ["--impls", "reference,auto"]  # auto = reference here: exercises the comparison
        single = pool.submit(
            launch,
            [WORKER, "--out", str(one), *args],
            1,
            distributed=False,
            cpu_devices=4,
            timeout_s=50,
        )
        multi = pool.submit(
            launch,
            [WORKER, "--out", str(two), *args],
            2,
            cpu_devices=2,
            per_process_env=hosts,
            timeout_s=50,
        )
        single, multi = single.result(), multi.result()
    assert_ok(single)
    assert_ok(multi)
    for mesh in MESHES:
        want = load_rows(one, mesh, "reference")
        got = load_rows(two, mesh, "reference")
        assert want.shape == (64, 512)
        np.testing.assert_array_equal(got, want, err_msg=mesh)
        assert np.any(want != 0)

    found = summaries(two)
    assert sorted(found) == [0, 1]
    for s in found.values():
        for mesh, info in s["meshes"].items():
            assert info["allocated"] is False
            assert info["calc_diff"] == 0.0
            assert info["processes"] == [0, 1]
            assert info["hosts"] == {"0": "host-a", "1": "host-b"}
            # 1d and 2d_t put both processes in one expert group; 2d keeps each group in one.
            assert info["spans_hosts"] is (mesh != "2d"), (mesh, info)
    assert "spans 2 hosts" in found[0]["meshes"]["1d"]["host_error"]
    assert summaries(one)[0]["meshes"]["1d"]["processes"] == [0]


def test_setup_errors_reach_every_process(tmp_path):
    """Mismatched create arguments fail on both processes; a create one process never joins
    ends in a SetupError at the timeout, not a hang."""
    got = run_scenario(tmp_path, "errors", 2, setup_timeout_s=3, timeout_s=50)
    for p in (0, 1):
        assert "same arguments" in got[p]["mismatch"], got[p]
    assert "waited 3 s for process 1" in got[0]["timeout"], got[0]


def test_meshes_that_leave_processes_out(tmp_path):
    """Only the processes whose devices are in a mesh call create for it (the README's rule),
    so processes create different numbers of buffers; a later buffer over all of them must still
    set up, and a closed buffer's leftover setup keys must not reach a process outside it."""
    got = run_scenario(tmp_path, "meshes", 3, setup_timeout_s=5, timeout_s=60)
    want = {
        0: ["first_two", "alone", "first_two_again", "all"],
        1: ["first_two", "first_two_again", "all"],
        2: ["all"],
    }
    for p, names in want.items():
        assert sorted(got[p]) == sorted(names), got[p]
        for name in names:
            assert "error" not in got[p][name], (p, name, got[p][name])
        assert got[p]["all"]["processes"] == [0, 1, 2]


def test_allocation_protocol_with_a_fake_extension(tmp_path):
    """The multi-process allocation path end to end on CPU, against a recording fake of the CUDA
    extension: each process creates and exports its own workspaces, opens exactly its remote
    peers (never its own handles), builds rank-ordered peer tables (-1 = another process),
    unmaps before it frees; a failed IPC open in one process fails the create in both, and both
    free what they allocated."""
    got = run_scenario(tmp_path, "fake", 2, setup_timeout_s=20, timeout_s=50, cpu_devices=2)
    ptr, remote = FakeExtension.ptr, lambda q, o: 0x1000000 + FakeExtension.ptr(q, o)
    for p in (0, 1):
        r = got[p]
        assert r["1d"] == {"id": 1, "allocated": True} and r["2d_t"]["allocated"] is True
        calls = r["calls"]
        connects = {(c[1], c[2]): (c[3], c[4]) for c in calls if c[0] == "connect"}
        q = 1 - p
        # 1-D mesh (ranks 0,1 = process 0's devices, 2,3 = process 1's).
        own = ([0, 1], [ptr(p, 0), ptr(p, 1)])
        other = ([-1, -1], [remote(q, 0), remote(q, 1)])
        first, second = (own, other) if p == 0 else (other, own)
        for o in (0, 1):
            assert connects[(1, o)] == (first[0] + second[0], first[1] + second[1])
        # 2-D transposed mesh: group o = (process 0 device o, process 1 device o).
        for o in (0, 1):
            mine, theirs = ([o], [ptr(p, o)]), ([-1], [remote(q, o)])
            a, b = (mine, theirs) if p == 0 else (theirs, mine)
            assert connects[(2, o)] == (a[0] + b[0], a[1] + b[1])
        for c in calls:
            if c[0] == "open":
                assert c[3] == q, c  # only the other process's handles
        for buffer_id in (1, 2, 3):
            kinds = [c[0] for c in calls if c[1] == buffer_id]
            assert kinds.count("destroy") == 2, (buffer_id, kinds)
            last_unmap = max(i for i, k in enumerate(kinds) if k == "unmap")
            assert last_unmap < kinds.index("destroy"), (buffer_id, kinds)
    assert "injected cudaIpcOpenMemHandle failure" in got[1]["failed_open"]
    assert got[0]["failed_open"].startswith("SetupError") and "process 1" in got[0]["failed_open"]


def test_setup_names_runs_of_processes():
    assert setup_name([0, 1, 2, 3], 2) == "0-3/2"
    assert setup_name([0, 1, 4], 1) == "0-1.4/1"
    assert setup_name([5], 7) == "5/7"
    assert setup_name([1, 3, 4, 5, 9], 1) == "1.3-5.9/1"
    assert setup_name((3, 1, 2, 1), 4) == "1-3/4"  # as a set, sorted


def _dev(process):
    return SimpleNamespace(process_index=process)


def test_expert_group_across_hosts_is_refused():
    hosts = {0: "a", 1: "a", 2: "b", 3: "b"}
    within = [[_dev(0), _dev(1)], [_dev(2), _dev(3)]]
    check_groups_on_one_host(within, hosts, "expert")
    across = [[_dev(0), _dev(2)], [_dev(1), _dev(3)]]
    with pytest.raises(ValueError, match="expert axis 'expert' spans 2 hosts"):
        check_groups_on_one_host(across, hosts, "expert")
