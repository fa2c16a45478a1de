"""``python -m jax_megamoe``: help, usage errors, the oracle plan and small runs, in-process on CPU
(8 host devices)."""

import re
import tracemalloc

import jax
import numpy as np
import pytest
from oracle import moe_f64

from jax_megamoe import __main__ as cli
from jax_megamoe import calc_diff, init_weights, quantize_per_token, route
from jax_megamoe.reference import f64_oracle_nbytes, numpy_mega_moe_f64
from jax_megamoe.testing import make_inputs

PROG = "python -m jax_megamoe"
TINY = ["--hidden", "128", "--intermediate", "128", "--experts", "8", "--iters", "2"]
ON_CPU = jax.devices()[0].platform == "cpu"


def run(argv, capsys):
    cli.main(argv)
    return capsys.readouterr()


def table(out: str) -> dict[str, str]:
    return dict(re.match(r"(.+?)\s{2,}(.*)", line).groups() for line in out.strip().splitlines())


def test_help_explains_every_flag(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0
    text = "".join(capsys.readouterr().out.split())  # argparse wraps lines, even at hyphens
    flags = [a for a in cli._parser(on_gpu=False)._actions if a.option_strings != ["-h", "--help"]]
    assert len(flags) >= 10
    for action in flags:
        assert action.help and len(action.help) > 10, action.option_strings
        assert action.option_strings[0] in text
        assert "".join(action.help.split("(default")[0].split()) in text


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--tokens", "0"], "--tokens: must be a positive integer, got 0"),
        (["--tokens", "-3"], "--tokens: must be a positive integer, got -3"),
        (["--tokens", "1.5"], "--tokens: expected an integer, got '1.5'"),
        (["--hidden", "-128"], "--hidden: must be a positive integer"),
        (["--hidden", "200"], r"hidden \(200\) must be a positive multiple of 128"),
        (["--intermediate", "64"], r"intermediate \(64\) must be a positive multiple of 128"),
        (
            ["--experts", "8", "--topk", "9"],
            r"topk \(9\) must be in \[1, min\(num_experts=8, 32\)\]",
        ),
        (["--experts", "12"], r"num_experts \(12\) must be divisible by the expert-axis size"),
        (["--iters", "0"], "--iters: must be a positive integer"),
        # NumPy's generator refused it after the whole run, with a traceback.
        (["--seed", "-1"], "--seed: must be a non-negative integer, got -1"),
        (["--check", "most"], "--check: invalid choice"),
        pytest.param(
            ["--impl", "fused"],
            "--impl fused needs Hopper",
            marks=pytest.mark.skipif(not ON_CPU, reason="fused runs on a GPU"),
        ),
    ],
)
def test_bad_values_are_one_line_usage_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("usage: ")  # argparse's usage, then the error
    assert lines[1].startswith(f"{PROG}: error: ")
    assert re.search(message, lines[1]), lines[1]


GB = 10**9
DSV3 = dict(tokens=4 * 4096, hidden=7168, intermediate=2048, experts=256, topk=8)


@pytest.mark.parametrize(
    "check, shape, mem, sample, want_mode, want_tokens, reason",
    [
        ("auto", dict(tokens=64, hidden=256, intermediate=128, experts=16, topk=4), 8 * GB, 128,
         "full", 64, ""),
        ("auto", dict(tokens=64, hidden=256, intermediate=128, experts=16, topk=4), None, 8,
         "full", 64, ""),
        # Fits in 64 GB but is ~11 TFLOP of float64: sampled.
        ("auto", DSV3, 64 * GB, 128, "sample", 128, "TFLOP in float64"),
        # 16 GB: the full oracle (~17 GB) does not fit; 128 tokens (~12.5 GB) do.
        ("auto", DSV3, 16 * GB, 128, "sample", 128, r"needs ~17\.\d GB, 16\.0 GB available"),
        # 8 GB: 128 tokens touch every expert (11 GB of FP8 weights): skipped ...
        ("auto", DSV3, 8 * GB, 128, "none", 0, "needs ~"),
        # ... but 4 tokens touch at most 32 experts.
        ("auto", DSV3, 8 * GB, 4, "sample", 4, "needs ~"),
        ("full", DSV3, 1 * GB, 128, "full", DSV3["tokens"], ""),
        ("sample", DSV3, 1 * GB, 128, "sample", 128, ""),
        ("none", dict(tokens=8, hidden=128, intermediate=128, experts=8, topk=2), None, 128,
         "none", 0, "--check none"),
    ],
)  # fmt: skip
def test_plan_check(check, shape, mem, sample, want_mode, want_tokens, reason):
    plan = cli.plan_check(check, **shape, sample_tokens=sample, mem_available=mem)
    assert (plan.mode, plan.tokens) == (want_mode, want_tokens)
    assert re.search(reason, plan.reason) if reason else plan.reason == ""


