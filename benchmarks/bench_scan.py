"""Per-layer overhead of the fused layer inside a multi-layer jitted step: one ``jax.jit`` over a
``lax.scan`` of L MoE layers (``fp8_mega_moe`` on one buffer, each layer's bf16 output
requantized to FP8 as the next layer's input), against the same program with one layer.

    XLA_PYTHON_CLIENT_MEM_FRACTION=0.7 python3 benchmarks/bench_scan.py --out /tmp/scan
    python3 benchmarks/bench_scan.py --layers 16 --tokens 8,128,2048 --experts 64 --out /tmp/scan

Every layer uses the same expert weights (one layer's worth of memory; at the default shape they
are far larger than the L2 cache, so no layer finds them cached) and the same routing. Per M it
reports, per layer:

- ``busy``: device time, the union of the kernels' intervals divided by L;
- ``gaps``: the device's idle time between a call's first and last kernel, divided by L (launch
  latency, the loop's control flow, anything the host does between kernels);
- ``wall``: the blocking call's wall clock divided by L;
- ``overhead``: (wall(L) - wall(1)) / (L - 1) - busy: what one more layer costs beyond its
  kernels. The project's target is under 20 us per layer (docs/design.md §6).
"""

from __future__ import annotations

import os

# Leave room for the fused workspace, which is allocated outside JAX's pool.
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.7")

import argparse  # noqa: E402
import datetime  # noqa: E402
import sys  # noqa: E402
from collections.abc import Sequence  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # sibling modules

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import shapes  # noqa: E402
import timing  # noqa: E402

from jax_megamoe import SymmBuffer, fp8_mega_moe, quantize_per_token  # noqa: E402


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    d = shapes.DSV3
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--layers", type=int, default=8, help="layers L of the scan (>= 2)")
    p.add_argument("--tokens", type=shapes.csv_ints, default=[8, 128], help="tokens per rank M")
    p.add_argument("--hidden", type=int, default=d["hidden"])
    p.add_argument("--intermediate", type=int, default=d["intermediate"])
    p.add_argument("--experts", type=int, default=64, help="global experts E")
    p.add_argument("--topk", type=int, default=d["topk"])
    p.add_argument("--ranks", type=int, default=None, help="use the first N devices (default all)")
    p.add_argument("--impl", default="auto", choices=["auto", "fused", "reference"])
    p.add_argument("--iters", type=int, default=10, help="timed calls per measurement")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--sets", type=int, default=2, help="input sets rotated between calls")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--unroll",
        type=int,
        default=1,
        help="lax.scan's unroll: 1 keeps XLA's loop (the default), L unrolls it fully, so "
        "comparing them shows what the loop itself costs per layer",
    )
    p.add_argument("--no-profile", action="store_true", help="wall-clock only")
    p.add_argument("--out", default="bench_scan_out")
    args = p.parse_args(argv)
    if args.layers < 2:
        p.error(f"--layers {args.layers}: the per-layer overhead needs at least 2 layers")
    if not args.tokens or min(args.tokens) < 1:
        p.error(f"--tokens {args.tokens}: every M must be >= 1")
    return args


def layer_stack(buffer: SymmBuffer, impl: str, num_layers: int, name: str, unroll: int = 1):
    """The per-rank step: ``num_layers`` MoE layers in one ``lax.scan`` (``unroll`` as there;
    ``unroll >= num_layers`` unrolls fully, as ``unroll=True``: an int as large as the length
    leaves a one-trip loop in some JAX versions, 0.11 among them)."""
    full = unroll >= num_layers

    def step(x, x_scale, ids, tw, w):
        def layer(carry, _):
            y = fp8_mega_moe(*carry, ids, tw, w, buffer=buffer, axis_name=shapes.AXIS, impl=impl)
            return quantize_per_token(y.astype(jnp.float32)), None

        (x, _), _ = jax.lax.scan(
            layer, (x, x_scale), None, length=num_layers, unroll=True if full else unroll
        )
        return x

    step.__name__ = name  # the profile keeps this program's kernels by module name
    return step


