"""Loads the CUDA extension (if it was built) and registers its XLA FFI handlers."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

try:  # Built only where a CUDA toolkit was present at install time.
    from . import _C
except ImportError:  # pragma: no cover - depends on the install
    _C = None

MEGA_MOE_TARGET = "jax_megamoe_fp8_mega_moe"


def extension_available() -> bool:
    return _C is not None


def is_sm90(device: jax.Device) -> bool:
    """True for a Hopper (compute capability 9.x) CUDA device."""
    cc = str(getattr(device, "compute_capability", ""))
    return device.platform == "gpu" and cc.startswith("9.")


def extension() -> object:
    if _C is None:
        raise RuntimeError(
            "jax_megamoe was installed without its CUDA extension (no CUDA compiler at build "
            "time); reinstall on a machine with nvcc to use impl='fused'"
        )
    return _C


@functools.cache
def register_targets() -> None:
    for name, capsule in extension().registrations().items():
        jax.ffi.register_ffi_target(name, capsule, platform="CUDA")


def fused_mega_moe(x, x_scale, topk_ids, topk_weights, weights, *, buffer_id, clamp):
    register_targets()
    call = jax.ffi.ffi_call(
        MEGA_MOE_TARGET,
        jax.ShapeDtypeStruct(x.shape, jnp.bfloat16),
        # The call exchanges data with peer ranks through the workspace: never dedupe or drop it.
        has_side_effect=True,
    )
    return call(
        x,
        x_scale,
        topk_ids,
        topk_weights,
        *weights,
        buffer_id=np.int64(buffer_id),
        activation_clamp=np.float32(np.inf if clamp is None else clamp),
    )
