"""jax_megamoe: a fused expert-parallel FP8 Mixture-of-Experts layer for JAX on Hopper GPUs."""

from .api import fp8_mega_moe
from .layer import MegaMoE, init_weights, route
from .quant import calc_diff, dequantize, quantize_blockwise, quantize_per_token
from .reference import reference_mega_moe
from .symm_buffer import MegaMoeDeviceError, SymmBuffer
from .weights import MoEWeights, transform_weights

__all__ = [
    "MegaMoE",
    "MegaMoeDeviceError",
    "MoEWeights",
    "SymmBuffer",
    "calc_diff",
    "dequantize",
    "fp8_mega_moe",
    "init_weights",
    "quantize_blockwise",
    "quantize_per_token",
    "reference_mega_moe",
    "route",
    "transform_weights",
]
__version__ = "0.1.0"
