"""Loads the CUDA extension ``_C`` (if it was built) and registers its XLA FFI targets.

The ops that call the targets live beside their handlers: ``mega_moe.py`` (``ffi/mega_moe.cc``)
and ``grouped_gemm.py`` (``ffi/grouped_gemm.cc``). The extension owns the target names
(``_C.FP8_MEGA_MOE_TARGET``, ...); Python only reads them.
"""

from __future__ import annotations

import functools
import json
from importlib import metadata
from pathlib import Path
from urllib.parse import unquote, urlparse

import jax
import jax.extend.core
from jax.interpreters import batching, mlir

from .checks import varying_axes

try:  # Built only where a CUDA toolkit was present at install time.
    from . import _C
except ImportError as e:  # pragma: no cover - depends on the install
    _C = None
    _LOAD_ERROR: ImportError | None = e
else:
    _LOAD_ERROR = None


def extension_available() -> bool:
    return _C is not None


def is_sm90(device: jax.Device) -> bool:
    """True for a Hopper (compute capability 9.x) CUDA device."""
    cc = str(getattr(device, "compute_capability", ""))
    return device.platform == "gpu" and cc.startswith("9.")


def _source_checkout(package_dir: Path) -> Path | None:
    """The project checkout ``package_dir`` sits in (a parent holding this project's
    pyproject.toml), or None for an installed copy (site-packages)."""
    for parent in package_dir.parents:
        if parent.name in ("site-packages", "dist-packages"):
            return None
        pyproject = parent / "pyproject.toml"
        if pyproject.is_file() and 'name = "jax-megamoe"' in pyproject.read_text():
            return parent
    return None


def _editable_source() -> Path | None:
    """The folder pip installed this package from in editable mode (``pip install -e``, from
    its ``direct_url.json``), or None for a regular install or none."""
    try:
        info = json.loads(metadata.distribution("jax-megamoe").read_text("direct_url.json") or "{}")
    except (metadata.PackageNotFoundError, ValueError):
        return None
    url = urlparse(info.get("url", ""))
    if not info.get("dir_info", {}).get("editable") or url.scheme != "file":
        return None
    return Path(unquote(url.path))


def missing_extension_reason(package_dir: Path, error: BaseException | None) -> str:
    """Why ``_C`` cannot be used, told apart by what lies in ``package_dir``: a ``_C`` library
    that failed to load, an editable install of a checkout built without CUDA, a source
    checkout imported instead of the install, or an install built without CUDA."""
    built = sorted(p.name for p in package_dir.glob("_C*.so"))
    if built:
        return (
            f"jax_megamoe's CUDA extension {package_dir / built[0]} exists but failed to load: "
            f"{error}. Check that the CUDA runtime and driver it was built against are "
            "installed and visible (LD_LIBRARY_PATH, nvidia-smi)"
        )
    checkout = _source_checkout(package_dir)
    editable = _editable_source()
    if checkout is not None and editable is not None and editable.resolve() == checkout.resolve():
        return (
            f"jax_megamoe is installed in editable mode from {checkout} without its CUDA "
            "extension (built with JAX_MEGAMOE_CUDA=OFF, or without nvcc on PATH); reinstall "
            "with nvcc on PATH (pip install -e .) to use impl='fused'"
        )
    if checkout is not None:
        return (
            f"jax_megamoe was imported from the source tree {package_dir} (via PYTHONPATH or "
            "the current directory), which holds no built CUDA extension; an installed copy, "
            f"if any, is shadowed. Install it (pip install --no-build-isolation {checkout}) "
            "and drop the source tree from sys.path"
        )
    return (
        f"jax_megamoe at {package_dir} was installed without its CUDA extension (no CUDA "
        "compiler at build time); reinstall on a machine with nvcc to use impl='fused'"
    )


def extension() -> object:
    """The loaded ``_C`` module; a RuntimeError that says why when it is not there."""
    if _C is None:
        raise RuntimeError(missing_extension_reason(Path(__file__).parent, _LOAD_ERROR))
    return _C


@functools.cache
def register_targets() -> None:
    for name, capsule in extension().registrations().items():
        jax.ffi.register_ffi_target(name, capsule, platform="CUDA")


@functools.cache
def _kept_call_primitive(target: str) -> jax.extend.core.Primitive:
    prim = jax.extend.core.Primitive(f"{target}_kept")
    prim.def_abstract_eval(lambda *_, shape, dtype, **__: jax.core.ShapedArray(shape, dtype))

    @functools.cache
    def jitted(params: tuple):
        return jax.jit(lambda *operands: prim.bind(*operands, **dict(params)))

    # Outside jit (eager shard_map), one compiled call per set of attributes.
    prim.def_impl(lambda *operands, **params: jitted(tuple(params.items()))(*operands))
    lower = jax.ffi.ffi_lowering(target, has_side_effect=True)

    def rule(ctx, *operands, shape, dtype, **attributes):
        return lower(ctx, *operands, **attributes)

    mlir.register_lowering(prim, rule)

    def no_batching(*_, **__):
        raise NotImplementedError(
            "fp8_mega_moe's fused kernels have no jax.vmap rule: fold the batch into the token "
            "axis (x.reshape(B * M, H), and the other token operands alike: every token is "
            "computed on its own, so the result is the same; the buffer's max_tokens_per_rank "
            "must then hold B * M) or loop with jax.lax.map"
        )

    batching.primitive_batchers[prim] = no_batching
    return prim


def kept_call(target: str, result: jax.ShapeDtypeStruct):
    """``jax.ffi.ffi_call(target, result, has_side_effect=True)`` without a JAX effect.

    XLA must never deduplicate or drop the fused layer's call (peers wait for it), so its
    custom call is marked ``has_side_effect``. ffi_call says so with a JAX effect too, and a jit
    whose program has an effect never takes JAX's C++ dispatch path: every call of it, and of
    any step that contains the layer, ran jit's Python path (on an H200 host the layer's
    dispatch took 0.64 ms, and 0.20 ms without the effect; benchmarks/bench_wall.py). This
    primitive has no effect and lowers to the same custom call, attribute included. Without an
    effect, JAX itself drops a call whose result is unused, before lowering; every rank runs
    the same program, so every rank drops it alike.
    """
    prim = _kept_call_primitive(target)

    def call(*operands, **attributes):
        return prim.bind(*operands, shape=tuple(result.shape), dtype=result.dtype, **attributes)

    return call


def call_varying(call, *operands, axes: tuple = (), **attributes):
    """``call(*operands, **attributes)`` for an ``jax.ffi.ffi_call`` made here, typed right under
    ``jax.shard_map`` with check_vma.

    ffi_call types its results as identical on every device, which they are not: a ``lax.scan``
    carrying one, a ``psum`` or an ``out_specs`` check would be typed wrong. The results are
    marked varying over every manual axis an operand varies over, and over ``axes`` (the fused
    layer adds its expert axis: its output depends on every rank's tokens).
    """
    union = frozenset(axes).union(*(varying_axes(x) for x in operands))

    def vary(x):
        missing = tuple(sorted(union - varying_axes(x)))
        return jax.lax.pcast(x, missing, to="varying") if missing else x

    return jax.tree.map(vary, call(*operands, **attributes))