def test_cli_oracle_matches_the_token_by_token_oracle():
    """The CLI's float64 oracle (expert by expert, for speed) against the tests' own (token by
    token), with masked slots and an expert that no token chooses."""
    inp = make_inputs(7, m=40, h=256, i=256, e=6, k=3)
    ids = np.asarray(inp["topk_ids"])
    ids = np.where(ids == 5, 4, ids)  # expert 5 gets no token
    ids[::7, 1] = -1  # masked slots
    ids[3, 2] = 6  # an id outside [0, E): masked too
    w = jax.device_get(inp["weights"])
    args = (np.asarray(inp["x"]), np.asarray(inp["x_scale"]), ids, np.asarray(inp["topk_weights"]))
    y = numpy_mega_moe_f64(*args, w)
    want = moe_f64(*args, *w)
    assert np.abs(want).max() > 0 and not (want == 0).all(axis=1).any()
    assert calc_diff(y, want) < 1e-12


@pytest.mark.parametrize("n, h, i, e, k", [(256, 1024, 512, 16, 4), (48, 2048, 1024, 8, 2)])
def test_oracle_memory_estimate_bounds_the_measured_peak(n, h, i, e, k):
    router, weights = init_weights(jax.random.key(n), num_experts=e, hidden=h, intermediate=i)
    hidden = jax.random.normal(jax.random.key(1), (n, h))
    ids, topk_weights = route(hidden, router, k)
    args = [np.asarray(a) for a in (*quantize_per_token(hidden), ids, topk_weights)]
    weights = jax.device_get(weights)
    tracemalloc.start()  # NumPy reports its allocations to tracemalloc
    try:
        y = numpy_mega_moe_f64(*args, weights)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert np.abs(y).max() > 0
    peak += sum(a.nbytes for a in args) + sum(w.nbytes for w in weights)
    estimate = f64_oracle_nbytes(n, h, i, e)
    assert peak <= estimate <= 2.5 * peak  # an upper bound, not a wild one


def test_tiny_run_reports_impl_time_and_calc_diff(capsys):
    captured = run(["--tokens", "8", *TINY], capsys)
    rows = table(captured.out)
    assert rows["devices"] == f"{len(jax.devices())} x {jax.devices()[0].device_kind}"
    assert rows["shape"] == "M=8/rank H=128 I=128 E=8 K=4"
    if ON_CPU:  # the buffer allocates nothing on CPU: what ran is the reference, and why
        assert re.fullmatch(r"reference \((no CUDA extension|no Hopper GPU: .*)\)", rows["impl"])
        assert re.fullmatch(
            r"[\d,]+ B per rank \(a Hopper GPU's size; none allocated here\)", rows["workspace"]
        )
    assert float(rows["calc_diff vs f64"]) <= 1e-5
    assert float(rows["time/call"].split()[0]) > 0
    for step in ("init weights", r"compile \(\w+\)", "warm-up call", "time 2 calls", "oracle"):
        assert re.search(rf"{step}.* \.\.\. \d+\.\d s$", captured.err, re.M), step


def test_sampled_check(capsys):
    argv = ["--tokens", "4", "--check", "sample", "--sample-tokens", "5", "--impl", "reference"]
    rows = table(run([*argv, *TINY], capsys).out)
    assert rows["impl"] == "reference (--impl reference)"
    value = rows["calc_diff vs f64"]
    assert value.endswith(f"(5 random tokens of {4 * len(jax.devices())})")
    assert float(value.split()[0]) <= 1e-5


def test_auto_check_skips_when_memory_is_short(capsys, monkeypatch):
    monkeypatch.setattr(cli, "mem_available", lambda: 10**5)
    out = run(["--tokens", "4", *TINY], capsys).out
    assert re.fullmatch(
        r"skipped \(the full oracle needs ~\d+\.\d GB, 0\.0 GB available\)",
        table(out)["calc_diff vs f64"],
    )


def test_workspace_line_is_read_before_the_buffer_closes(capsys, monkeypatch):
    """On a GPU the line said "none allocated here": it was read after the run's `with` block
    had closed the buffer. Here the buffer is marked allocated (the run still takes the
    reference path, as asked)."""
    create = cli.SymmBuffer.create

    def allocated(*args, **kwargs):
        buf = create(*args, **kwargs)
        buf.allocated = True
        return buf

    monkeypatch.setattr(cli.SymmBuffer, "create", allocated)
    rows = table(run(["--tokens", "4", "--impl", "reference", *TINY], capsys).out)
    assert re.fullmatch(r"[\d,]+ B per rank \(allocated\)", rows["workspace"]), rows["workspace"]
