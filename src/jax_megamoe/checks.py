"""Every trace-time check of the package, in one place: operand shapes and dtypes, the MoE
dimension rules (including the limits only the CUDA kernels impose), the workspace arguments,
the grouped-GEMM pool, and how a call sits inside ``shard_map``.

Each error names the operand or argument and says what to pass instead.
"""

from __future__ import annotations

import numbers
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from . import weights as _weights
from .constants import (
    BLOCK_M,
    EXPERT_ALIGN_M,
    MAX_GEMM_CTAS,
    MAX_LOCAL_EXPERTS,
    MAX_TOPK,
    QUANT_BLOCK,
)

INT32_MAX = 2**31 - 1
# What the layer and the router take as activations and router weights (f64 with jax_enable_x64).
_ACTIVATION_DTYPES = tuple(map(np.dtype, (jnp.bfloat16, jnp.float16, jnp.float32, jnp.float64)))


def expect(name: str, arr, shape: tuple[int, ...], dtype) -> None:
    """Raises a ValueError (shape) or TypeError (dtype) that names the operand."""
    if tuple(arr.shape) != tuple(shape):
        raise ValueError(f"{name} has shape {tuple(arr.shape)}, expected {tuple(shape)}")
    if arr.dtype != jnp.dtype(dtype):
        raise TypeError(f"{name} has dtype {arr.dtype}, expected {jnp.dtype(dtype).name}")


def check_array(name: str, value, dtype=None):
    """Returns ``value`` if it is an array (JAX, NumPy or a tracer); refuses Python lists and
    other objects by name, as ``jax.numpy`` functions do (a list is a pytree of scalars, not an
    array, and converting it silently would hide a slow host round trip). ``dtype``, if given,
    is the dtype the operand must have, which an error names."""
    if isinstance(value, np.ndarray):
        # Without jax_enable_x64 JAX turns int64 into int32 (uint64 into uint32) by wrapping: an
        # id past int32 (an out-of-range id, which the call masks) would silently become a valid
        # expert.
        to = jax.dtypes.canonicalize_dtype(value.dtype)
        if to != value.dtype and np.issubdtype(value.dtype, np.integer) and value.size:
            info = np.iinfo(to)
            if value.min() < info.min or value.max() > info.max:
                want = np.dtype(dtype or to).name
                raise ValueError(
                    f"{name} ({value.dtype}) holds values outside {to.name}, which JAX converts "
                    f"it to with jax_enable_x64 off: they would wrap. Pass {want} values"
                )
        return value
    if isinstance(value, jax.Array):
        return value
    hint = " (wrap it with jnp.asarray)" if isinstance(value, list | tuple) else ""
    raise TypeError(f"{name} must be a jax or numpy array, got {type(value).__name__}{hint}")


def check_int(name: str, value, *, minimum: int, maximum: int = INT32_MAX) -> int:
    """A Python/NumPy integer (not bool, not float) in ``[minimum, maximum]`` (by default at
    most INT32_MAX: the C++ side takes these as int32)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    if not minimum <= value <= maximum:
        raise ValueError(f"{name} must be in [{minimum}, {maximum}], got {value}")
    return int(value)


def check_timeout(timeout_s) -> float | None:
    """``SymmBuffer.create``'s ``timeout_s``: None (``JAX_MEGAMOE_TIMEOUT_S``, else
    ``DEFAULT_TIMEOUT_S``) or a positive, finite number of seconds, at most 1e9 (as the C++ side
    takes it)."""
    if timeout_s is None:
        return None
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, numbers.Real):
        raise TypeError(
            f"timeout_s must be a number of seconds or None, got {timeout_s!r} "
            f"({type(timeout_s).__name__})"
        )
    if not 0 < timeout_s <= 1e9:  # NaN fails too
        raise ValueError(
            f"timeout_s must be a positive number of seconds (at most 1e9), got {timeout_s}"
        )
    return float(timeout_s)


def check_real(name: str, arr) -> None:
    """Quantization and calc_diff take real values: a complex array would lose its imaginary
    part with no more than NumPy's ComplexWarning."""
    if jnp.issubdtype(arr.dtype, jnp.complexfloating):
        raise TypeError(f"{name} must be real, got {arr.dtype}")


def check_divisible(name: str, shape: tuple[int, ...], dims: tuple[int, ...]) -> None:
    """Dimensions ``dims`` of ``shape`` must be multiples of the FP8 scale block."""
    for d in dims:
        if shape[d] % QUANT_BLOCK:
            raise ValueError(
                f"{name}: dimension {d} of shape {shape} must be a multiple of {QUANT_BLOCK} "
                "(the FP8 quantization block)"
            )


