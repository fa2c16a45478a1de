"""DeepGEMM's grouped FP8 GEMM on the pools that ``bench_gemm.py`` times, with cuBLAS FP8
through PyTorch beside it: the strongest published block-scaled grouped GEMM for Hopper,
measured the way this repository measures its own.

Not part of the package and not one of its dependencies: it needs PyTorch and an importable
``deep_gemm``. ``device_run.sh``'s ``peer`` mode builds DeepGEMM from a source tree that you
send with the device call (nothing of it is stored in this repository) and runs this script.
Its measurements of DeepGEMM 54e2261 on H200s: ``benchmarks/RESULTS.md``, 2026-12-04,
"DeepGEMM's grouped FP8 GEMM beside ours on the same pools".

Usage (one Hopper GPU, PyTorch and deep_gemm; run bench_gemm.py first, on the same card, for
the pools)::

    python3 benchmarks/bench_gemm.py --out /tmp/gemm --tokens 2048,8192
    python3 benchmarks/bench_peer_gemm.py --gemm-results /tmp/gemm/results.json --out /tmp/peer

Per M (tokens per rank), in one process on one GPU:

- ``dg_l1``: ``deep_gemm.m_grouped_fp8_gemm_nt_contiguous`` (its SM90 "1D2D" kernel), pool
  ``[rows, H] x W1[e] [2I, H]^T`` with 1x128 activation and 128x128 weight scales (our
  recipe), bf16 out ``[rows, 2I]``. It does less than our L1: no SwiGLU, no routing weight,
  no requantization, and it writes 4x the bytes (bf16 gate and up, not e4m3 SwiGLU).
- ``dg_l2``: the same on ``act [rows, I] x W2[e] [H, I]^T``, bf16 out ``[rows, H]``, the work
  of our L2.
- ``cublas_l1`` / ``cublas_l2``: ``torch._scaled_mm`` on e4m3 operands with per-tensor scales,
  f32 out, the pool's real rows rounded up to 16 against one expert's weights: the GEMM that
  ``bench_gemm.py`` times through XLA, here through PyTorch, tying the two processes together.
  PyTorch takes cuBLASLt's heuristic pick where XLA autotunes: at L1's shape it reached 16 %
  fewer TFLOPS than XLA's in the same call (RESULTS.md, 2026-12-04), so the targets' ratios
  come from ``bench_gemm.py``'s column, not from this one ("torch cuBLAS").

The pools are those of a ``bench_gemm.py`` run (its ``results.json``: the shape and, per M,
the rows each local expert received), each expert's rows from a multiple of 128 rows
(DeepGEMM's contiguous layout needs that; ours uses it), padding rows as random as real ones
and marked -1 in DeepGEMM's row-to-expert map.
Values: normal, quantized per 1x128 group (activations) and per 128x128 block (weights).
Timing as ``bench_gemm.py``: warm-up calls, ``--iters`` blocking calls on the wall clock, then
``--iters`` blocking calls under ``torch.profiler``; a call's time is its kernels' device time,
median over calls; TFLOPS over real rows; ``--chill-gb`` as there. Each DeepGEMM output is
checked against a float32 product of the dequantized operands on a few experts' rows
(``calc_diff``) before it is timed.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import sys
import time
from collections.abc import Sequence

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # sibling modules

import numpy as np  # noqa: E402
import timing  # noqa: E402  (its kernel grouping; it loads JAX only to time JAX calls)
import torch  # noqa: E402

KERNELS = ("dg_l1", "cublas_l1", "dg_l2", "cublas_l2")
E4M3_MAX = 448.0


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--gemm-results", required=True, help="bench_gemm.py's results.json: shape and pools"
    )
    p.add_argument("--tokens", default="", help="only these M of it (comma-separated)")
    p.add_argument("--iters", type=int, default=20, help="timed calls per measurement")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument(
        "--chill-gb", type=float, default=0.0, help="as bench_gemm.py's (DeepGEMM's method: 8)"
    )
    p.add_argument("--sets", type=int, default=2, help="input sets rotated between calls")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench_peer_gemm_out")
    args = p.parse_args(argv)
    with open(args.gemm_results) as f:
        gemm = json.load(f)
    for k in ("hidden", "intermediate", "local_experts", "topk", "ranks", "routing"):
        setattr(args, k, gemm["meta"][k])
    keep = {int(t) for t in args.tokens.split(",") if t.strip()}
    args.pools = [
        (r["tokens"], np.asarray(r["expert_counts"], np.int64))
        for r in gemm["rows"]
        if not keep or r["tokens"] in keep
    ]
    if not args.pools:
        p.error(f"{args.gemm_results} holds no pools (for --tokens {args.tokens!r})")
    return args


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """e4m3 values and f32 scales per 1x128 group: [r, k] -> [r, k], [r, k / 128]."""
    r, k = x.shape
    g = x.float().view(r, k // 128, 128)
    s = g.abs().amax(-1).clamp_min(1e-4) / E4M3_MAX
    return (g / s.unsqueeze(-1)).to(torch.float8_e4m3fn).view(r, k), s


def quantize_blocks(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """e4m3 values and f32 scales per 128x128 block: [n, k] -> [n, k], [n / 128, k / 128]."""
    n, k = w.shape
    g = w.float().view(n // 128, 128, k // 128, 128)
    s = g.abs().amax(dim=(1, 3)).clamp_min(1e-4) / E4M3_MAX
    return (g / s[:, None, :, None]).to(torch.float8_e4m3fn).view(n, k), s


def make_weights(experts: int, n: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    q = torch.empty((experts, n, k), device="cuda", dtype=torch.float8_e4m3fn)
    s = torch.empty((experts, n // 128, k // 128), device="cuda", dtype=torch.float32)
    for e in range(experts):
        q[e], s[e] = quantize_blocks(torch.randn((n, k), device="cuda"))
    return q, s


def pool_layout(counts: np.ndarray) -> torch.Tensor:
    """The pool's row-to-expert map: each expert's rows from a multiple of 128, -1 on padding
    (``jax_megamoe.pool.pool_layout``'s rows, without JAX: this process loads only PyTorch)."""
    aligned = -(-counts // 128) * 128
    layout = np.full(int(aligned.sum()), -1, np.int32)
    start = 0
    for e, (c, a) in enumerate(zip(counts, aligned, strict=True)):
        layout[start : start + c] = e
        start += a
    return torch.from_numpy(layout).cuda()


def random_pools(rows: int, k: int, sets: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [quantize_rows(torch.randn((rows, k), device="cuda")) for _ in range(sets)]


def calc_diff(x: torch.Tensor, y: torch.Tensor) -> float:  # jax_megamoe.calc_diff, in PyTorch
    x, y = x.double(), y.double()
    return float(1 - 2 * (x * y).sum() / (x * x + y * y).sum())


def check_dg(dg, a, a_s, w, w_s, layout: torch.Tensor, experts: Sequence[int]) -> float:
    """DeepGEMM's output on up to 64 rows of each of ``experts`` against float32 math."""
    n = w.shape[1]
    d = torch.full((a.shape[0], n), float("nan"), device="cuda", dtype=torch.bfloat16)
    dg.m_grouped_fp8_gemm_nt_contiguous(
        (a, dg.get_mn_major_tma_aligned_tensor(a_s)), (w, w_s), d, layout
    )
    worst = 0.0
    lay = layout.cpu().numpy()
    for e in experts:
        idx = np.nonzero(lay == e)[0][:64]
        if idx.size == 0:
            continue
        rows = torch.from_numpy(idx).cuda()
        a_rows = a.view(torch.uint8)[rows].view(torch.float8_e4m3fn)  # gather as bytes
        af = a_rows.float() * a_s[rows].repeat_interleave(128, 1)
        wf = w[e].float() * w_s[e].repeat_interleave(128, 0).repeat_interleave(128, 1)
        worst = max(worst, calc_diff(d[rows].float(), af @ wf.t()))
    return worst


def device_kernels(prof) -> list:
    return [  # FunctionEvent times are µs
        timing.Kernel(e.name, e.time_range.start * 1e3, e.time_range.end * 1e3)
        for e in prof.events()
        if e.device_type == torch.autograd.DeviceType.CUDA
    ]


class Chill:
    """``--chill-gb``: zeros over a buffer of that many GB before every call, as bench_gemm.py
    writes them; the profile leaves out the kernels that writing them launched once here."""

    def __init__(self, gb: float):
        self.buf = torch.empty(int(gb * 1e9) // 4, device="cuda", dtype=torch.int32)
        acts = [torch.profiler.ProfilerActivity.CUDA]
        with torch.profiler.profile(activities=acts) as prof:
            self()
        self.names = {k.name for k in device_kernels(prof)}

    def __call__(self):
        self.buf.zero_()
        torch.cuda.synchronize()


def measure(fn, arg_sets: list[tuple], args, chill: Chill | None) -> dict:
    """bench_gemm.py's method with PyTorch's profiler: warm-up, a wall-clock loop, a profiled
    loop; every call blocks, each after ``chill`` if given."""

    def call(j) -> float:  # µs on the wall clock, the pause before it left out
        if chill is not None:
            chill()
        t0 = time.perf_counter()
        fn(*arg_sets[j % len(arg_sets)])
        torch.cuda.synchronize()
        return (time.perf_counter() - t0) * 1e6

    for j in range(max(args.warmup, 1)):
        call(j)
    wall = [call(j) for j in range(args.iters)]
    acts = [torch.profiler.ProfilerActivity.CUDA]
    try:
        with torch.profiler.profile(activities=acts) as prof:
            for j in range(args.iters):
                call(j)
        skip = chill.names if chill is not None else set()
        kernels = [k for k in device_kernels(prof) if k.name not in skip]
        t = timing.timing_from_kernels({"/device:GPU:0": kernels}, args.iters)
    except Exception as e:  # a broken profile must not lose the measurement
        t = timing.Timing(source=f"wall-clock (profile unusable: {e})", wall_us=[])
    t.wall_us = wall
    out = t.summary()
    out["status"] = "ok"
    return out


def one_point(args, m: int, counts: np.ndarray, dg, w1, w2, chill: Chill | None) -> dict:
    h, i = args.hidden, args.intermediate
    n = int(counts.sum())
    layout = pool_layout(counts)
    pools1 = random_pools(layout.numel(), h, args.sets)
    pools2 = random_pools(layout.numel(), i, args.sets)
    dense_rows = max(16, -(-n // 16) * 16)
    row = {"tokens": m, "rows": n, "pool_rows": int(layout.numel()), "dense_rows": dense_rows}
    flops = {
        "dg_l1": 2.0 * n * 2 * i * h,
        "dg_l2": 2.0 * n * h * i,
        "cublas_l1": 2.0 * dense_rows * 2 * i * h,
        "cublas_l2": 2.0 * dense_rows * h * i,
    }
    # The experts checked: the first, the last and one between, each with real rows.
    touched = np.nonzero(counts)[0]
    check = sorted({int(touched[0]), int(touched[len(touched) // 2]), int(touched[-1])})
    one = torch.ones((), device="cuda")
    scaled_mm = functools.partial(
        torch._scaled_mm, scale_a=one, scale_b=one, out_dtype=torch.float32
    )
    setups = {}
    for kind, (w, w_s), pools in (("l1", w1, pools1), ("l2", w2, pools2)):
        row[f"dg_{kind}_calc_diff"] = check_dg(dg, *pools[0], w, w_s, layout, check)
        d = torch.empty((layout.numel(), w.shape[1]), device="cuda", dtype=torch.bfloat16)
        sets = [((q, dg.get_mn_major_tma_aligned_tensor(s)), (w, w_s), d, layout) for q, s in pools]
        setups[f"dg_{kind}"] = (dg.m_grouped_fp8_gemm_nt_contiguous, sets)
        dense = [(q[:dense_rows], w[0].t()) for q, _ in pools]  # mat2 column-major
        setups[f"cublas_{kind}"] = (scaled_mm, dense)
    for kind in KERNELS:
        fn, sets = setups[kind]
        try:
            r = measure(fn, sets, args, chill)
            r["tflops"] = flops[kind] / (r["max_us"] * 1e-6) / 1e12
        except Exception as e:  # one failing point must not end the sweep
            r = {"status": timing.failure(e)}
        r["flops"] = flops[kind]
        row[kind] = r
        line = f"[M={m:>5}] {kind:<10} "
        if r["status"] == "ok":
            line += f"{r['max_us']:10.1f} µs {r['tflops']:7.1f} TFLOPS, wall {r['wall_us']:.1f}"
            line += f" µs, {r['source']}"
        else:
            line += r["status"]
        print(line, flush=True)
    for kind in ("l1", "l2"):
        ours, base = row[f"dg_{kind}"], row[f"cublas_{kind}"]
        if ours["status"] == "ok" and base["status"] == "ok":
            ours["tflops_vs_cublas"] = ours["tflops"] / base["tflops"]
    return row


def markdown_table(result: dict) -> str:
    lines = [
        "| M | rows | DG L1 µs | DG L1 TFLOPS | torch cuBLAS L1 | DG L1 / torch cuBLAS | DG L2 µs "
        "| DG L2 TFLOPS | torch cuBLAS L2 | DG L2 / torch cuBLAS | calc_diff L1 / L2 |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]

    def cells(r: dict, base: dict) -> list[str]:
        if r["status"] != "ok":
            return [r["status"], "", "", ""]
        b = f"{base['tflops']:.0f}" if base["status"] == "ok" else base["status"]
        ratio = f"{r['tflops_vs_cublas']:.2f}" if "tflops_vs_cublas" in r else ""
        return [f"{r['max_us']:.1f}", f"{r['tflops']:.0f}", b, ratio]

    for row in result["rows"]:
        c1 = cells(row["dg_l1"], row["cublas_l1"])
        c2 = cells(row["dg_l2"], row["cublas_l2"])
        diff = f"{row['dg_l1_calc_diff']:.1e} / {row['dg_l2_calc_diff']:.1e}"
        lines.append(f"| {row['tokens']} | {row['rows']} | " + " | ".join([*c1, *c2, diff]) + " |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    import deep_gemm as dg  # a peer's build, not a dependency of this package

    if dg.get_mk_alignment_for_contiguous_layout() != 128:
        raise SystemExit("this DeepGEMM build aligns experts' rows to other than 128 rows")
    os.makedirs(args.out, exist_ok=True)
    torch.backends.cuda.matmul.allow_tf32 = False  # the check's float32 products
    torch.manual_seed(args.seed)
    num_local = args.local_experts
    h, i = args.hidden, args.intermediate
    w1 = make_weights(num_local, 2 * i, h)
    w2 = make_weights(num_local, h, i)
    chill = Chill(args.chill_gb) if args.chill_gb > 0 else None
    rows = [one_point(args, m, counts, dg, w1, w2, chill) for m, counts in args.pools]
    result = {
        "meta": {
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "command": " ".join(["bench_peer_gemm.py", *(sys.argv[1:] if argv is None else argv)]),
            "device_kind": torch.cuda.get_device_name(),
            "torch_version": torch.__version__,
            "deep_gemm_version": getattr(dg, "__version__", "?"),
            "gemm_results": args.gemm_results,
            "hidden": h,
            "intermediate": i,
            "local_experts": num_local,
            "topk": args.topk,
            "ranks": args.ranks,
            "routing": args.routing,
            "iters": args.iters,
            "chill_gb": args.chill_gb,
            "sets": args.sets,
        },
        "rows": rows,
    }
    timing.write_results(result, args.out, markdown_table(result))
    return result


if __name__ == "__main__":
    main()
