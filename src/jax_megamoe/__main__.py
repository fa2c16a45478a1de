"""``python -m jax_megamoe``: runs the MoE layer on every local device as one expert axis and
prints shape, devices, implementation, time per call and calc_diff against a float64 oracle."""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from . import MegaMoE, SymmBuffer, _ffi, calc_diff, init_weights, quantize_per_token, route
from .constants import MAX_TOPK
from .reference import f64_oracle_nbytes, numpy_mega_moe_f64

# In --check auto, the full oracle runs when it fits in this share of the available memory
# (the rest is headroom for the process's own arrays) and costs at most this many float64
# FLOPs (about a minute on a laptop core); otherwise a random sample of tokens is checked.
MEMORY_SHARE = 0.8
AUTO_MAX_FLOPS = 2e12


class CheckPlan(NamedTuple):
    mode: str  # "full", "sample" or "none"
    tokens: int  # tokens the oracle computes
    reason: str  # why, when it is not the full check; "" otherwise


def _gb(nbytes: float) -> str:
    return f"{nbytes / 1e9:.1f} GB"


def plan_check(
    check: str,
    *,
    tokens: int,
    hidden: int,
    intermediate: int,
    experts: int,
    topk: int,
    sample_tokens: int,
    mem_available: int | None,
) -> CheckPlan:
    """How much of the float64 oracle to run for ``tokens`` tokens (all ranks together).

    ``check``: "full", "sample" (``sample_tokens`` random tokens), "none", or "auto": full when
    it fits in ``MEMORY_SHARE`` of ``mem_available`` bytes (None: unknown, taken as enough) and
    costs at most ``AUTO_MAX_FLOPS``; else a sample when that fits; else none."""
    n_sample = min(sample_tokens, tokens)
    if check == "full":
        return CheckPlan("full", tokens, "")
    if check == "sample":
        return CheckPlan("sample", n_sample, "")
    if check == "none":
        return CheckPlan("none", 0, "--check none")

    def fits(n: int) -> bool:
        # A sample touches at most n * topk experts: only those are copied to the host.
        need = f64_oracle_nbytes(n, hidden, intermediate, min(experts, n * topk))
        return mem_available is None or need <= MEMORY_SHARE * mem_available

    full_bytes = f64_oracle_nbytes(tokens, hidden, intermediate, experts)
    flops = 6 * tokens * topk * hidden * intermediate
    if fits(tokens) and (flops <= AUTO_MAX_FLOPS or n_sample == tokens):
        return CheckPlan("full", tokens, "")
    if fits(tokens):
        why = f"the full oracle is {flops / 1e12:.1f} TFLOP in float64"
    else:
        why = f"the full oracle needs ~{_gb(full_bytes)}, {_gb(mem_available)} available"
    if fits(n_sample):
        return CheckPlan("sample", n_sample, why)
    return CheckPlan("none", 0, why)


