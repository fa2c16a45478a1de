"""Sweep of ``fp8_mega_moe`` against JAX-native MoE baselines (docs/design.md §6).

Usage (GPU; JAX preallocates a fraction of each GPU at first use, the fused workspace lives
outside that pool, and the DSV3 weights are 11 GB of FP8 plus 22 GB in bf16 for the bf16
baselines, so leave room)::

    XLA_PYTHON_CLIENT_MEM_FRACTION=0.7 python3 benchmarks/bench_mega_moe.py --out /tmp/bench
    XLA_PYTHON_CLIENT_MEM_FRACTION=0.7 python3 benchmarks/bench_mega_moe.py --out /tmp/bench \\
        --tokens 8,128,2048 --routing uniform --routing hot --baselines ragged,dense --ranks 2

Every visible device (or the first ``--ranks``) forms one expert axis ``ep``; each rank holds
E/R experts and M tokens. Per M and routing it times the fused layer (``fp8_mega_moe`` inside
``jit(shard_map)``; impl "fused" when a Hopper GPU and the extension are present, else
"reference") and, in the same process on the same inputs, the baselines:

- ``ragged``: ``ragged_all_to_all`` dispatch + ``lax.ragged_dot`` grouped GEMMs, bf16;
- ``pallas``: the same dispatch with JAX's Pallas Mosaic GPU grouped GEMM, bf16;
- ``pallas_fp8``: the same in FP8 without block scales (timing only: no scales are applied);
- ``dense``: capacity-based dense einsum MoE (capacity = the most slots any expert gets);
- ``dense_fp8``: the same on e4m3 operands (per-tensor activation scales, the FP8 weights
  without their block scales: timing only).

Times are device kernel time from the JAX profiler (see ``timing.py``), median over calls,
min/max over ranks, wall-clock per call as a cross-check. Writes ``results.json``,
``results.md`` and ``bench_<routing>.png`` (``plot.py``) into ``--out``.
"""

from __future__ import annotations

import os

# Leave room for the fused workspace, which is allocated outside JAX's pool (see Usage).
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.7")

import argparse  # noqa: E402
import datetime  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import zlib  # noqa: E402
from collections.abc import Callable, Sequence  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # sibling modules

import baselines  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import shapes  # noqa: E402
import timing  # noqa: E402
from plot import plot  # noqa: E402

from jax_megamoe import fp8_mega_moe  # noqa: E402

BASELINES = ("ragged", "pallas", "pallas_fp8", "dense", "dense_fp8")
BASELINE_LABELS = {
    "ragged": "ragged_all_to_all + lax.ragged_dot (bf16)",
    "pallas": "ragged_all_to_all + Pallas Mosaic GPU ragged_dot (bf16)",
    "pallas_fp8": "ragged_all_to_all + Pallas Mosaic GPU ragged_dot (fp8, no block scales)",
    "dense": "capacity-based dense einsum (bf16)",
    "dense_fp8": "capacity-based dense einsum (fp8, per-tensor scales, timing only)",
}
# Substrings that name the fused kernels' phases (first match wins; "sync" is the epoch_sync
# kernel of both the dispatch and the combine barrier); kernels matching none count as "other".
PHASES = ("stage", "route", "sync", "l1", "l2", "combine")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    d = shapes.DSV3
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--tokens", type=shapes.csv_ints, default=list(shapes.TOKENS), help="per rank")
    p.add_argument("--hidden", type=int, default=d["hidden"])
    p.add_argument("--intermediate", type=int, default=d["intermediate"])
    p.add_argument("--experts", type=int, default=d["experts"])
    p.add_argument("--topk", type=int, default=d["topk"])
    p.add_argument(
        "--routing",
        action="append",
        help=f"one of {shapes.ROUTINGS} (repeat or comma-separate; default all)",
    )
    p.add_argument("--ranks", type=int, default=None, help="use the first N devices (default all)")
    p.add_argument("--impl", default="auto", choices=["auto", "fused", "reference"])
    p.add_argument(
        "--baselines",
        default=",".join(BASELINES),
        help=f"comma-separated subset of {BASELINES}, or 'none'",
    )
    p.add_argument("--iters", type=int, default=20, help="timed calls per measurement")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--sets", type=int, default=3, help="input sets rotated between calls")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sm-budget", type=int, default=0, help="SMs for the fused kernels (0 = all)")
    p.add_argument("--no-profile", action="store_true", help="wall-clock only")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--out", default="bench_out")
    args = p.parse_args(argv)
    routings = []
    for r in args.routing or [",".join(shapes.ROUTINGS)]:
        routings += [v for v in r.split(",") if v]
    for r in routings:
        if r not in shapes.ROUTINGS:
            p.error(f"--routing {r!r}: expected one of {shapes.ROUTINGS}")
    args.routing = list(dict.fromkeys(routings))
    names = [] if args.baselines == "none" else [b for b in args.baselines.split(",") if b]
    for b in names:
        if b not in BASELINES:
            p.error(f"--baselines {b!r}: expected a subset of {BASELINES}")
    args.baselines = names
    return args


