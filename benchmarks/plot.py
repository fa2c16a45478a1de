"""Plots of a whole-layer sweep (``bench_mega_moe.py``): time and TFLOPS per GPU against tokens per
rank, one figure per routing, each implementation in the same colour in every figure.

    python3 benchmarks/plot.py                     # redraw every benchmarks/results/*.png
    python3 benchmarks/plot.py path/results.json   # draw one result, beside it

The floor is recomputed from the card's measured rates (``shapes.ceilings``), not read from the
JSON, so results recorded before a card's rates were known are drawn against the right floor.
"""

from __future__ import annotations

import glob
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # sibling modules

import shapes  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
# One colour per implementation, the same in every figure.
COLORS = {
    "fused": "tab:blue",
    "reference": "tab:cyan",
    "ragged": "tab:orange",
    "pallas": "tab:green",
    "pallas_fp8": "tab:olive",
    "dense": "tab:red",
    "dense_fp8": "tab:purple",
}


def floor_us(row: dict, meta: dict) -> float:
    """The row's floor on the card the result was measured on (µs), averaged over the input sets
    like the bench's own. Results written before the per-set counts were recorded have only the
    largest count; their redrawn floor can then be a few % high at small M."""
    shape = shapes.Shape(**meta["shape"])
    rates = shapes.ceilings(meta["device_kind"])
    touched = row.get("touched_experts_per_set", [row["touched_experts_max"]])
    floors = [shapes.floor_from(row["flops_per_rank"], t, shape, rates) for t in touched]
    return 1e6 * sum(floors) / len(floors)


def _series(rows: list[dict], meta: dict) -> dict[str, tuple[str, list[dict]]]:
    """label -> (implementation name, its point per row)."""
    impl = meta["impl"]
    ours = "jax_megamoe fused" if impl == "fused" else f"jax_megamoe ({impl} path)"
    out = {ours: (impl, [r["fused"] for r in rows])}
    for name, description in meta["baselines"].items():
        out[f"{name}: {description}"] = (name, [r["baselines"].get(name, {}) for r in rows])
    return out


def plot(result: dict, out: str, prefix: str = "bench") -> list[str]:
    """Writes ``<out>/<prefix>_<routing>.png`` per routing; returns the paths (none without
    matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot")
        return []
    meta = result["meta"]
    paths = []
    for routing in dict.fromkeys(r["routing"] for r in result["rows"]):
        fig = figure([r for r in result["rows"] if r["routing"] == routing], meta, routing)
        path = os.path.join(out, f"{prefix}_{routing}.png")
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths


def figure(rows: list[dict], meta: dict, routing: str):
    """One routing's figure: time (left) and TFLOPS per GPU (right) against M."""
    import matplotlib.pyplot as plt

    rates = shapes.ceilings(meta["device_kind"])
    fig, (ax_t, ax_f) = plt.subplots(1, 2, figsize=(12, 4.5))
    for label, (name, points) in _series(rows, meta).items():
        ok = [(r, p) for r, p in zip(rows, points, strict=True) if p.get("status") == "ok"]
        if not ok:
            continue
        xs = [r["tokens"] for r, _ in ok]
        style = dict(marker="o", color=COLORS.get(name, "tab:gray"), label=label)
        ax_t.plot(xs, [p["max_us"] for _, p in ok], **style)
        tflops = [r["flops_per_rank"] / (p["max_us"] * 1e-6) / 1e12 for r, p in ok]
        ax_f.plot(xs, tflops, **style)
    xs = [r["tokens"] for r in rows]
    floors = [floor_us(r, meta) for r in rows]
    floor_label = (
        f"floor: FLOPs at {rates.fp8_flops / 1e12:.0f} TFLOPS or weights at "
        f"{rates.hbm_bytes_per_s / 1e12:.1f} TB/s"
    )
    ax_t.plot(xs, floors, "k--", label=floor_label)
    ceiling = [r["flops_per_rank"] / f / 1e6 for r, f in zip(rows, floors, strict=True)]
    ax_f.plot(xs, ceiling, "k--", label=floor_label)  # the floor as a TFLOPS ceiling
    for ax in (ax_t, ax_f):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("tokens per rank (M)")
        ax.grid(True, which="both", alpha=0.3)
    ax_t.set_ylabel("µs per call (slowest rank)")
    ax_f.set_ylabel("TFLOPS per GPU (M·K·6·H·I / time)")
    ax_t.legend(fontsize=7)
    sh = meta["shape"]
    fig.suptitle(
        f"{meta['num_ranks']} × {meta['device_kind']}, {routing} routing, "
        f"H={sh['hidden']} I={sh['intermediate']} E={sh['experts']} K={sh['topk']}, "
        f"{meta['date'][:10]}"
    )
    fig.tight_layout()
    return fig


def replot(path: str) -> list[str]:
    """Redraws one whole-layer JSON beside it, named like it without its routing suffix
    (``2026-11-26_4xH200_skewed_hot.json`` -> ``2026-11-26_4xH200_{skewed,hot}.png``)."""
    with open(path) as f:
        result = json.load(f)
    parts = os.path.splitext(os.path.basename(path))[0].split("_")
    while len(parts) > 1 and parts[-1] in shapes.ROUTINGS:
        parts.pop()
    return plot(result, os.path.dirname(path), prefix="_".join(parts))


def is_layer_result(path: str) -> bool:
    """A ``bench_mega_moe.py`` result (``bench_gemm.py`` writes another format)."""
    with open(path) as f:
        result = json.load(f)
    return "shape" in result.get("meta", {}) and all("fused" in r for r in result["rows"])


def main(argv: list[str] | None = None) -> list[str]:
    paths = argv if argv else sorted(glob.glob(os.path.join(RESULTS, "*.json")))
    written = []
    for path in paths:
        if is_layer_result(path):
            written += replot(path)
    for path in written:
        print(path)
    return written


if __name__ == "__main__":
    main(sys.argv[1:])
