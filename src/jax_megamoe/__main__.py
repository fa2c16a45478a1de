"""``python -m jax_megamoe``: runs the MoE layer on every local device as one expert axis and
prints shape, devices, implementation, time per call and calc_diff against a float64 oracle."""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from . import _ffi
from .buffer import SymmBuffer
from .layer import MegaMoE, init_weights, route
from .quant import calc_diff, quantize_per_token
from .reference import numpy_mega_moe_f64


def _parse(argv=None) -> argparse.Namespace:
    on_gpu = jax.devices()[0].platform == "gpu"
    p = argparse.ArgumentParser(prog="python -m jax_megamoe", description=__doc__)
    p.add_argument("--tokens", type=int, default=128 if on_gpu else 32, help="tokens per rank")
    p.add_argument("--hidden", type=int, default=2048 if on_gpu else 256)
    p.add_argument("--intermediate", type=int, default=512 if on_gpu else 128)
    p.add_argument("--experts", type=int, default=None, help="default: 8 per device")
    p.add_argument("--topk", type=int, default=4)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--impl", default="auto", choices=["auto", "fused", "reference"])
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = _parse(argv)
    devices = jax.devices()
    num_ranks = len(devices)
    experts = args.experts or 8 * num_ranks
    mesh = Mesh(np.array(devices), ("ep",))
    m, h, i, k = args.tokens, args.hidden, args.intermediate, args.topk

    key_w, key_x = jax.random.split(jax.random.key(args.seed))
    router, weights = init_weights(key_w, num_experts=experts, hidden=h, intermediate=i)
    hidden = jax.random.normal(key_x, (num_ranks * m, h), jnp.float32).astype(jnp.bfloat16)
    # The oracle's inputs, computed once on the whole (unsharded) batch.
    ids, topk_weights = route(hidden, router, k, scoring="sigmoid")
    x, x_scale = quantize_per_token(hidden)
    oracle = numpy_mega_moe_f64(x, x_scale, ids, topk_weights, jax.device_get(weights))

    buffer = SymmBuffer.create(
        mesh,
        "ep",
        num_experts=experts,
        hidden=h,
        intermediate=i,
        topk=k,
        max_tokens_per_rank=m,
    )
    with buffer:
        layer = MegaMoE(topk=k, scoring="sigmoid", axis_name="ep", buffer=buffer, impl=args.impl)
        step = jax.jit(
            jax.shard_map(layer, mesh=mesh, in_specs=(P("ep"), P(), P("ep")), out_specs=P("ep"))
        )
        sharding = NamedSharding(mesh, P("ep"))
        operands = (jax.device_put(hidden, sharding), router, jax.device_put(weights, sharding))
        y = step(*operands).block_until_ready()  # compile + warm-up
        start = time.perf_counter()
        for _ in range(args.iters):
            y = step(*operands)
        y.block_until_ready()
        ms = (time.perf_counter() - start) / args.iters * 1e3
    impl = (
        "fused"
        if buffer.nbytes_per_rank is not None and args.impl != "reference"
        else ("reference")
    )
    rows = [
        ("devices", f"{num_ranks} x {devices[0].device_kind}"),
        ("shape", f"M={m}/rank H={h} I={i} E={experts} K={k}"),
        ("impl", impl + ("" if _ffi.extension_available() else " (no CUDA extension)")),
        ("workspace", "-" if buffer.nbytes_per_rank is None else f"{buffer.nbytes_per_rank:,} B"),
        ("time/call", f"{ms:.3f} ms (wall clock, {args.iters} calls)"),
        ("calc_diff vs f64", f"{calc_diff(y, oracle):.2e}"),
    ]
    width = max(len(r[0]) for r in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")


if __name__ == "__main__":
    main()