def _phases(kernel_totals: dict[str, float]) -> dict[str, float]:
    out: dict[str, float] = {}
    for name, us in kernel_totals.items():
        low = name.lower()
        phase = next((ph for ph in PHASES if ph in low), "other")
        out[phase] = out.get(phase, 0.0) + us
    return out


def _measure(fn: Callable, arg_sets: list[tuple], args, module: str) -> dict:
    out, t = timing.measure(fn, arg_sets, args, module)
    out["phases_us"] = _phases(t.kernel_totals)
    return out


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    shape = shapes.Shape(args.hidden, args.intermediate, args.experts, args.topk)
    mesh = shapes.make_mesh(args.ranks)
    num_ranks = mesh.shape[shapes.AXIS]
    platform = mesh.devices.flat[0].platform
    if shape.experts % num_ranks:
        raise SystemExit(f"--experts {shape.experts} is not divisible by {num_ranks} ranks")
    os.makedirs(args.out, exist_ok=True)

    # The workspace first, sized for the largest M, before the big allocations.
    buffer = shapes.make_buffer(mesh, shape, max(args.tokens), args.sm_budget)
    impl = args.impl if args.impl != "auto" else ("fused" if buffer.allocated else "reference")
    weights = jax.block_until_ready(shapes.make_weights(mesh, shape, args.seed))

    skip: dict[str, str] = {}
    if platform == "cpu":
        skip["ragged"] = "skipped: ragged_all_to_all does not run on CPU"
    why = baselines.pallas_available()
    for name in ("pallas", "pallas_fp8"):
        if name in skip:
            continue
        if platform == "cpu":
            skip[name] = "skipped: ragged_all_to_all and Mosaic GPU do not run on CPU"
        elif why:
            skip[name] = f"skipped: {why}"
    w_bf16 = None
    if any(b in args.baselines and b not in skip for b in ("ragged", "pallas", "dense")):
        try:
            w_bf16 = jax.block_until_ready(shapes.bf16_weights(mesh, weights))
        except Exception as e:  # e.g. no room for 22 GB of bf16 weights at R=1
            for b in ("ragged", "pallas", "dense"):
                skip.setdefault(b, f"bf16 weights: {timing.failure(e)}")
            gc.collect()

    def fused(x, x_scale, ids, tw, w):
        return fp8_mega_moe(x, x_scale, ids, tw, w, buffer=buffer, axis_name=shapes.AXIS, impl=impl)

    fused.__name__ = "megamoe_fused"
    fused_fn = shapes.shard_jit(fused, mesh, 5)

    rows = []
    for routing in args.routing:
        for m in args.tokens:
            rows.append(
                _one_point(args, mesh, shape, routing, m, fused_fn, weights, w_bf16, skip, impl)
            )
            # Kept current so a run stopped at its time limit still leaves its points behind.
            with open(os.path.join(args.out, "results_partial.json"), "w") as f:
                json.dump(rows, f, indent=1, default=str)
            gc.collect()
    buffer.close()

    devices = list(mesh.devices.flat)
    result = {
        "meta": {
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "command": " ".join(
                [os.path.basename(sys.argv[0]) if argv is None else "bench_mega_moe.py"]
                + list(sys.argv[1:] if argv is None else argv)
            ),
            "device_kind": devices[0].device_kind,
            "platform": platform,
            "num_ranks": num_ranks,
            "jax_version": jax.__version__,
            "shape": vars(shape),
            "impl": impl,
            "workspace_bytes_per_rank": buffer.nbytes_per_rank,
            "iters": args.iters,
            "sets": args.sets,
            "peak_fp8_flops": shapes.ceilings(devices[0].device_kind).fp8_flops,
            "hbm_bytes_per_s": shapes.ceilings(devices[0].device_kind).hbm_bytes_per_s,
            "baselines": {b: BASELINE_LABELS[b] for b in args.baselines},
            "mem_fraction": os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION"),
        },
        "rows": rows,
    }
    timing.write_results(result, args.out, markdown_table(result))
    if not args.no_plot:
        plot(result, args.out)
    return result