def per_layer(result: dict, num_layers: int) -> dict:
    """µs per layer of one program's summary: busy, gaps (span - busy) and wall."""
    busy = result["max_us"] / num_layers
    span = result.get("span_max_us")
    return {
        "busy_us": busy,
        "gaps_us": None if span is None else max(span - result["max_us"], 0.0) / num_layers,
        "wall_us": result["wall_us"] / num_layers,
    }


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    shape = shapes.Shape(args.hidden, args.intermediate, args.experts, args.topk)
    mesh = shapes.make_mesh(args.ranks)
    if shape.experts % mesh.shape[shapes.AXIS]:
        raise SystemExit(f"--experts {shape.experts} is not divisible by the ranks")
    os.makedirs(args.out, exist_ok=True)
    buffer = shapes.make_buffer(mesh, shape, max(args.tokens))
    impl = args.impl if args.impl != "auto" else ("fused" if buffer.allocated else "reference")
    weights = jax.block_until_ready(shapes.make_weights(mesh, shape, args.seed))
    programs = {
        n: shapes.shard_jit(
            layer_stack(buffer, impl, n, f"megamoe_scan_{n}", min(args.unroll, n)), mesh, 5
        )
        for n in (1, args.layers)
    }

    rows = []
    for m in args.tokens:
        sets = [
            shapes.make_input_set(mesh, shape, m, "uniform", args.seed * 7919 + 131 * m + j)
            for j in range(args.sets)
        ]
        arg_sets = [(s.x, s.x_scale, s.topk_ids, s.topk_weights, weights) for s in sets]
        row: dict = {"tokens": m}
        for n, fn in programs.items():
            out, _ = timing.measure(fn, arg_sets, args, f"megamoe_scan_{n}")
            row[f"layers_{n}"] = {**out, **per_layer(out, n)}
        one, many = row["layers_1"], row[f"layers_{args.layers}"]
        extra_wall = (many["wall_us"] * args.layers - one["wall_us"]) / (args.layers - 1)
        row["overhead_us"] = extra_wall - many["busy_us"]
        rows.append(row)
        print(
            f"[M={m:5d}] L={args.layers}: busy {many['busy_us']:.1f}, gaps "
            f"{many['gaps_us'] if many['gaps_us'] is not None else float('nan'):.1f}, wall "
            f"{many['wall_us']:.1f}, overhead {row['overhead_us']:.1f} µs per layer",
            flush=True,
        )
    buffer.close()

    device = mesh.devices.flat[0]
    meta = {
        "device_kind": device.device_kind,
        "num_ranks": mesh.shape[shapes.AXIS],
        "impl": impl,
        "layers": args.layers,
        "unroll": args.unroll,
        "shape": shape.__dict__,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "jax": jax.__version__,
    }
    table = [
        f"{meta['num_ranks']} × {device.device_kind}, impl {impl}, H {shape.hidden} "
        f"I {shape.intermediate} E {shape.experts} K {shape.topk}, L = {args.layers} layers per "
        f"step (scan unroll {args.unroll}), {meta['date']}, jax {meta['jax']}",
        "",
        "| M | busy µs/layer | gaps µs/layer | wall µs/layer | one layer: wall µs | "
        "overhead µs/layer |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        many = r[f"layers_{args.layers}"]
        gaps = "–" if many["gaps_us"] is None else f"{many['gaps_us']:.1f}"
        table.append(
            f"| {r['tokens']} | {many['busy_us']:.1f} | {gaps} | {many['wall_us']:.1f} | "
            f"{r['layers_1']['wall_us']:.1f} | {r['overhead_us']:.1f} |"
        )
    table += [
        "",
        "overhead = (wall(L) - wall(1)) / (L - 1) - busy per layer; timing source: "
        + ", ".join(sorted({r[f"layers_{args.layers}"]["source"] for r in rows})),
    ]
    result = {"meta": meta, "rows": rows}
    timing.write_results(result, args.out, "\n".join(table) + "\n")
    return result


if __name__ == "__main__":
    main()
