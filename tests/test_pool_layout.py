"""The pure-JAX pool layout used with the standalone grouped GEMM wrappers (any backend)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_megamoe.constants import BLOCK_M, EXPERT_ALIGN_M
from jax_megamoe.pool import pool_layout, pool_rows


def test_pool_layout_uneven_counts():
    counts = [0, 64, 65, 3, 0, 1]
    assert EXPERT_ALIGN_M == 2 * BLOCK_M
    assert pool_rows(counts) == 8 * BLOCK_M
    lay = pool_layout(counts, 9 * BLOCK_M)
    assert np.asarray(lay.starts).tolist() == [0, 0, 128, 256, 384, 384]
    # Blocks holding only padding (the second of experts 1, 3 and 5) and past the end name -1.
    assert np.asarray(lay.block_expert).tolist() == [1, -1, 2, 2, 3, -1, 5, -1, -1]
    assert np.asarray(lay.num_blocks).tolist() == [8]
    expert = np.asarray(lay.row_expert)
    assert [int((expert == e).sum()) for e in range(6)] == counts
    assert np.array_equal(np.asarray(lay.row_valid), expert >= 0)
    for e, (s, c) in enumerate(zip(np.asarray(lay.starts), counts, strict=True)):
        assert (expert[s : s + c] == e).all() and s % EXPERT_ALIGN_M == 0


def test_pool_layout_block_aligned():
    """``align_m = BLOCK_M``: segments on every row block, as the standalone GEMMs accept."""
    counts = [0, 64, 65, 3, 0, 1]
    assert pool_rows(counts, BLOCK_M) == 5 * BLOCK_M
    lay = pool_layout(counts, 7 * BLOCK_M, align_m=BLOCK_M)
    assert np.asarray(lay.starts).tolist() == [0, 0, 64, 192, 256, 256]
    assert np.asarray(lay.block_expert).tolist() == [1, 2, 2, 3, 5, -1, -1]
    assert np.asarray(lay.num_blocks).tolist() == [5]


def test_pool_layout_traced_and_truncated():
    counts = jnp.array([70, 10, 0], jnp.int32)
    lay = jax.jit(lambda c: pool_layout(c, 2 * BLOCK_M, align_m=BLOCK_M))(counts)
    # Expert 0 needs two blocks; expert 1 does not fit and is dropped.
    assert np.asarray(lay.num_blocks).tolist() == [2]
    assert np.asarray(lay.block_expert).tolist() == [0, 0]
    assert int(lay.row_valid.sum()) == 70


def test_pool_layout_rejects_ragged_pool():
    with pytest.raises(ValueError, match="multiple"):
        pool_layout([3, 4], 100)
    with pytest.raises(ValueError, match="align_m"):
        pool_layout([3, 4], 256, align_m=96)