def _one_point(args, mesh, shape, routing, m, fused_fn, weights, w_bf16, skip, impl) -> dict:
    num_ranks = mesh.shape[shapes.AXIS]
    base_seed = args.seed * 1_000_003 + zlib.crc32(routing.encode()) % 9973 * 131 + m
    sets = [
        shapes.make_input_set(mesh, shape, m, routing, base_seed + 7919 * j)
        for j in range(args.sets)
    ]
    rates = shapes.ceilings(mesh.devices.flat[0].device_kind)
    floor_s = float(
        np.mean([shapes.floor_seconds(m, s.ids_host, shape, num_ranks, rates) for s in sets])
    )
    flops = shapes.flops_per_rank(m, shape)
    # Per input set, the most experts any rank must stream: plot.py redraws the floor from it.
    touched = [
        int(shapes.touched_experts(s.ids_host, shape.experts, num_ranks).max()) for s in sets
    ]
    row: dict = {
        "routing": routing,
        "tokens": m,
        "flops_per_rank": flops,
        "floor_us": floor_s * 1e6,
        "touched_experts_max": max(touched),
        "touched_experts_per_set": touched,
    }
    try:
        r = _measure(
            fused_fn,
            [(s.x, s.x_scale, s.topk_ids, s.topk_weights, weights) for s in sets],
            args,
            "megamoe_fused",
        )
        r["impl"] = impl
        r["tflops_per_gpu"] = flops / (r["max_us"] * 1e-6) / 1e12
        r["floor_ratio"] = r["max_us"] / (floor_s * 1e6)
    except Exception as e:  # one failing point must not end the sweep
        r = {"status": timing.failure(e), "impl": impl}
    row["fused"] = r
    print(_progress(row, "fused", r), flush=True)

    row["baselines"] = {}
    for name in args.baselines:
        if name in skip:
            b = {"status": skip[name]}
        else:
            try:
                fn, arg_sets = _baseline(name, mesh, shape, sets, weights, w_bf16)
                b = _measure(fn, arg_sets, args, f"baseline_{name}")
                del fn, arg_sets
            except Exception as e:  # OOM or an unsupported op: report it, keep sweeping
                b = {"status": timing.failure(e)}
            gc.collect()
        if b["status"] == "ok" and r.get("status") == "ok":
            b["speedup"] = b["max_us"] / r["max_us"]
        row["baselines"][name] = b
        print(_progress(row, name, b), flush=True)
    row["best_native"] = best_native(row["baselines"])
    del sets
    return row


def best_native(measured: dict) -> dict | None:
    """The fastest JAX-native baseline of a point (the FP8 timing references included): its
    name, time and our speedup over it; None when none ran."""
    ok = {n: b for n, b in measured.items() if b.get("status") == "ok"}
    if not ok:
        return None
    name = min(ok, key=lambda n: ok[n]["max_us"])
    best = {"status": "ok", "name": name, "max_us": ok[name]["max_us"]}
    if "speedup" in ok[name]:
        best["speedup"] = ok[name]["speedup"]
    return best


def _baseline(name, mesh, shape, sets, weights, w_bf16) -> tuple[Callable, list[tuple]]:
    num_ranks = mesh.shape[shapes.AXIS]
    if name in ("dense", "dense_fp8"):
        cap = max(baselines.dense_capacity(s.ids_host, shape.experts, num_ranks) for s in sets)
        dtype = jnp.float8_e4m3fn if name == "dense_fp8" else jnp.bfloat16

        def per_rank(x, ids, tw, w1, w2):
            return baselines.dense_moe(
                x, ids, tw, w1, w2, axis_name=shapes.AXIS, capacity=cap, compute_dtype=dtype
            )

        # The FP8 twin streams the FP8 weights as they are (no scales); bf16 the bf16 copy.
        w1, w2 = (weights.w1, weights.w2) if name == "dense_fp8" else w_bf16
        check_vma = True
    else:
        cap = max(baselines.recv_capacity(s.ids_host, shape.experts, num_ranks) for s in sets)
        gemm = baselines.xla_grouped_gemm if name == "ragged" else baselines.pallas_grouped_gemm
        dtype = jnp.float8_e4m3fn if name == "pallas_fp8" else jnp.bfloat16

        def per_rank(x, ids, tw, w1, w2):
            return baselines.ragged_moe(
                x,
                ids,
                tw,
                w1,
                w2,
                axis_name=shapes.AXIS,
                recv_capacity=cap,
                gemm=gemm,
                compute_dtype=dtype,
            )

        # The FP8 variant streams the FP8 weights as they are (no scales); bf16 ones the bf16.
        w1, w2 = (weights.w1, weights.w2) if name == "pallas_fp8" else w_bf16
        check_vma = False  # ragged_all_to_all and Pallas calls carry no varying-axis types
    per_rank.__name__ = f"baseline_{name}"
    fn = shapes.shard_jit(per_rank, mesh, 5, check_vma=check_vma)
    return fn, [(s.x_bf16, s.topk_ids, s.topk_weights, w1, w2) for s in sets]


