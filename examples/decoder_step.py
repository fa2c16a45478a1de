"""A small decoder forward step with an FP8 MoE block in every layer, on whatever devices exist.

Each layer is pre-norm: ``x += attention(rms_norm(x))`` then ``x += moe(rms_norm(x))``, where the
MoE is ``jax_megamoe.MegaMoE`` (router, top-k, FP8 quantization, ``fp8_mega_moe``). The layers'
parameters are stacked on a leading axis and applied by one ``lax.scan`` inside one ``jax.jit``.

All local devices form one expert axis ``"ep"``: a ``shard_map`` gives each device a slice of the
batch and ``E/R`` of every layer's experts (with one device the mesh has one rank). On Hopper
GPUs with the CUDA extension built, the MoE runs the fused kernels; anywhere else (CPU included)
it runs the pure-JAX reference. To check the result, the script also runs the same model on one
device with the reference MoE and prints calc_diff between the two (0 to ~1e-7 on CPU, where both
use the reference: the MoE is bitwise the same, but XLA's CPU attention can round differently when
the batch is split; below ~1e-4 with the fused kernels).

    python examples/decoder_step.py --small      # seconds, on CPU
    python examples/decoder_step.py              # a larger step, timed
"""

from __future__ import annotations

import argparse
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import jax_megamoe as mm

HEAD_DIM = 64


def rms_norm(x, scale):
    x32 = x.astype(jnp.float32)
    return x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + 1e-6) * scale


def attention(x, w_qkv, w_out):
    """Causal multi-head self-attention over each sequence of ``x`` [B, S, H]."""
    b, s, h = x.shape
    qkv = (x.astype(jnp.bfloat16) @ w_qkv).reshape(b, s, 3, h // HEAD_DIM, HEAD_DIM)
    out = jax.nn.dot_product_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], is_causal=True)
    return (out.reshape(b, s, h) @ w_out).astype(jnp.float32)


def init_params(key, *, layers, hidden, intermediate, experts):
    """Every layer's parameters, stacked on a leading layer axis."""

    def one_layer(key):
        k_attn, k_out, k_moe = jax.random.split(key, 3)
        w_qkv = jax.random.normal(k_attn, (hidden, 3 * hidden)) * hidden**-0.5
        w_out = jax.random.normal(k_out, (hidden, hidden)) * hidden**-0.5
        router, experts_w = mm.init_weights(
            k_moe, num_experts=experts, hidden=hidden, intermediate=intermediate
        )
        return dict(
            attn_norm=jnp.ones(hidden),
            w_qkv=w_qkv.astype(jnp.bfloat16),
            w_out=w_out.astype(jnp.bfloat16),
            moe_norm=jnp.ones(hidden),
            router=router,
            experts=experts_w,  # MoEWeights: every leaf [E, ...]
        )

    return jax.vmap(one_layer)(jax.random.split(key, layers))


def decoder(x, params, moe: mm.MegaMoE):
    """``x`` [B, S, H] float32 through every layer of ``params``; ``moe`` is the MoE block."""

    def layer(x, p):
        x = x + attention(rms_norm(x, p["attn_norm"]), p["w_qkv"], p["w_out"])
        b, s, h = x.shape
        tokens = rms_norm(x, p["moe_norm"]).astype(jnp.bfloat16).reshape(b * s, h)
        y = moe(tokens, p["router"], p["experts"])
        return x + y.astype(jnp.float32).reshape(b, s, h), None

    # Unrolled: XLA's while loop leaves the GPU idle ~19 us per iteration on an H200, more than
    # the kernel boundaries of the whole layer (~1 us unrolled; benchmarks/RESULTS.md, per-layer
    # overhead). The cost is compile time growing with the layer count; unroll=k in between.
    return jax.lax.scan(layer, x, params, unroll=True)[0]


