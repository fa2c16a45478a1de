"""How fast the card writes, for the route phase's traffic without its kernel.

At R = 1 route_fill reads each token's FP8 row once and writes it into its K pool rows: at
M = 2048 (DeepSeek-V3 shape) 15 MB read and 117 MB written, in ~42 µs (~2.9 TB/s). Whether that
is near the card's write rate decides whether a faster fill is worth building. Three XLA ops
over the same bytes, each timed from the profiler's kernel intervals:

- ``write``: [M K, H] bytes (as int32) filled from a runtime scalar: writes only.
- ``fan_out``: the [M, H] row broadcast into [M, K, H]: route_fill's bytes, in row order.
- ``copy``: [M K, H] read and written (+1): the device-to-device copy rate behind the floor.

Usage: ``python benchmarks/bench_hbm_write.py --tokens 2048,8192 [--out DIR]``.
"""

from __future__ import annotations

import argparse
import json
import os

import jax
import jax.numpy as jnp
import shapes
import timing


def ops(m: int, hidden: int, topk: int) -> dict[str, tuple]:
    """name -> (function, args, bytes moved, bytes written)."""
    words = hidden // 4
    x = jnp.arange(m * words, dtype=jnp.int32).reshape(m, words)
    big = jnp.arange(m * topk * words, dtype=jnp.int32).reshape(m * topk, words)
    row, out = 4 * m * words, 4 * m * topk * words
    return {
        "write": (
            jax.jit(lambda c: jnp.full((m * topk, words), c, jnp.int32)),
            (jnp.int32(7),),
            out,
            out,
        ),
        "fan_out": (
            jax.jit(lambda a: jnp.broadcast_to(a[:, None], (m, topk, words)) + 0),
            (x,),
            row + out,
            out,
        ),
        "copy": (jax.jit(lambda a: a + 1), (big,), 2 * out, out),
    }


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--tokens", type=shapes.csv_ints, default=[2048, 8192])
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--out", default=None, help="folder for results.json")
    args = p.parse_args(argv)
    d = shapes.DSV3
    rows = []
    print("| M | op | µs | GB written | TB/s written | TB/s moved | timing |")
    print("|---:|---|---:|---:|---:|---:|---|")
    for m in args.tokens:
        for name, (fn, fn_args, moved, written) in ops(m, d["hidden"], d["topk"]).items():
            t = timing.time_calls(fn, [fn_args], iters=args.iters)
            us = min(t.per_device_median_us().values())
            rows.append(
                dict(
                    tokens=m,
                    op=name,
                    us=us,
                    bytes_moved=moved,
                    bytes_written=written,
                    source=t.source,
                )
            )
            print(
                f"| {m} | {name} | {us:.1f} | {written / 1e9:.3f} | {written / us / 1e6:.2f} "
                f"| {moved / us / 1e6:.2f} | {t.source} |"
            )
    result = dict(device=jax.devices()[0].device_kind, shape=d, rows=rows)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "results.json"), "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
