"""A/B of several builds of ``tools/gemm_profile.cu`` (the two GEMMs timed without JAX).

Each process launch of ``gemm_profile`` times L1 and L2 at one M over ``--iters`` launches and
prints their medians. This runs the builds' binaries in alternation, ``--rounds`` times per M,
and tabulates per build the median over rounds of L1's time, L2's time and L2 / L1 of the same
process.

The GEMMs run at the card's power cap. After a pause (a process's start, its fills) the card
has headroom and runs the first tens of milliseconds 10-20 % faster, so a short measurement
catches a mix of that transient and the steady state (seen on H200 on 2026-12-02, RESULTS.md
"the two modes at M = 8192 are a transient"). Hence many launches per process by default (the
steady state is what a serving loop sees), and the ratio column: L1 and L2 shift together, so
a build that touches only L2 is judged by L2 / L1, since L1 runs the same code in both builds.
Medians over several rounds of alternating launches, not a single run of each build.

At the cap the two GEMMs share one energy budget, so a change that speeds up one can slow the
other. ``--kernels l1`` (or ``l2``) times one GEMM alone in each process, which tells such a
coupling from a change of that GEMM's own code (the other's columns then read 0).

Usage (``device_run.sh abprof`` builds the binaries and calls this):

    python3 benchmarks/ab_gemm_profile.py --tokens 2048,8192 --rounds 4 \\
        main=/tmp/gp_main new=/tmp/gp_new
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
from collections.abc import Sequence

# gemm_profile's result line: "L1 <µs> us <TFLOPS> TFLOPS | L2 <µs> us <TFLOPS> TFLOPS ...".
_LINE = re.compile(r"L1 ([0-9.]+) us [0-9.]+ TFLOPS \| L2 ([0-9.]+) us")


def parse_line(text: str) -> tuple[float, float]:
    """(L1 µs, L2 µs) from one gemm_profile run's output."""
    m = _LINE.search(text)
    if m is None:
        raise ValueError(f"no 'L1 ... | L2 ...' line in gemm_profile's output:\n{text}")
    return float(m.group(1)), float(m.group(2))


def _build(spec: str) -> tuple[str, str]:
    name, sep, path = spec.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"{spec!r}: expected NAME=BINARY")
    return name, path


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("builds", nargs="+", type=_build, help="NAME=BINARY, the first is the base")
    p.add_argument("--tokens", default="2048,8192", help="comma-separated M values")
    p.add_argument("--rounds", type=int, default=3, help="launches of each build per M")
    p.add_argument("--iters", type=int, default=200, help="gemm_profile's timed launches")
    p.add_argument(
        "--kernels", default="both", choices=("both", "l1", "l2"), help="the GEMMs each run times"
    )
    p.add_argument("--out", default=None, help="also write every run to this JSON file")
    args = p.parse_args(argv)
    names = [n for n, _ in args.builds]
    if len(set(names)) != len(names):
        p.error(f"build names must differ: {names}")
    if args.rounds < 1:
        p.error("--rounds must be at least 1")
    args.tokens = [int(t) for t in args.tokens.split(",") if t]
    return args


def run_once(binary: str, tokens: int, iters: int, kernels: str = "both") -> tuple[float, float]:
    # Only when asked: a gemm_profile from before 2026-12-03 has no --kernels.
    only = [] if kernels == "both" else ["--kernels", kernels]
    out = subprocess.run(
        [binary, "--tokens", str(tokens), "--iters", str(iters), *only],
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode != 0:
        raise RuntimeError(f"{binary} --tokens {tokens} exited {out.returncode}:\n{out.stderr}")
    return parse_line(out.stdout)


def _ratio(num: float, den: float) -> float:
    return num / den if den > 0 else 0.0


def _change(value: float, base: float) -> float:
    return value / base - 1 if base > 0 else 0.0


def summarize(runs: list[dict], names: list[str]) -> list[dict]:
    """Per (M, build): the medians over rounds of L1, L2 and L2 / L1, and L1's and L2's changes
    against the first build (L2's by the time and by the ratio). A GEMM left out (0 µs) reads 0
    in its change, and in the ratio when it is L1."""
    rows = []
    for tokens in dict.fromkeys(r["tokens"] for r in runs):
        base = None
        for name in names:
            mine = [r for r in runs if r["tokens"] == tokens and r["build"] == name]
            row = {
                "tokens": tokens,
                "build": name,
                "rounds": len(mine),
                "l1_us": statistics.median(r["l1_us"] for r in mine),
                "l2_us": statistics.median(r["l2_us"] for r in mine),
                "l2_over_l1": statistics.median(_ratio(r["l2_us"], r["l1_us"]) for r in mine),
            }
            if base is None:
                base = row
            row["l1_change"] = _change(row["l1_us"], base["l1_us"])
            row["l2_change"] = _change(row["l2_us"], base["l2_us"])
            row["ratio_change"] = _change(row["l2_over_l1"], base["l2_over_l1"])
            rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    lines = [
        "| M | build | rounds | L1 µs | L2 µs | L2 / L1 | L1 vs first | L2 vs first "
        "| L2/L1 vs first |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['tokens']} | {r['build']} | {r['rounds']} | {r['l1_us']:.1f} | "
            f"{r['l2_us']:.1f} | {r['l2_over_l1']:.3f} | {100 * r['l1_change']:+.1f} % | "
            f"{100 * r['l2_change']:+.1f} % | {100 * r['ratio_change']:+.1f} % |"
        )
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    runs = []
    for tokens in args.tokens:
        for rnd in range(args.rounds):
            for name, binary in args.builds:  # alternating: a drift hits every build alike
                l1, l2 = run_once(binary, tokens, args.iters, args.kernels)
                runs.append(
                    {"tokens": tokens, "round": rnd, "build": name, "l1_us": l1, "l2_us": l2}
                )
                print(f"M={tokens} round {rnd} {name}: L1 {l1:.1f} us, L2 {l2:.1f} us", flush=True)
    rows = summarize(runs, [n for n, _ in args.builds])
    print(table(rows))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"runs": runs, "summary": rows}, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
