"""Grouped-GEMM pool layout: each expert's rows start on a multiple of ``EXPERT_ALIGN_M`` rows, so
the GEMMs' tiles (two ``BLOCK_M``-row blocks sharing one weight tile) never straddle two experts;
the layout the fused kernels' routing builds on device."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from .checks import check_pool_rows
from .constants import BLOCK_M, EXPERT_ALIGN_M


class PoolLayout(NamedTuple):
    """Where each expert's rows sit in a grouped-GEMM pool (see :func:`pool_layout`)."""

    starts: jax.Array  # [E] int32 first pool row of each expert (a multiple of block_m)
    block_expert: jax.Array  # [P/block_m] int32 expert of each row block; -1 past num_blocks
    # and on blocks that hold only padding
    num_blocks: jax.Array  # [1] int32 row blocks in use
    row_expert: jax.Array  # [P] int32 expert of each row, -1 on padding rows
    row_valid: jax.Array  # [P] bool: a real row (row_expert >= 0)


def pool_rows(expert_counts, align_m: int = EXPERT_ALIGN_M) -> int:
    """Smallest pool (rows, a multiple of ``align_m``) that holds these concrete counts."""
    counts = np.asarray(expert_counts, np.int64)
    return int(np.sum(-(-counts // align_m)) * align_m) or align_m


def pool_layout(
    expert_counts,
    num_rows: int | None = None,
    block_m: int = BLOCK_M,
    align_m: int = EXPERT_ALIGN_M,
) -> PoolLayout:
    """Pure-JAX pool layout: expert ``e`` owns ``expert_counts[e]`` rows starting at
    ``starts[e]``; every expert starts on a multiple of ``align_m`` rows (a multiple of
    ``block_m``), experts in order, the rest of its segment is padding. A block with no real row
    names expert -1, as do the blocks past ``num_blocks``.

    ``expert_counts`` ([E] ints) may be traced; ``num_rows`` (static, a multiple of
    ``block_m``) defaults to :func:`pool_rows` of concrete counts. Rows that do not fit in
    ``num_rows`` are dropped (``num_blocks`` is capped at ``num_rows / block_m``).
    """
    if align_m % block_m:
        raise ValueError(
            f"pool_layout: align_m ({align_m}) must be a multiple of block_m ({block_m})"
        )
    if num_rows is None:
        num_rows = pool_rows(expert_counts, align_m)
    check_pool_rows("pool_layout", num_rows, block_m)
    counts = jnp.asarray(expert_counts, jnp.int32)
    num_experts = counts.shape[0]
    padded = (counts + align_m - 1) // align_m * align_m
    ends = jnp.cumsum(padded, dtype=jnp.int32)
    starts = ends - padded
    used = jnp.minimum(ends[-1], num_rows)
    blocks = jnp.arange(num_rows // block_m, dtype=jnp.int32)
    first_row = blocks * block_m
    # Each row's expert segment: searchsorted(ends, row, side="right") for every row, as
    # a scatter of the ends and a running count. jnp.searchsorted failed inside a shard_map
    # that leaves some mesh axes automatic (a bare AssertionError, JAX 0.10.2), and its "sort"
    # method, which did not, cannot take a symbolic row count (jax.export).
    marks = jnp.zeros(num_rows + 1, jnp.int32).at[jnp.minimum(ends, num_rows)].add(1)
    expert = jnp.clip(jnp.cumsum(marks, dtype=jnp.int32)[:num_rows], 0, num_experts - 1)
    owner = expert[first_row]
    holds_rows = first_row - starts[owner] < counts[owner]
    block_expert = jnp.where((first_row < used) & holds_rows, owner, -1).astype(jnp.int32)
    rows = jnp.arange(num_rows, dtype=jnp.int32)
    valid = (rows < used) & (rows - starts[expert] < counts[expert])
    return PoolLayout(
        starts=starts.astype(jnp.int32),
        block_expert=block_expert,
        num_blocks=jnp.reshape(used // block_m, (1,)).astype(jnp.int32),
        row_expert=jnp.where(valid, expert, -1).astype(jnp.int32),
        row_valid=valid,
    )
