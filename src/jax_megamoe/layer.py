"""A complete MoE inference layer: router, FP8 quantization of the activations, fp8_mega_moe."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from . import checks
from .api import Impl, fp8_mega_moe
from .quant import quantize_blockwise, quantize_per_token
from .symm_buffer import SymmBuffer
from .weights import MoEWeights, transform_weights

Scoring = Literal["softmax", "sigmoid"]


def route(
    hidden: jax.Array,
    router_weight: jax.Array,
    topk: int,
    *,
    scoring: Scoring = "softmax",
    normalize: bool | None = None,
    scaling: float = 1.0,
    bias: jax.Array | None = None,
    num_groups: int = 1,
    topk_groups: int | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Top-k routing over expert logits ``hidden @ router_weight`` (f32).

    ``softmax``: weights are the softmax probabilities of the chosen experts (Mixtral/Qwen
    style); ``sigmoid``: sigmoid affinities, renormalized over the chosen k. ``normalize``
    overrides the renormalization; ``scaling`` multiplies the weights.

    DeepSeek-V3's gate (``scoring="sigmoid"``, ``bias=e_score_correction_bias``,
    ``num_groups=8``, ``topk_groups=4``, ``scaling=2.5``): ``bias`` [E] is added to the scores
    to choose the experts only, the weights stay the unbiased scores. With ``num_groups`` > 1
    the experts form that many contiguous groups; each token keeps its ``topk_groups`` best
    groups, a group scoring as its best expert (its best two, summed, with a bias), and picks
    its k experts among theirs. Ties go to the lower index.

    Returns ``(topk_ids int32 [M, K], topk_weights float32 [M, K])``.
    """
    scaling = checks.check_route_options(scoring, normalize, scaling)
    hidden, router_weight = checks.check_route_inputs(hidden, router_weight, topk)
    num_experts = router_weight.shape[1]
    bias = checks.check_group_routing(num_experts, topk, bias, num_groups, topk_groups)
    logits = jnp.dot(
        hidden.astype(jnp.float32),
        router_weight.astype(jnp.float32),
        precision=jax.lax.Precision.HIGHEST,
    )
    scores = jax.nn.softmax(logits, axis=-1) if scoring == "softmax" else jax.nn.sigmoid(logits)
    # Without a bias the experts are chosen on the logits, which order them as the scores do
    # but do not saturate: in f32, sigmoid(20) == sigmoid(30) == 1 and a softmax probability
    # underflows to 0, and those ties went to the lower index, not the larger logit.
    choice = logits if bias is None else scores + bias.astype(jnp.float32)[None, :]
    if num_groups > 1:
        grouped = choice.reshape(choice.shape[0], num_groups, num_experts // num_groups)
        if bias is None:
            group_score = jnp.max(grouped, axis=-1)
        else:
            group_score = jnp.sum(jax.lax.top_k(grouped, 2)[0], axis=-1)
        _, kept = jax.lax.top_k(group_score, topk_groups)
        group_ids = jnp.arange(num_groups, dtype=kept.dtype)[None, None, :]
        keep = jnp.any(kept[:, :, None] == group_ids, axis=1)  # [M, groups]
        dropped = jnp.repeat(~keep, num_experts // num_groups, axis=1)  # [M, E]
        # Every expert of a kept group before any of a dropped one, then by choice (ties to
        # the lower index): masking the dropped ones with -inf tied them with an expert whose
        # bias is -inf, and the tie could pick a dropped group's expert.
        ids = jnp.lexsort((-choice, dropped), axis=-1)[:, :topk]
    else:
        _, ids = jax.lax.top_k(choice, topk)
    weights = jnp.take_along_axis(scores, ids, axis=-1)
    if normalize if normalize is not None else scoring == "sigmoid":
        # Renormalized in the log domain: chosen sigmoid scores that all underflow (logits
        # below about -88) made weights / sum(weights) 0 / 0.
        log_scores = (
            jax.nn.log_softmax(logits, axis=-1)
            if scoring == "softmax"
            else jax.nn.log_sigmoid(logits)
        )
        weights = jax.nn.softmax(jnp.take_along_axis(log_scores, ids, axis=-1), axis=-1)
    return ids.astype(jnp.int32), (weights * scaling).astype(jnp.float32)


@dataclass(frozen=True)
class MegaMoE:
    """An inference MoE layer over bf16, f16 or f32 activations; returns ``[M, H]`` in
    ``hidden``'s dtype (the values are the layer's bf16 output, so a residual stream in f16 or
    f32 keeps its dtype through ``lax.scan``).

    ``weights`` holds this rank's experts (``MoEWeights``); under ``shard_map`` pass the local
    shard and the expert axis name. ``router_weight`` is ``[H, E]`` over all experts, and
    ``router_bias`` (optional, ``[E]``) the bias that chooses experts without weighting them.
    The routing fields are :func:`route`'s; DeepSeek-V3's layer is ``MegaMoE(topk=8,
    scoring="sigmoid", scaling=2.5, num_groups=8, topk_groups=4, ...)`` called with its
    ``e_score_correction_bias`` as ``router_bias``.
    """

    topk: int
    scoring: Scoring = "softmax"
    normalize: bool | None = None
    scaling: float = 1.0
    num_groups: int = 1
    topk_groups: int | None = None
    activation_clamp: float | None = None
    axis_name: str | None = None
    buffer: SymmBuffer | None = None
    impl: Impl = "auto"

    def __post_init__(self):
        # The fields are the layer's configuration, compiled into its trace, and jax.jit(layer)
        # hashes them: a 0-d array (unhashable) becomes the Python number it holds.
        checks.check_route_options(self.scoring, self.normalize, self.scaling, "MegaMoE")
        if isinstance(self.scaling, np.ndarray | jax.Array):
            try:
                object.__setattr__(self, "scaling", float(self.scaling))
            except jax.errors.ConcretizationTypeError:
                raise TypeError(
                    "MegaMoE: scaling is traced: a layer's configuration is fixed when it is "
                    "traced, so pass a Python number (or route() the tokens yourself)"
                ) from None
        object.__setattr__(self, "activation_clamp", checks.check_clamp(self.activation_clamp))

    def __call__(
        self,
        hidden: jax.Array,
        router_weight: jax.Array,
        weights: MoEWeights,
        router_bias: jax.Array | None = None,
    ) -> jax.Array:
        hidden, router_weight = checks.check_layer_inputs(
            hidden, router_weight, weights, self.axis_name, self.topk
        )
        ids, topk_weights = route(
            hidden,
            router_weight,
            self.topk,
            scoring=self.scoring,
            normalize=self.normalize,
            scaling=self.scaling,
            bias=router_bias,
            num_groups=self.num_groups,
            topk_groups=self.topk_groups,
        )
        x, x_scale = quantize_per_token(hidden)
        y = fp8_mega_moe(
            x,
            x_scale,
            ids,
            topk_weights,
            weights,
            buffer=self.buffer,
            axis_name=self.axis_name,
            activation_clamp=self.activation_clamp,
            impl=self.impl,
        )
        return y.astype(hidden.dtype)  # bf16 values, in the dtype of the residual stream


def init_weights(
    key: jax.Array, *, num_experts: int, hidden: int, intermediate: int, std: float | None = None
) -> tuple[jax.Array, MoEWeights]:
    """Random router ``[H, E]`` (f32) and FP8 expert weights for all experts, for demos, tests
    and benchmarks. Initialised with fan-in scaling so activations stay O(1)."""
    num_experts = checks.check_int("num_experts", num_experts, minimum=1)
    hidden = checks.check_int("hidden", hidden, minimum=1)
    intermediate = checks.check_int("intermediate", intermediate, minimum=1)
    checks.check_scale_blocks("init_weights: ", hidden=hidden, intermediate=intermediate)
    if std is not None:
        if not checks.is_real_scalar(std):
            raise TypeError(f"init_weights: std must be a number or None, got {std!r}")
        if not 0 < float(std) < float("inf"):
            raise ValueError(f"init_weights: std must be a positive, finite number, got {std!r}")
    k_router, k1, k2 = jax.random.split(key, 3)
    router = jax.random.normal(k_router, (hidden, num_experts), jnp.float32) / hidden**0.5
    s1 = std if std is not None else hidden**-0.5
    s2 = std if std is not None else intermediate**-0.5
    w1 = jax.random.normal(k1, (num_experts, 2 * intermediate, hidden), jnp.float32) * s1
    w2 = jax.random.normal(k2, (num_experts, hidden, intermediate), jnp.float32) * s2
    return router, transform_weights(*quantize_blockwise(w1), *quantize_blockwise(w2))