def param_specs(params):
    """Experts split over "ep" (axis 1: axis 0 is the layer); everything else replicated."""
    specs = jax.tree.map(lambda _: P(), params)
    specs["experts"] = jax.tree.map(lambda _: P(None, "ep"), params["experts"])
    return specs


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--small", action="store_true", help="tiny shapes (L=2 S=8 H=I=128 K=2): seconds on CPU"
    )
    p.add_argument("--layers", type=int, default=4, help="decoder layers (default: 4)")
    p.add_argument("--batch", type=int, default=None, help="sequences (default: 2 per device)")
    p.add_argument("--seq", type=int, default=128, help="tokens per sequence (default: 128)")
    p.add_argument("--hidden", type=int, default=1024, help="model width (default: 1024)")
    p.add_argument("--intermediate", type=int, default=512, help="expert width (default: 512)")
    p.add_argument("--experts", type=int, default=None, help="experts (default: 8 per device)")
    p.add_argument("--topk", type=int, default=4, help="experts per token (default: 4)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    if p.parse_args(argv).small:  # other defaults; flags given explicitly still win
        p.set_defaults(layers=2, seq=8, hidden=128, intermediate=128, topk=2)
    args = p.parse_args(argv)

    devices = jax.devices()
    ranks = len(devices)
    batch = args.batch or 2 * ranks
    experts = args.experts or 8 * ranks
    if batch % ranks:
        p.error(f"--batch {batch} must be divisible by the {ranks} devices")
    mesh = Mesh(np.array(devices), ("ep",))

    k_params, k_x = jax.random.split(jax.random.key(args.seed))
    params = init_params(
        k_params,
        layers=args.layers,
        hidden=args.hidden,
        intermediate=args.intermediate,
        experts=experts,
    )
    x = jax.random.normal(k_x, (batch, args.seq, args.hidden))

    # One workspace serves every layer: the layers run one after another and share its shapes.
    buffer = mm.SymmBuffer.create(
        mesh,
        "ep",
        num_experts=experts,
        hidden=args.hidden,
        intermediate=args.intermediate,
        topk=args.topk,
        max_tokens_per_rank=batch // ranks * args.seq,
    )
    with buffer:
        moe = mm.MegaMoE(topk=args.topk, scoring="sigmoid", axis_name="ep", buffer=buffer)
        specs = param_specs(params)
        step = jax.jit(
            jax.shard_map(
                functools.partial(decoder, moe=moe),
                mesh=mesh,
                in_specs=(P("ep"), specs),
                out_specs=P("ep"),
            )
        )
        x_sharded = jax.device_put(x, NamedSharding(mesh, P("ep")))
        params_sharded = jax.device_put(
            params, jax.tree.map(lambda s: NamedSharding(mesh, s), specs)
        )
        y = step(x_sharded, params_sharded).block_until_ready()  # compiles
        start = time.perf_counter()
        y = step(x_sharded, params_sharded).block_until_ready()
        ms = (time.perf_counter() - start) * 1e3
        impl = "fused" if buffer.allocated else "reference"

    # The same model on one device, every expert local, with the reference MoE.
    one_device = jax.jit(
        functools.partial(decoder, moe=mm.MegaMoE(topk=args.topk, scoring="sigmoid"))
    )
    want = one_device(x, params)
    result = dict(
        devices=f"{ranks} x {devices[0].device_kind}",
        impl=impl,
        shape=f"L={args.layers} B={batch} S={args.seq} H={args.hidden} I={args.intermediate} "
        f"E={experts} K={args.topk}",
        step_ms=ms,
        output_rms=float(jnp.sqrt(jnp.mean(y * y))),
        calc_diff=float(mm.calc_diff(y, want)),
        max_abs_diff=float(jnp.max(jnp.abs(y - want))),
    )
    shown = dict(result, step_ms=f"{ms:.2f} ms (one call, after compiling)")
    for name, value in shown.items():
        print(f"{name:<13} {value:.3e}" if isinstance(value, float) else f"{name:<13} {value}")
    return result


if __name__ == "__main__":
    main()