def check_scale_blocks(where: str = "", **dims: int) -> None:
    """Each of ``dims`` (``hidden``, ``intermediate``) a positive multiple of the FP8 scale
    block; the error names the one that is not, after ``where``."""
    for name, value in dims.items():
        if value <= 0 or value % QUANT_BLOCK:
            raise ValueError(
                f"{where}{name} ({value}) must be a positive multiple of {QUANT_BLOCK} "
                "(the FP8 scale block)"
            )


def check_moe_dims(
    *, num_experts: int, hidden: int, intermediate: int, topk: int, num_ranks: int
) -> None:
    """The shape rules shared by the workspace, the op and the CUDA kernels."""
    check_scale_blocks(hidden=hidden, intermediate=intermediate)
    if num_experts < 1 or num_experts % num_ranks:
        raise ValueError(
            f"num_experts ({num_experts}) must be divisible by the expert-axis size ({num_ranks})"
        )
    if num_experts // num_ranks > MAX_LOCAL_EXPERTS:
        raise ValueError(
            f"{num_experts // num_ranks} experts per rank exceed the kernels' limit of "
            f"{MAX_LOCAL_EXPERTS}: spread the experts over more ranks"
        )
    if not 1 <= topk <= min(num_experts, MAX_TOPK):
        raise ValueError(
            f"topk ({topk}) must be in [1, min(num_experts={num_experts}, {MAX_TOPK})]"
        )


