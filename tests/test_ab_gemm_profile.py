"""benchmarks/ab_gemm_profile.py on stand-in binaries that print gemm_profile's result line: the
alternation, the medians, the L2 / L1 ratio that cancels a process-level mode, and its errors."""

import json
import os
import stat
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks"))

import ab_gemm_profile  # noqa: E402

# A stand-in for gemm_profile: L1 and L2 base times per M, L2 scaled by the build's factor, and
# every other process launch (a shared counter file) in a mode where both run `mode` times
# slower, as seen on H200 at M = 8192. It logs each launch's build so the order can be checked.
_FAKE = """#!{python}
import sys
args = dict(zip(sys.argv[1::2], sys.argv[2::2]))
m = int(args["--tokens"])
with open({counter!r}, "a+") as f:
    f.seek(0)
    n = len(f.read().splitlines())
    f.write({name!r} + "\\n")
slow = {mode} if n % 2 else 1.0
l1 = (1000.0 + m) * slow
l2 = (500.0 + m) * {l2_factor} * slow
print(f"M {{m}} E 64: 1 pool rows (1 blocks), 132 CTAs, {{args['--iters']}} iters")
print(f"L1 {{l1:.1f}} us 1000 TFLOPS | L2 {{l2:.1f}} us 900 TFLOPS (medians, real rows)")
"""


def _fake(tmp_path, name, l2_factor, mode=1.0):
    path = tmp_path / name
    path.write_text(
        _FAKE.format(
            python=sys.executable,
            counter=str(tmp_path / "launches"),
            name=name,
            mode=mode,
            l2_factor=l2_factor,
        )
    )
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


def test_parse_line_reads_gemm_profile_output():
    text = "M 8 E 64: ...\nL1 301.3 us 12 TFLOPS | L2 156.2 us 12 TFLOPS (medians, real rows)\n"
    assert ab_gemm_profile.parse_line(text) == (301.3, 156.2)
    with pytest.raises(ValueError, match="no 'L1"):
        ab_gemm_profile.parse_line("CUDA error: no device\n")


def test_alternates_builds_and_the_ratio_cancels_the_mode(tmp_path):
    """Three builds, three rounds at two M: launches alternate build by build; with every other
    launch 15 % slow, L2's medians mix modes but L2 / L1 gives each build's true change."""
    a = _fake(tmp_path, "a", l2_factor=1.0, mode=1.15)
    b = _fake(tmp_path, "b", l2_factor=0.9, mode=1.15)
    c = _fake(tmp_path, "c", l2_factor=1.05, mode=1.15)
    out = tmp_path / "ab.json"
    rows = ab_gemm_profile.main(
        ["--tokens", "8,2048", "--rounds", "3", "--iters", "5", f"--out={out}", f"a={a}"]
        + [f"b={b}", f"c={c}"]
    )
    launches = (tmp_path / "launches").read_text().split()
    assert launches == ["a", "b", "c"] * 6
    assert [(r["tokens"], r["build"], r["rounds"]) for r in rows] == [
        (m, n, 3) for m in (8, 2048) for n in "abc"
    ]
    for r in rows:
        m = r["tokens"]
        factor = {"a": 1.0, "b": 0.9, "c": 1.05}[r["build"]]
        assert r["l2_over_l1"] == pytest.approx((500 + m) * factor / (1000 + m), rel=1e-3)
        assert r["ratio_change"] == pytest.approx(factor - 1, abs=1e-3)
    saved = json.loads(out.read_text())
    assert len(saved["runs"]) == 18 and saved["summary"] == rows
    assert "| 2048 | b | 3 |" in ab_gemm_profile.table(rows)


def test_errors_name_the_problem(tmp_path):
    good = _fake(tmp_path, "good", l2_factor=1.0)
    with pytest.raises(SystemExit):
        ab_gemm_profile.parse_args(["no_equals_sign"])
    with pytest.raises(SystemExit):
        ab_gemm_profile.parse_args([f"x={good}", f"x={good}"])
    failing = tmp_path / "failing"
    failing.write_text(f"#!{sys.executable}\nimport sys\nsys.exit('no GPU')\n")
    failing.chmod(failing.stat().st_mode | stat.S_IXUSR)
    with pytest.raises(RuntimeError, match="exited 1"):
        ab_gemm_profile.main(["--tokens", "8", "--rounds", "1", f"base={good}", f"f={failing}"])


def test_one_kernel_passes_the_flag_and_reads_its_own_change(tmp_path):
    """--kernels l1 reaches the binary; L1's change is read against the first build, and the L2
    columns of a left-out L2 (0 µs) read 0 instead of dividing by zero."""
    script = tmp_path / "one"
    script.write_text(
        f"#!{sys.executable}\nimport sys\n"
        "args = dict(zip(sys.argv[1::2], sys.argv[2::2]))\n"
        "assert args['--kernels'] == 'l1', args\n"
        "l1 = 900.0 if sys.argv[0].endswith('fast') else 1000.0\n"
        "print(f'L1 {l1:.1f} us 1 TFLOPS | L2 0.0 us 0 TFLOPS (medians, real rows)')\n"
    )
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    fast = tmp_path / "fast"
    fast.symlink_to(script)
    rows = ab_gemm_profile.main(
        ["--tokens", "8", "--rounds", "2", "--kernels", "l1", f"base={script}", f"new={fast}"]
    )
    assert rows[1]["l1_change"] == pytest.approx(-0.1)
    assert rows[1]["l2_change"] == 0.0 and rows[1]["l2_over_l1"] == 0.0
    assert "| 8 | new | 2 | 900.0 | 0.0 | 0.000 | -10.0 % | +0.0 % | +0.0 % |" in (
        ab_gemm_profile.table(rows)
    )
