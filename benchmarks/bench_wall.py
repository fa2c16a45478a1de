"""Where the wall clock of one blocking call of the fused layer goes, beyond its device time.

    python3 benchmarks/bench_wall.py --tokens 8,2048 --out /tmp/wall

Per M it times three jitted ``shard_map`` programs on the same arguments (the layer's five
operands, expert weights included), each called and then blocked on, one call at a time:

- ``fused``: ``fp8_mega_moe``;
- ``dense``: the dense capacity einsum baseline (plain XLA kernels, about as long on device);
- ``trivial``: one elementwise op on the activations (what any jitted call costs).

and reports per call the medians of ``dispatch`` (until ``fn(*args)`` returns: Python, jit's
argument checks, XLA's launch of the program), ``wait`` (from then until ``block_until_ready``
returns) and ``wall`` (both), with the device time from the profiler. ``wall - device`` is the
host's share of a call. Then the host side of one profiled run of ``fused`` and one of
``trivial``: the host trace events (Python frames, XLA's runtime annotations, CUDA API calls
where the profiler records them), summed per name and divided by the calls, largest first; the
runtime events (no Python frames) are listed again with the trivial call's beside them. Writes
``results.json`` into ``--out``.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.7")

import argparse  # noqa: E402
import glob  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections import defaultdict  # noqa: E402
from collections.abc import Sequence  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # sibling modules

import baselines  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import shapes  # noqa: E402
import timing  # noqa: E402

from jax_megamoe import fp8_mega_moe  # noqa: E402


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    d = shapes.DSV3
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--tokens", type=shapes.csv_ints, default=[8, 2048], help="tokens per rank M")
    p.add_argument("--hidden", type=int, default=d["hidden"])
    p.add_argument("--intermediate", type=int, default=d["intermediate"])
    p.add_argument("--experts", type=int, default=64, help="global experts E")
    p.add_argument("--topk", type=int, default=d["topk"])
    p.add_argument("--ranks", type=int, default=1, help="use the first N devices")
    p.add_argument("--iters", type=int, default=30, help="timed calls per program")
    p.add_argument("--top", type=int, default=20, help="host events listed")
    p.add_argument("--out", default="/tmp/megamoe_wall")
    args = p.parse_args(argv)
    args.shape = shapes.Shape(args.hidden, args.intermediate, args.experts, args.topk)
    return args


def split_times(fn, args: tuple, iters: int) -> dict[str, float]:
    """Median µs of dispatch, wait and wall over ``iters`` blocking calls (after two warm-ups)."""
    for _ in range(2):
        jax.block_until_ready(fn(*args))
    dispatch, wait = [], []
    for _ in range(iters):
        t0 = time.perf_counter()
        out = fn(*args)
        t1 = time.perf_counter()
        jax.block_until_ready(out)
        t2 = time.perf_counter()
        dispatch.append((t1 - t0) * 1e6)
        wait.append((t2 - t1) * 1e6)
    walls = [a + b for a, b in zip(dispatch, wait, strict=True)]
    return {
        "dispatch_us": statistics.median(dispatch),
        "wait_us": statistics.median(wait),
        "wall_us": statistics.median(walls),
    }


def host_events(fn, args: tuple, iters: int, module: str) -> tuple[float, list[tuple]]:
    """Device µs per call and the host trace events of ``iters`` profiled calls:
    (name, µs per call, count per call), largest first."""
    from jax.profiler import ProfileData

    with tempfile.TemporaryDirectory(prefix="megamoe_wall_") as d:
        with jax.profiler.trace(d):
            for _ in range(iters):
                jax.block_until_ready(fn(*args))
        device_us = timing.parse_profile(d, iters, module=module).summary()["max_us"]
        totals: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
        for f in glob.glob(os.path.join(d, "**", "*.xplane.pb"), recursive=True):
            for plane in ProfileData.from_file(f).planes:
                if plane.name.startswith("/device:"):
                    continue
                for line in plane.lines:
                    for ev in line.events:
                        t = totals[f"{plane.name} | {ev.name}"]
                        t[0] += ev.duration_ns / 1e3
                        t[1] += 1
    rows = sorted(
        ((n, us / iters, c / iters) for n, (us, c) in totals.items()), key=lambda r: -r[1]
    )
    return device_us, rows


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    mesh = shapes.make_mesh(args.ranks)
    shape = args.shape
    buffer = shapes.make_buffer(mesh, shape, max(args.tokens))
    weights = jax.block_until_ready(shapes.make_weights(mesh, shape, 0))

    def fused(x, x_scale, ids, tw, w):
        return fp8_mega_moe(x, x_scale, ids, tw, w, buffer=buffer, axis_name=shapes.AXIS)

    def trivial(x, x_scale, ids, tw, w):
        return (x.astype(jnp.float32) * x_scale[:, :1]).astype(jnp.bfloat16)

    fused.__name__ = "megamoe_fused"
    programs = {
        "fused": shapes.shard_jit(fused, mesh, 5),
        "trivial": shapes.shard_jit(trivial, mesh, 5),
    }
    result: dict = {"device_kind": mesh.devices.flat[0].device_kind, "rows": []}
    for m in args.tokens:
        s = shapes.make_input_set(mesh, shape, m, "uniform", 1000 + m)
        operands = (s.x, s.x_scale, s.topk_ids, s.topk_weights, weights)
        row: dict = {"tokens": m}
        for name, fn in programs.items():
            row[name] = split_times(fn, operands, args.iters)
        cap = baselines.dense_capacity(s.ids_host, shape.experts, mesh.shape[shapes.AXIS])

        def dense(x, ids, tw, w1, w2, cap=cap):
            return baselines.dense_moe(
                x,
                ids,
                tw,
                w1,
                w2,
                axis_name=shapes.AXIS,
                capacity=cap,
                compute_dtype=jnp.float8_e4m3fn,
            )

        dense_args = (s.x_bf16, s.topk_ids, s.topk_weights, weights.w1, weights.w2)
        row["dense_fp8"] = split_times(shapes.shard_jit(dense, mesh, 5), dense_args, args.iters)
        device_us, events = host_events(programs["fused"], operands, args.iters, "megamoe_fused")
        _, trivial_events = host_events(programs["trivial"], operands, args.iters, "trivial")
        row["fused"]["device_us"] = device_us
        row["host_events"] = {
            "fused": [list(e) for e in events[: args.top]],
            "trivial": [list(e) for e in trivial_events[: args.top]],
        }
        result["rows"].append(row)
        print(f"[M={m:>5}] fused device {device_us:8.1f} µs")
        for name in (*programs, "dense_fp8"):
            r = row[name]
            print(
                f"[M={m:>5}] {name:<9} dispatch {r['dispatch_us']:8.1f}  wait {r['wait_us']:8.1f}"
                f"  wall {r['wall_us']:8.1f} µs"
            )
        print(f"[M={m:>5}] host events of fused, per call (µs, count), largest first:")
        for n, us, c in events[: args.top]:
            print(f"    {us:9.1f} µs {c:6.1f}x  {n}")
        # XLA's and the runtime's own events (Python frames are named "$file:line ..."), beside
        # the trivial call's: what the layer adds to a call inside PjRt's Execute.
        trivial_us = {n: us for n, us, _ in trivial_events}
        print(f"[M={m:>5}] runtime events, per call: fused µs, trivial µs, count in fused:")
        runtime = [e for e in events if " | $" not in e[0]]
        for n, us, c in runtime[: args.top]:
            print(f"    {us:9.1f} {trivial_us.get(n, 0.0):9.1f} {c:6.1f}x  {n}")
    os.makedirs(args.out, exist_ok=True)
    timing.write_results(result, args.out, "")
    buffer.close()
    return result


if __name__ == "__main__":
    main()
