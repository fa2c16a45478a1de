"""Limits and block sizes the CUDA kernels, the workspace layout and Python agree on.

``csrc/include/jax_megamoe/constants.h`` defines them for the kernels and the workspace layout;
these mirror it so the package (its checks and the reference path) works where the extension
was not built. ``tests/test_extension.py`` checks
they equal ``_C.constants()`` wherever the extension is importable.
"""

BLOCK_M = 64  # rows of one grouped-GEMM row block (the unit of block_expert)
EXPERT_ALIGN_M = 128  # every expert's pool rows start on a multiple of this (two row blocks)
QUANT_BLOCK = 128  # FP8 scale block: 1x128 for activations, 128x128 for weights
MAX_TOPK = 32  # slots per token the routing kernels hold in shared memory
MAX_LOCAL_EXPERTS = 4096  # experts per rank the routing kernels count in shared memory
DEFAULT_TIMEOUT_S = 300  # seconds a cross-rank wait spins before the call fails
# One rank: route count and fill are one launch up to this many tokens per SM (a block each) ...
ROUTE_BLOCKS_PER_SM = 4
# ... and L1 reads A from the tokens' rows up to this many rows per local expert on average.
GATHER_ROWS_PER_EXPERT = 32
# The standalone GEMMs' largest num_ctas: their tile-claim counter (int32) must not wrap.
MAX_GEMM_CTAS = 65536