def mem_available() -> int | None:
    """MemAvailable from /proc/meminfo in bytes; None where there is no such file."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


@contextlib.contextmanager
def _progress(what: str):
    """One stderr line per long step, with its wall time."""
    print(f"{what} ...", end="", file=sys.stderr, flush=True)
    start = time.perf_counter()
    yield
    print(f" {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)


def _int_at_least(minimum: int, what: str):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be a {what} integer, got {value}")
        return value

    return parse


_positive_int = _int_at_least(1, "positive")
_seed = _int_at_least(0, "non-negative")  # NumPy's generators take no negative seed


def _parser(on_gpu: bool) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m jax_megamoe",
        usage="%(prog)s [options]  (--help lists them)",
        description="Runs the MoE layer on every local device as one expert axis and prints "
        "the shape, devices, implementation, workspace size per rank, time per call and "
        "calc_diff against a float64 oracle. Progress goes to stderr, the table to stdout.",
    )
    sizes = [  # (flag, default, help): positive integers
        ("--tokens", 128 if on_gpu else 32, "tokens per device (rank)"),
        ("--hidden", 2048 if on_gpu else 256, "model width H, a multiple of 128"),
        ("--intermediate", 512 if on_gpu else 128, "expert FFN width I, a multiple of 128"),
        ("--experts", None, "number of experts E, divisible by the device count"),
        ("--topk", 4, f"experts per token K, at most min(E, {MAX_TOPK})"),
        ("--iters", 10, "timed calls after the warm-up call"),
        ("--sample-tokens", 128, "random tokens checked when the float64 check samples"),
    ]
    for flag, default, text in sizes:
        shown = "8 per device" if flag == "--experts" else "%(default)s"
        p.add_argument(
            flag,
            type=_positive_int,
            metavar="N",
            default=default,
            help=f"{text} (default: {shown})",
        )
    p.add_argument(
        "--impl",
        default="auto",
        choices=["auto", "fused", "reference"],
        help="fused: CUDA kernels (Hopper GPUs and the built extension); reference: pure JAX; "
        "auto (default): fused when possible",
    )
    p.add_argument(
        "--seed",
        type=_seed,
        default=0,
        help="random seed for weights and tokens (default: %(default)s)",
    )
    p.add_argument(
        "--check",
        default="auto",
        choices=["auto", "full", "sample", "none"],
        help="float64 oracle check: every token (full), --sample-tokens random tokens (sample), "
        "none, or auto (default): full when it fits in the available memory and takes about a "
        "minute at most, else a sample",
    )
    return p


def _check_against_oracle(plan, rng, y, x, x_scale, ids, topk_weights, weights) -> float:
    """calc_diff of ``y`` against the float64 oracle on the planned tokens."""
    rows = np.arange(x.shape[0])
    if plan.mode == "sample":
        rows = np.sort(rng.choice(x.shape[0], plan.tokens, replace=False))
    ids = np.asarray(ids)[rows]
    # Only the experts these tokens use go to the host, renumbered 0..len(used)-1.
    used = np.unique(ids[(ids >= 0) & (ids < weights.w1.shape[0])])
    renumber = np.full(weights.w1.shape[0], -1, np.int32)
    renumber[used] = np.arange(used.size)
    local_ids = np.where(ids >= 0, renumber[np.clip(ids, 0, None)], -1)
    host_weights = jax.device_get(jax.tree.map(lambda leaf: leaf[used], weights))
    oracle = numpy_mega_moe_f64(
        np.asarray(x)[rows],
        np.asarray(x_scale)[rows],
        local_ids,
        np.asarray(topk_weights)[rows],
        host_weights,
    )
    return calc_diff(np.asarray(y)[rows], oracle)


def main(argv=None) -> None:
    devices = jax.devices()
    parser = _parser(on_gpu=devices[0].platform == "gpu")
    args = parser.parse_args(argv)
    num_ranks = len(devices)
    experts = args.experts or 8 * num_ranks
    mesh = Mesh(np.array(devices), ("ep",))
    m, h, i, k = args.tokens, args.hidden, args.intermediate, args.topk

    try:  # the library's shape rules, reported as a usage error
        buffer = SymmBuffer.create(
            mesh, "ep", num_experts=experts, hidden=h, intermediate=i, topk=k, max_tokens_per_rank=m
        )
    except (ValueError, TypeError) as e:
        parser.error(str(e))
    with buffer:
        if args.impl == "fused" and not buffer.allocated:
            parser.error(
                "--impl fused needs Hopper (SM90) GPUs and the CUDA extension; "
                f"this run's devices are {devices[0].device_kind}"
                + ("" if _ffi.extension_available() else " and no CUDA extension")
            )
        impl = "fused" if buffer.allocated and args.impl != "reference" else "reference"
        with _progress(f"init weights (E={experts} H={h} I={i})"):
            key_w, key_x = jax.random.split(jax.random.key(args.seed))
            router, weights = init_weights(key_w, num_experts=experts, hidden=h, intermediate=i)
            hidden = jax.random.normal(key_x, (num_ranks * m, h), jnp.float32)
            hidden = hidden.astype(jnp.bfloat16).block_until_ready()
        layer = MegaMoE(topk=k, scoring="sigmoid", axis_name="ep", buffer=buffer, impl=args.impl)
        step = jax.jit(
            jax.shard_map(layer, mesh=mesh, in_specs=(P("ep"), P(), P("ep")), out_specs=P("ep"))
        )
        sharding = NamedSharding(mesh, P("ep"))
        operands = (jax.device_put(hidden, sharding), router, jax.device_put(weights, sharding))
        with _progress(f"compile ({impl})"):
            compiled = step.lower(*operands).compile()
        with _progress("warm-up call"):
            y = compiled(*operands).block_until_ready()
        with _progress(f"time {args.iters} calls"):
            start = time.perf_counter()
            for _ in range(args.iters):
                y = compiled(*operands)
            y.block_until_ready()
            ms = (time.perf_counter() - start) / args.iters * 1e3
        workspace = _workspace_text(buffer.nbytes_per_rank, buffer.allocated)  # before close()

    # The oracle's inputs: the same routing and quantization, on the whole (unsharded) batch.
    ids, topk_weights = route(hidden, router, k, scoring="sigmoid")
    x, x_scale = quantize_per_token(hidden)
    plan = plan_check(
        args.check,
        tokens=num_ranks * m,
        hidden=h,
        intermediate=i,
        experts=experts,
        topk=k,
        sample_tokens=args.sample_tokens,
        mem_available=mem_available(),
    )
    if plan.mode == "none":
        check = f"skipped ({plan.reason})"
    else:
        with _progress(f"float64 oracle on {plan.tokens} tokens"):
            rng = np.random.default_rng(args.seed)
            diff = _check_against_oracle(plan, rng, y, x, x_scale, ids, topk_weights, weights)
        check = f"{diff:.2e}"
        if plan.mode == "sample":
            check += f" ({plan.tokens} random tokens of {num_ranks * m}"
            check += f": {plan.reason})" if plan.reason else ")"

    if impl == "fused":
        why = ""
    elif args.impl == "reference":
        why = " (--impl reference)"
    elif not _ffi.extension_available():
        why = " (no CUDA extension)"
    else:
        why = " (no Hopper GPU: the fused kernels need SM90)"
    rows = [
        ("devices", f"{num_ranks} x {devices[0].device_kind}"),
        ("shape", f"M={m}/rank H={h} I={i} E={experts} K={k}"),
        ("impl", impl + why),
        ("workspace", workspace),
        ("time/call", f"{ms:.3f} ms (wall clock, {args.iters} calls)"),
        ("calc_diff vs f64", check),
    ]
    width = max(len(r[0]) for r in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")


def _workspace_text(nbytes: int, allocated: bool) -> str:
    where = "allocated" if allocated else "a Hopper GPU's size; none allocated here"
    return f"{nbytes:,} B per rank ({where})"


if __name__ == "__main__":
    main()
