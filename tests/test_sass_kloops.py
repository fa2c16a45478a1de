"""tools/sass_kloops.py: no local memory inside the GEMM kernels' wgmma loops. The synthetic
cases check how loops are found (the tile loop around the K loops is not one, a retry loop
inside one does not hide it, spans with one header merge); the last checks the installed
extension, which CI builds (nvcc is there, no GPU needed)."""

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
import sass_kloops as sk  # noqa: E402
import sass_yield as sy  # noqa: E402

ALWAYS = 7 << 12  # predicate field: unpredicated
NOP = (0x918 | ALWAYS, 0)
QGMMA = (0x9F3 | ALWAYS, 0)
LDL = (0x983 | ALWAYS, 0)
STL = (0x387 | ALWAYS, 0)


def bra(i, target):
    """A BRA at index i to index target, encoded as sass_yield decodes it."""
    off = (target - (i + 1)) * 4 & ((1 << 38) - 1)
    lo = sy.OP_BRA | ALWAYS | (off & 0xFF) << 16 | (off >> 8) << 34
    return lo, 0


def kernel(n, at):
    """n instructions, NOP but where `at` (index -> word, or -> target index for a branch)."""
    words = []
    for i in range(n):
        w = at.get(i, NOP)
        words.append(bra(i, w) if isinstance(w, int) else w)
    return words


def test_branch_encoding_round_trips():
    for i, t in [(10, 3), (10, 10), (3, 40)]:
        assert sy.relative_target(i, bra(i, t)[0]) == t


def test_tile_loop_with_a_stack_load_is_not_a_k_loop():
    # tile loop 2..20 loads a per-tile word from the stack (index 3); the K loop 5..12 holds
    # the wgmma and a barrier wait's retry loop (8..9).
    words = kernel(22, {3: LDL, 6: QGMMA, 7: QGMMA, 9: 8, 12: 5, 20: 2})
    (k,) = sk.k_loops(words)
    assert (k.start, k.end, k.wgmma, k.local) == (5, 12, 2, 0)
    assert [(lp.start, lp.end) for lp in sk.loops(words)] == [(2, 20), (5, 12), (8, 9)]


def test_spill_inside_the_k_loop_is_found():
    words = kernel(22, {3: LDL, 6: QGMMA, 10: STL, 11: LDL, 12: 5, 20: 2})
    (k,) = sk.k_loops(words)
    assert k.local == 2


def test_back_edges_to_one_header_are_one_loop():
    # the K loop's `continue` (index 9) and its end (14) both branch back to 4.
    words = kernel(16, {5: QGMMA, 9: 4, 13: LDL, 14: 4})
    (k,) = sk.k_loops(words)
    assert (k.start, k.end, k.local) == (4, 14, 1)


def test_two_k_loops_side_by_side():
    words = kernel(30, {3: QGMMA, 6: 2, 12: QGMMA, 13: STL, 15: 10, 28: 0})
    ks = sk.k_loops(words)
    assert [(k.start, k.end, k.local) for k in ks] == [(2, 6, 0), (10, 15, 1)]


def test_installed_kernels_have_no_local_memory_in_k_loops(extension_binary):
    found = sk.check(extension_binary.read_bytes())
    names = [name for name, _, _ in found]
    assert any("mega_moe_l1" in n for n in names) and any("mega_moe_l2" in n for n in names), names
    for name, kl, _ in found:
        assert kl, f"{name}: no K loop found"
        assert all(k.local == 0 for k in kl), f"{name}: local memory in a K loop: {kl}"