def _progress(row: dict, name: str, r: dict) -> str:
    head = f"[{row['routing']:>7} M={row['tokens']:>5}] {name:<10}"
    if r.get("status") != "ok":
        return f"{head} {r.get('status')}"
    return (
        f"{head} {r['min_us']:10.1f} / {r['max_us']:10.1f} µs (min/max over ranks), "
        f"wall {r['wall_us']:10.1f} µs, {r['source']}"
    )


def _cell(b: dict | None) -> str:
    if b is None:
        return "-"
    if b.get("status") != "ok":
        s = b.get("status", "?")
        return "OOM" if s == "OOM" else ("skip" if s.startswith("skip") else "error")
    return f"{b['speedup']:.2f}×" if "speedup" in b else f"{b['max_us']:.0f} µs"


def markdown_table(result: dict) -> str:
    meta = result["meta"]
    names = list(meta["baselines"])
    sh = meta["shape"]
    lines = [
        f"{meta['num_ranks']} × {meta['device_kind']}, impl {meta['impl']}, "
        f"H {sh['hidden']} I {sh['intermediate']} E {sh['experts']} K {sh['topk']}, "
        f"{meta['date']}, jax {meta['jax_version']}",
        "",
        "| routing | M | fused µs (min/max) | wall µs | TFLOPS/GPU | floor µs | ×floor |"
        + "".join(f" vs {n} |" for n in names)
        + " vs best JAX-native |",
        "|---|---:|---:|---:|---:|---:|---:|" + "---:|" * len(names) + "---|",
    ]
    for row in result["rows"]:
        f = row["fused"]
        if f.get("status") == "ok":
            cells = [
                f"{f['min_us']:.1f} / {f['max_us']:.1f}",
                f"{f['wall_us']:.1f}",
                f"{f['tflops_per_gpu']:.1f}",
                f"{row['floor_us']:.1f}",
                f"{f['floor_ratio']:.2f}",
            ]
        else:
            cells = [_cell(f), "-", "-", f"{row['floor_us']:.1f}", "-"]
        cells += [_cell(row["baselines"].get(n)) for n in names]
        best = row.get("best_native")
        cells.append(f"{_cell(best)} ({best['name']})" if best else "-")
        lines.append(f"| {row['routing']} | {row['tokens']} | " + " | ".join(cells) + " |")
    notes = {
        f"{n}: {b['status']}"
        for row in result["rows"]
        for n, b in [("fused", row["fused"]), *row["baselines"].items()]
        if b.get("status") != "ok"
    }
    sources = {
        b["source"]
        for row in result["rows"]
        for b in [row["fused"], *row["baselines"].values()]
        if b.get("source")
    }
    lines += ["", f"timing source: {'; '.join(sorted(sources)) or '-'}"]
    lines += [f"- {n}" for n in sorted(notes)]
    phase_lines = []
    for row in result["rows"]:
        ph = row["fused"].get("phases_us")
        if ph:
            top = sorted(ph.items(), key=lambda kv: -kv[1])[:6]
            desc = ", ".join(f"{k} {v:.1f}" for k, v in top)
            timeline = row["fused"].get("timeline_us")
            if timeline:  # one call of the first rank: the span's idle time between kernels
                desc += f"; idle between kernels {sum(r[3] for r in timeline):.1f}"
            phase_lines.append(f"- {row['routing']} M={row['tokens']}: {desc} (µs/call)")
    if phase_lines:
        lines += ["", "fused, per phase (kernel names grouped by substring, mean over ranks):"]
        lines += phase_lines
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