def pool_rows_bound(*, num_ranks: int, num_experts: int, topk: int, max_tokens: int) -> int:
    """Rows of the worst-case pool a workspace holds: every slot of every rank routed to this
    rank, every local expert's segment padded to ``EXPERT_ALIGN_M`` rows
    (``layout/workspace.h``)."""
    worst = num_ranks * max_tokens * topk + (num_experts // num_ranks) * (EXPERT_ALIGN_M - 1)
    return -(-worst // EXPERT_ALIGN_M) * EXPERT_ALIGN_M


def check_workspace_args(*, num_ranks: int, sm_budget, **dims) -> dict[str, int]:
    """``SymmBuffer.create``'s arguments by the rules of ``workspace_nbytes`` in C++; returns
    the dimensions (``num_experts``, ``hidden``, ``intermediate``, ``topk``,
    ``max_tokens_per_rank``) as Python ints."""
    check_int("sm_budget", sm_budget, minimum=0)
    d = {name: check_int(name, value, minimum=1) for name, value in dims.items()}
    check_moe_dims(
        num_ranks=num_ranks, **{n: d[n] for n in ("num_experts", "hidden", "intermediate", "topk")}
    )
    m, k = d["max_tokens_per_rank"], d["topk"]
    rows = pool_rows_bound(num_ranks=num_ranks, num_experts=d["num_experts"], topk=k, max_tokens=m)
    if rows > INT32_MAX:
        raise ValueError(
            f"num_ranks * max_tokens_per_rank * topk ({num_ranks} * {m} * {k}) is too large: "
            "pool row indices are int32 on the device; lower max_tokens_per_rank"
        )
    return d


def check_concrete(**dims) -> None:
    """Under ``jax.export`` only the token count may be a symbolic dimension: the others set the
    workspace, the kernels' tiles and the scale blocks, which are fixed when the call is built.
    Without this a symbolic one failed inside a later comparison ("inconclusive")."""
    for name, d in dims.items():
        if jax.export.is_symbolic_dim(d):
            raise ValueError(
                f"{name} is the symbolic dimension {d}: only the token count (M) may be symbolic "
                "(jax.export); export with concrete experts, hidden, intermediate and topk"
            )


def check_weights(weights) -> tuple[int, int, int]:
    """Validates shapes and dtypes; returns ``(num_local_experts, hidden, intermediate)``."""
    if not isinstance(weights, _weights.MoEWeights):
        raise TypeError(
            f"weights must be the MoEWeights made by transform_weights, got {type(weights)}"
        )
    w1, w1s, w2, w2s = (check_array(n, v) for n, v in zip(weights._fields, weights, strict=True))
    if w1.ndim != 3 or w2.ndim != 3:
        raise ValueError(f"w1 {w1.shape} and w2 {w2.shape} must be [experts, rows, cols]")
    e, two_i, h = w1.shape
    check_concrete(**{"w1's experts": e, "w1's rows (2 * intermediate)": two_i, "w1's hidden": h})
    if e < 1:
        raise ValueError(f"w1 {w1.shape}: the weights hold no expert")
    if two_i % 2:
        raise ValueError(f"w1 {w1.shape}: dimension 1 must be 2*intermediate (gate then up)")
    i = two_i // 2
    check_scale_blocks(f"w1 {w1.shape}: ", hidden=h, intermediate=i)
    b = QUANT_BLOCK
    fp8 = jnp.float8_e4m3fn
    expected = {
        "w1": (w1, (e, 2 * i, h), fp8),
        "w1_scale": (w1s, (e, 2 * i // b, h // b), jnp.float32),
        "w2": (w2, (e, h, i), fp8),
        "w2_scale": (w2s, (e, h // b, i // b), jnp.float32),
    }
    for name, (arr, shape, dtype) in expected.items():
        expect(name, arr, shape, dtype)
    return e, h, i


# The layer's operands, and the dtype each must have.
MOE_OPERANDS = ("x", "x_scale", "topk_ids", "topk_weights")
MOE_OPERAND_DTYPES = (jnp.float8_e4m3fn, jnp.float32, jnp.int32, jnp.float32)


def check_moe_operands(x, x_scale, topk_ids, topk_weights, weights):
    """``fp8_mega_moe``'s operands; returns ``(m, hidden, intermediate, topk, num_local)``."""
    if x.ndim != 2:
        raise ValueError(f"x must be [M, H], got shape {tuple(x.shape)}")
    m, h = x.shape
    if topk_ids.ndim != 2:
        raise ValueError(f"topk_ids must be [M, K], got shape {tuple(topk_ids.shape)}")
    k = topk_ids.shape[1]
    check_concrete(**{"x's hidden (H)": h, "topk_ids' topk (K)": k})
    num_local, wh, i = check_weights(weights)
    if wh != h:
        raise ValueError(f"x has hidden {h} but the weights have hidden {wh}")
    shapes = ((m, h), (m, h // QUANT_BLOCK), (m, k), (m, k))
    for name, arr, shape, dtype in zip(
        MOE_OPERANDS, (x, x_scale, topk_ids, topk_weights), shapes, MOE_OPERAND_DTYPES, strict=True
    ):
        expect(name, arr, shape, dtype)
    if m < 1:
        raise ValueError("x must hold at least one token")
    return m, h, i, k, num_local


class MoeCall(NamedTuple):
    """A validated call of the layer: operands as JAX arrays, dimensions, ranks and clamp."""

    x: jax.Array
    x_scale: jax.Array
    topk_ids: jax.Array
    topk_weights: jax.Array
    weights: _weights.MoEWeights
    m: int
    hidden: int
    intermediate: int
    topk: int
    num_local: int
    num_ranks: int
    clamp: float | None


def check_moe_call(
    op: str, x, x_scale, topk_ids, topk_weights, weights, *, axis_name, activation_clamp
) -> MoeCall:
    """Every trace-time check of a call of the layer that does not involve a workspace:
    ``fp8_mega_moe`` adds the buffer's, ``reference_mega_moe`` runs these alone."""
    operands = (x, x_scale, topk_ids, topk_weights)
    x, x_scale, topk_ids, topk_weights = (
        jnp.asarray(check_array(name, v, dtype))
        for name, v, dtype in zip(MOE_OPERANDS, operands, MOE_OPERAND_DTYPES, strict=True)
    )
    m, h, i, k, num_local = check_moe_operands(x, x_scale, topk_ids, topk_weights, weights)
    weights = jax.tree.map(jnp.asarray, weights)  # NumPy leaves too (the operands' rule)
    check_not_explicitly_sharded(
        op,
        dict(zip(MOE_OPERANDS, (x, x_scale, topk_ids, topk_weights), strict=True))
        | dict(zip(weights._fields, weights, strict=True)),
    )
    num_ranks = axis_size(axis_name, op, weights)
    check_weights_vary(weights, axis_name=axis_name, num_ranks=num_ranks, op=op)
    check_moe_dims(
        num_experts=num_local * num_ranks, hidden=h, intermediate=i, topk=k, num_ranks=num_ranks
    )
    clamp = check_clamp(activation_clamp)
    return MoeCall(
        x, x_scale, topk_ids, topk_weights, weights, m, h, i, k, num_local, num_ranks, clamp
    )


def is_real_scalar(value) -> bool:
    """A Python or NumPy real number, or a 0-d array of an integer or floating dtype (traced or
    not); not a bool, a complex number or a string."""
    if isinstance(value, np.ndarray | jax.Array):
        dtype, real = value.dtype, value.shape == ()
        return real and (jnp.issubdtype(dtype, jnp.integer) or jnp.issubdtype(dtype, jnp.floating))
    return isinstance(value, numbers.Real) and not isinstance(value, bool | np.bool_)


def check_clamp(activation_clamp) -> float | None:
    """None, or a positive number known at trace time (the clamp is compiled into the call):
    a Python or NumPy number, or a 0-d array that is not traced. Returns it as a float."""
    if activation_clamp is None:
        return None
    if not is_real_scalar(activation_clamp):
        raise TypeError(
            f"activation_clamp must be a positive number or None, got {activation_clamp!r}"
        )
    try:
        value = float(activation_clamp)
    except jax.errors.ConcretizationTypeError:
        raise TypeError(
            "activation_clamp is traced: it is compiled into the call, so pass a Python number "
            "(a static argument of the jitted function)"
        ) from None
    if not value > 0:
        raise ValueError(f"activation_clamp must be positive, got {activation_clamp}")
    return value


def check_pool_rows(name: str, rows: int, block_m: int) -> None:
    if rows <= 0 or rows % block_m:
        raise ValueError(f"{name}: pool rows ({rows}) must be a positive multiple of {block_m}")


def check_pool(name: str, rows: int, block_expert) -> None:
    """A grouped-GEMM pool: whole ``BLOCK_M``-row blocks, one expert id per block."""
    check_pool_rows(name, rows, BLOCK_M)
    if tuple(block_expert.shape) != (rows // BLOCK_M,):
        raise ValueError(
            f"{name}: block_expert has shape {tuple(block_expert.shape)}, expected "
            f"({rows // BLOCK_M},) (one expert per {BLOCK_M}-row block)"
        )


def _check_grouped(op: str, block_expert, table) -> None:
    """A grouped GEMM's pool (the first operand's rows) and its ``(name, array, shape, dtype)``
    operand table."""
    check_pool(op, table[0][1].shape[0], block_expert)
    for name, arr, shape, dtype in table:
        expect(f"{op}: {name}", arr, shape, dtype)


def check_l1_operands(a, a_scale, row_weight, row_src, block_expert, w1, w1_scale) -> None:
    """``grouped_gemm_l1``'s operands (see its docstring for the shapes)."""
    (rows, h), (e, two_i), b, f8 = a.shape, w1.shape[:2], QUANT_BLOCK, jnp.float8_e4m3fn
    _check_grouped(
        "grouped_gemm_l1",
        block_expert,
        [
            ("a", a, (rows, h), f8),
            ("a_scale", a_scale, (rows, h // b), jnp.float32),
            ("row_weight", row_weight, (rows,), jnp.float32),
            ("row_src", row_src, (rows,), jnp.int32),
            ("w1", w1, (e, two_i // 2 * 2, h), f8),
            ("w1_scale", w1_scale, (e, two_i // b, h // b), jnp.float32),
        ],
    )


INDEX_MODES = ("drop", "promise_in_bounds")


def check_index_mode(op: str, mode) -> str:
    """A standalone GEMM's ``mode`` for its index operands: one of :data:`INDEX_MODES`."""
    if not isinstance(mode, str) or mode not in INDEX_MODES:
        raise ValueError(f"{op}: mode must be one of {INDEX_MODES}, got {mode!r}")
    return mode


def check_num_ctas(op: str, num_ctas) -> int:
    """A standalone GEMM's ``num_ctas``: an int in ``[0, MAX_GEMM_CTAS]`` (0 = every SM)."""
    return check_int(f"{op}: num_ctas (0 = every SM)", num_ctas, minimum=0, maximum=MAX_GEMM_CTAS)


def check_l2_operands(act, act_scale, row_src, block_expert, w2, w2_scale, out_rows) -> None:
    """``grouped_gemm_l2``'s operands (see its docstring for the shapes)."""
    (rows, i), (e, h), b, f8 = act.shape, w2.shape[:2], QUANT_BLOCK, jnp.float8_e4m3fn
    _check_grouped(
        "grouped_gemm_l2",
        block_expert,
        [
            ("act", act, (rows, i), f8),
            ("act_scale", act_scale, (rows, i // b), jnp.float32),
            ("row_src", row_src, (rows,), jnp.int32),
            ("w2", w2, (e, h, i), f8),
            ("w2_scale", w2_scale, (e, h // b, i // b), jnp.float32),
        ],
    )
    check_int("grouped_gemm_l2: out_rows", out_rows, minimum=1)


# --- Where the call runs: shard_map axes and the mesh --------------------------------------


def manual_axes() -> dict[str, int]:
    """The mesh axes that are manual at this point of the trace (inside ``shard_map``), with
    their sizes, in the mesh's order; ``{}`` outside ``shard_map``. Read from
    ``jax.sharding.get_abstract_mesh()`` (JAX >= 0.7); a JAX without it reports none, so the
    checks that use this are skipped."""
    get = getattr(jax.sharding, "get_abstract_mesh", None)
    mesh = get() if get is not None else None
    names = getattr(mesh, "manual_axes", ())
    return {a: int(mesh.shape[a]) for a in mesh.axis_names if a in names} if names else {}


def axis_size(axis_name: str | None, op: str, weights=None) -> int:
    """Ranks of the expert axis. ``axis_name=None`` inside ``shard_map`` over a manual axis of
    size > 1 is refused: each rank would then treat its own weight shard as every expert and
    silently compute a wrong layer. The message names the axes ``weights`` vary over, if any.
    Weights that check_vma types as the same on every device are all the experts on each: a
    data-parallel call, one rank."""
    if axis_name is None:
        sharded = {a: s for a, s in manual_axes().items() if s > 1}
        if sharded:
            varying = varying_axes(weights[0]) if weights is not None else frozenset()
            held = tuple(a for a in sharded if a in varying)  # in the mesh's order
            typed = bool(varying_axes(jax.lax.axis_index(tuple(sharded))))  # check_vma on
            if typed and weights is not None and not held:
                return 1
            if len(held) == 1:
                fix = f"pass axis_name={held[0]!r} (the mesh axis the experts are sharded over)"
            elif held:
                fix = (
                    f"the weights are sharded over {list(held)}: pass axis_name={held!r} and "
                    f"shard the weights with P({held!r})"
                )
            else:
                fix = (
                    "pass axis_name, the mesh axis the experts are sharded over (with check_vma "
                    "off their sharding cannot be read: if every device holds all experts, keep "
                    "check_vma on, and the call runs data-parallel)"
                )
            raise ValueError(
                f"{op} is called inside shard_map over {sorted(sharded)} with axis_name=None: "
                f"{fix}. Without it each rank routes only to its own experts"
            )
        return 1
    names = axis_name if isinstance(axis_name, tuple) else (axis_name,)
    if not names or not all(isinstance(n, str) for n in names):
        raise TypeError(
            f"{op}: axis_name must be a mesh axis name (str) or None, got {axis_name!r}"
        )
    check_axis_order(names, op)
    try:
        return jax.lax.axis_size(axis_name)
    except NameError as e:
        raise ValueError(
            f"axis_name {axis_name!r} is not bound here: call {op} inside a shard_map over that "
            "mesh axis, or pass axis_name=None on one device"
        ) from e


def check_axis_order(names: tuple[str, ...], op: str) -> None:
    """An expert axis of several mesh axes must name them once each, in the mesh's order. The
    order decides which experts a rank holds (its index along the tuple), and the weights'
    PartitionSpec must give the same order; their typing shows only the set of axes they vary
    over, so a tuple in another order than P's silently gave each rank another rank's experts.
    Requiring the mesh's order (P's natural one) leaves one order to get right."""
    mesh_order = tuple(a for a in manual_axes() if a in names)
    distinct = len(set(names)) == len(names)
    if distinct and (len(mesh_order) < len(names) or mesh_order == names):
        return  # in order, or an axis is not bound here (which axis_size reports)
    fix = mesh_order if len(mesh_order) == len(set(names)) else tuple(dict.fromkeys(names))
    fix = fix[0] if len(fix) == 1 else fix
    raise ValueError(
        f"{op}: axis_name {names!r} must name its mesh axes once each, in the mesh's order: "
        f"pass axis_name={fix!r} and shard the weights with P({fix!r}) (the tuple's order "
        "decides each expert's rank, and the weights' order cannot be checked)"
    )


def varying_axes(x) -> frozenset:
    """The manual mesh axes ``x`` varies over inside ``jax.shard_map`` (empty outside it, or
    with check_vma=False)."""
    return jax.typeof(x).mat.varying


def check_not_explicitly_sharded(op: str, named: dict) -> None:
    """Under explicit sharding (``jax.sharding.AxisType.Explicit``) outside ``shard_map`` an
    operand's type carries its sharding, and the reference's gathers and repeats then fail deep
    inside JAX, asking for an ``out_sharding``: the layer is per rank, so it is refused here
    with the way in."""
    for name, x in named.items():
        spec = getattr(getattr(jax.typeof(x), "sharding", None), "spec", None) or ()
        parts = [p if isinstance(p, tuple) else (p,) for p in spec if p is not None]
        axes = sorted({a for part in parts for a in part})
        if axes:
            raise ValueError(
                f"{op}: {name} is explicitly sharded over {axes} "
                f"({jax.typeof(x).str_short()}): under explicit sharding call {op} inside "
                "jax.shard_map over the expert axis (axis_name=that axis, weights sharded over "
                "it, tokens over every axis they are sharded on), or replicate its operands"
            )


def check_weights_vary(weights, *, axis_name, num_ranks: int, op: str) -> None:
    """Inside ``shard_map`` each rank must hold its own experts: the weights must vary over the
    expert axis, and over no other axis of more than one device. Weights replicated (``P()``),
    sharded over another axis than ``axis_name``, or over it and another (each rank then takes
    its shard for 1/R of all experts, and the tokens routed past them are dropped) have the right
    local shape, so only their typing shows it (JAX's check_vma, on by default); with it off
    nothing varies, and nothing is checked here. Whether it is on is read from the typing of the
    rank's own index, not from the tokens: replicated tokens are legitimate, and with them the
    check was skipped, so replicated weights passed and gave a wrong layer."""
    if axis_name is None:
        return
    names = axis_name if isinstance(axis_name, tuple) else (axis_name,)
    if not varying_axes(jax.lax.axis_index(names)):  # check_vma off (the index is not used)
        return
    sizes = manual_axes()
    for field, leaf in zip(weights._fields, weights, strict=True):
        held = varying_axes(leaf)
        if num_ranks > 1 and not set(names) <= held:
            how = f"vary over {sorted(held)}" if held else "are the same on every rank"
            raise ValueError(
                f"{op}: the weights ({field}) {how}, not sharded over the expert axis "
                f"{axis_name!r}: shard the weights with P({axis_name!r}) in the shard_map's "
                "in_specs, or pass the axis_name they are sharded over"
            )
        extra = sorted(a for a in held - set(names) if sizes.get(a, 2) > 1)
        if extra:
            raise ValueError(
                f"{op}: the weights ({field}) vary over {extra} besides the expert axis "
                f"{axis_name!r}, so each rank would take its experts for 1/{num_ranks} of all "
                "of them and drop the tokens routed past them: if the experts are split over "
                "those axes too, pass axis_name as the tuple of all of them in the mesh's order "
                f"and shard the weights with P(that tuple); else replicate the weights over "
                f"{extra}"
            )


def check_local_experts(
    *, num_local: int, num_experts: int | None, num_ranks: int, axis_name, op: str
) -> None:
    """The weights inside ``shard_map`` must be this rank's shard. ``num_experts`` (the global
    count, when the caller knows it: the buffer or the router) equal to ``num_local`` with
    ``num_ranks > 1`` means the weights were replicated instead of sharded."""
    if num_experts is None or num_local * num_ranks == num_experts:
        return
    if num_ranks > 1 and num_local == num_experts:
        raise ValueError(
            f"{op}: every rank holds all {num_experts} experts (weights replicated over "
            f"{axis_name!r}): shard the weights with P({axis_name!r}) in the shard_map's in_specs"
        )
    raise ValueError(
        f"{op}: {num_local} local experts x {num_ranks} ranks != {num_experts} experts: each "
        f"rank must hold its 1/{num_ranks} of the experts, sharded over {axis_name!r} alone (if "
        "they are split over more mesh axes, pass them all as axis_name)"
    )


def check_route_inputs(hidden, router_weight, topk, op: str = "route", max_topk: int | None = None):
    """``route``'s inputs: ``hidden`` [M, H] and ``router_weight`` [H, E] in bf16, f16, f32 or
    f64 (not FP8: its values mean nothing without their scales), and ``topk`` an int in [1, E],
    or in [1, min(E, max_topk)]. Returns the two arrays."""
    hidden = jnp.asarray(check_array("hidden", hidden))
    router_weight = jnp.asarray(check_array("router_weight", router_weight))
    if hidden.ndim != 2:
        raise ValueError(f"{op}: hidden must be [M, H], got {tuple(hidden.shape)}")
    if router_weight.ndim != 2:
        raise ValueError(f"{op}: router_weight must be [H, E], got {tuple(router_weight.shape)}")
    if router_weight.shape[0] != hidden.shape[1]:
        raise ValueError(
            f"{op}: router_weight {tuple(router_weight.shape)} must be [H, E] with the hidden "
            f"size of hidden {tuple(hidden.shape)}"
        )
    for name, arr in (("hidden", hidden), ("router_weight", router_weight)):
        if arr.dtype not in _ACTIVATION_DTYPES:
            hint = " (FP8 tokens and their scales go to fp8_mega_moe)" if name == "hidden" else ""
            raise TypeError(
                f"{op}: {name} must be bfloat16, float16 or float32, got {arr.dtype}{hint}"
            )
    num_experts = router_weight.shape[1]
    if isinstance(topk, bool) or not isinstance(topk, numbers.Integral):
        raise TypeError(f"{op}: topk must be an int, got {topk!r}")
    bound = f"num_experts={num_experts}"
    if max_topk is not None:
        bound = f"min({bound}, {max_topk})"
    if not 1 <= topk <= min(num_experts, max_topk or num_experts):
        raise ValueError(f"{op}: topk ({topk}) must be in [1, {bound}]")
    return hidden, router_weight


def check_route_options(scoring, normalize, scaling, op: str = "route"):
    """``route``'s ``scoring`` ("softmax" or "sigmoid"), ``normalize`` (None or a bool: a string
    such as "no" is truthy and would normalize) and ``scaling`` (a real number, or a 0-d real
    array; NaN or an infinity, where known at trace time, would make every weight NaN).
    Returns ``scaling``."""
    if scoring not in ("softmax", "sigmoid"):
        raise ValueError(f"{op}: scoring must be 'softmax' or 'sigmoid', got {scoring!r}")
    if normalize is not None and not isinstance(normalize, bool | np.bool_):
        raise TypeError(f"{op}: normalize must be a bool or None, got {normalize!r}")
    if not is_real_scalar(scaling):
        raise TypeError(f"{op}: scaling must be a real number, got {scaling!r}")
    try:
        value = float(scaling)
    except jax.errors.ConcretizationTypeError:
        return scaling  # traced: used as given
    if not np.isfinite(value):
        raise ValueError(f"{op}: scaling must be finite, got {value}")
    return scaling


def check_group_routing(num_experts: int, topk: int, bias, num_groups, topk_groups, op="route"):
    """``route``'s DeepSeek-V3 options: ``bias`` None or a real floating [E] array (returned as
    an array); ``num_groups`` an int dividing E; with more than one group, ``topk_groups`` an
    int in [1, num_groups] whose groups hold at least ``topk`` experts, and, with a bias, at
    least 2 experts per group (a group scores as its top two)."""
    if bias is not None:
        bias = jnp.asarray(check_array("bias", bias))
        if bias.shape != (num_experts,):
            raise ValueError(f"{op}: bias must be [E] = ({num_experts},), got {tuple(bias.shape)}")
        if not jnp.issubdtype(bias.dtype, jnp.floating):
            raise TypeError(f"{op}: bias must be a real floating array, got {bias.dtype}")
    num_groups = check_int(f"{op}: num_groups", num_groups, minimum=1)
    if num_experts % num_groups:
        raise ValueError(
            f"{op}: num_groups ({num_groups}) must divide the number of experts ({num_experts})"
        )
    if num_groups == 1:
        if topk_groups not in (None, 1):
            raise ValueError(f"{op}: topk_groups ({topk_groups!r}) needs num_groups > 1")
        return bias
    if topk_groups is None:
        raise ValueError(f"{op}: num_groups={num_groups} needs topk_groups (groups kept per token)")
    topk_groups = check_int(f"{op}: topk_groups", topk_groups, minimum=1, maximum=num_groups)
    per_group = num_experts // num_groups
    if topk > topk_groups * per_group:
        raise ValueError(
            f"{op}: topk ({topk}) exceeds the {topk_groups} * {per_group} experts of the groups "
            "kept per token"
        )
    if bias is not None and per_group < 2:
        raise ValueError(
            f"{op}: with a bias each group scores as its top two experts, so groups need at "
            f"least 2 experts ({num_experts} experts in {num_groups} groups)"
        )
    return bias


def check_layer_inputs(hidden, router_weight, weights, axis_name, topk):
    """``MegaMoE``'s inputs: ``hidden`` [M, H], ``router_weight`` [H, E] over all ``E``
    experts, and this rank's shard of them in ``weights``. Returns the two arrays."""
    hidden, router_weight = check_route_inputs(hidden, router_weight, topk, "MegaMoE", MAX_TOPK)
    if hidden.shape[0] < 1:
        raise ValueError(f"MegaMoE: hidden must hold at least one token, got {hidden.shape}")
    check_local_experts(
        num_local=check_weights(weights)[0],
        num_experts=router_weight.shape[1],
        num_ranks=axis_size(axis_name, "MegaMoE", weights),
        axis_name=axis_name,
        op="MegaMoE",
    )
    return hidden, router_weight


def _concrete_mesh():
    """The concrete mesh set with ``jax.sharding.set_mesh`` around this trace, or None. JAX
    exposes it at trace time only through ``jax._src.mesh.get_concrete_mesh`` (0.10-0.12); a
    ``shard_map(mesh=...)`` without ``set_mesh`` leaves only the abstract mesh visible."""
    from jax._src import mesh as mesh_lib

    get = getattr(mesh_lib, "get_concrete_mesh", None)
    mesh = get() if get is not None else None
    return None if mesh is None or getattr(mesh, "empty", True) else mesh


def rank_groups(mesh, axis_name: str) -> list[list[jax.Device]]:
    """Devices grouped by expert group (one per index of the other axes), in rank order."""
    grid = np.moveaxis(mesh.devices, mesh.axis_names.index(axis_name), -1)
    return [list(row) for row in grid.reshape(-1, grid.shape[-1])]


def check_buffer(
    buffer, *, m, h, i, k, num_local, num_ranks, axis_name, op: str = "fp8_mega_moe"
) -> None:
    """A workspace fits the call: same axis, rank count, dimensions, enough token capacity,
    weights sharded as the buffer expects, and, where the trace shows the concrete mesh (under
    ``jax.sharding.set_mesh``), the same devices in the same rank order along the axis. Inside
    ``shard_map`` the axis sizes are always compared; the device order only when visible."""
    if axis_name is not None and buffer.axis_name != axis_name:
        raise ValueError(
            f"buffer was made for axis {buffer.axis_name!r}, the call runs over {axis_name!r}"
        )
    if buffer.num_ranks != num_ranks:
        hint = (
            f": call {op} inside jax.shard_map over {buffer.axis_name!r} with "
            f"axis_name={buffer.axis_name!r}, each rank on its own tokens and experts"
            if axis_name is None
            else ""
        )
        raise ValueError(
            f"buffer has {buffer.num_ranks} ranks, the call runs over {num_ranks}{hint}"
        )
    check_local_experts(
        num_local=num_local,
        num_experts=buffer.num_experts,
        num_ranks=num_ranks,
        axis_name=axis_name,
        op=op,
    )
    for name, value in dict(hidden=h, intermediate=i, topk=k).items():
        if getattr(buffer, name) != value:
            raise ValueError(f"buffer was made for {name}={getattr(buffer, name)}, got {value}")
    if jax.export.is_symbolic_dim(m):
        raise ValueError(
            f"{op}: a buffer's token capacity needs a concrete token count, got the symbolic "
            f"{m}: call it without the buffer (impl='reference', which jax.export serializes; "
            "the fused kernels it would run are not serializable anyway)"
        )
    if m > buffer.max_tokens_per_rank:
        raise ValueError(
            f"{m} tokens per rank exceed the buffer's capacity of {buffer.max_tokens_per_rank} "
            "(SymmBuffer.create(max_tokens_per_rank=...))"
        )
    mesh = _concrete_mesh()
    if mesh is None or buffer.axis_name not in mesh.axis_names:
        return
    ours = [[d.id for d in g] for g in rank_groups(buffer.mesh, buffer.axis_name)]
    theirs = [[d.id for d in g] for g in rank_groups(mesh, buffer.axis_name)]
    if sorted(ours) != sorted(theirs):
        raise ValueError(
            f"the buffer orders the devices along {buffer.axis_name!r} as {ours} (device ids "
            f"by rank), the mesh this call runs under as {theirs}: a rank would exchange tokens "
            "with the wrong peers. Create the buffer with the mesh the call runs under"
        )
