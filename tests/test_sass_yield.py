"""tools/sass_yield.py: the post-link pass that spaces the yield hints of L1's promotion FFMA.
The synthetic cases check the rewrite itself (which bits, where a run is cut, what is refused);
the last two check the installed extension (CI builds it: nvcc is there, no GPU needed)."""

import random
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
import sass_yield as sy  # noqa: E402

NOP = 0x918 | (7 << 12)  # an unpredicated instruction that is not an FFMA


def ffma(d, a, b, c, *, yields, reuse_b):
    lo = sy.OP_FFMA | (7 << 12) | (d << 16) | (a << 24) | (b << 32)
    hi = c | (0x7E1 << 41)  # stall 1, no barriers: ptxas's control word for these FFMA
    if not yields:
        hi |= sy.NO_YIELD
    if reuse_b:
        hi |= sy.REUSE_B
    return lo, hi


def ptxas_run(n, scale=196, rng=None):
    """n promotion FFMA as ptxas 13 writes them for a 384-thread kernel: every other one yields,
    the scale is kept in the reuse cache only by those that do not."""
    rng = rng or random.Random(0)
    regs = rng.sample(range(0, 190), 2 * n)
    return [
        ffma(
            regs[2 * k], regs[2 * k + 1], scale, regs[2 * k], yields=k % 2 == 1, reuse_b=k % 2 == 0
        )
        for k in range(n)
    ]


def bra(at, target):
    """BRA from instruction index `at` to instruction index `target` (offset in 4-byte units)."""
    off = (target - at - 1) * 4 & ((1 << 38) - 1)
    return sy.OP_BRA | (7 << 12) | ((off & 0xFF) << 16) | ((off >> 8) << 34), 0


def check_run(words, run, period):
    """The rewritten run's properties: a yield on every `period`-th FFMA and on no other (ptxas
    puts one on every other), a reuse flag only where valid."""
    for k, i in enumerate(run[:-1]):
        lo, hi = words[i]
        yields = not hi & sy.NO_YIELD
        assert yields == ((k + 1) % period == 0), f"instruction {i}: yield hint misplaced"
        if hi & sy.REUSE_ALL:
            assert not yields, f"instruction {i}: reuse flag on a yielding FFMA"
        # Operand slots a, b, c; their reuse flags are bits 58, 59, 60 of the high word.
        for slot, (this_reg, next_reg) in enumerate(
            zip(sy.operands(lo, hi), sy.operands(*words[i + 1]), strict=True)
        ):
            if hi >> (58 + slot) & 1:
                assert this_reg == next_reg, f"instruction {i}: stale reuse"
                assert (lo >> 16) & 0xFF != this_reg, f"instruction {i}: overwritten"


def test_run_is_rehinted_and_only_control_bits_change():
    run = ptxas_run(20)
    words = [(NOP, 0)] * 3 + run + [(NOP, 0)] * 2
    before = list(words)
    runs = sy.ffma_runs(words)
    assert runs == [range(3, 23)]
    assert sy.space_yields(words, runs[0], 4) > 0
    check_run(words, runs[0], 4)
    yields = [k for k, i in enumerate(runs[0][:-1]) if not words[i][1] & sy.NO_YIELD]
    assert yields == list(range(3, 19, 4))
    # The scale is cached by every FFMA that does not yield.
    assert sum(bool(words[i][1] & sy.REUSE_B) for i in runs[0][:-1]) == 19 - len(yields)
    control_mask = sy.NO_YIELD | sy.REUSE_ALL
    for (lo0, hi0), (lo1, hi1) in zip(before, words, strict=True):
        assert lo0 == lo1 and hi0 & ~control_mask == hi1 & ~control_mask
    assert words[22] == before[22], "the run's last FFMA keeps ptxas's bits"
    # Applying it twice changes nothing more.
    assert sy.space_yields(words, runs[0], 4) == 0


def test_no_reuse_when_next_reads_another_register_or_overwrites_it():
    run = ptxas_run(10)
    lo, hi = run[4]
    run[4] = (lo & ~(0xFF << 32)) | (77 << 32), hi  # a different scale register
    lo, hi = run[6]
    run[6] = (lo & ~(0xFF << 16)) | (196 << 16), (hi & ~0xFF) | 196  # R196 = a * R196 + R196
    words = [(NOP, 0)] + run + [(NOP, 0)]
    sy.space_yields(words, sy.ffma_runs(words)[0], 4)
    assert not words[1 + 3][1] & sy.REUSE_B  # next reads R77
    assert not words[1 + 4][1] & sy.REUSE_B  # reads R77, next reads R196
    assert not words[1 + 6][1] & sy.REUSE_B  # overwrites R196
    check_run(words, range(1, 11), 4)


def test_branch_target_cuts_the_run():
    run = ptxas_run(20)
    words = [bra(0, 1 + 9)] + run + [(NOP, 0)]
    runs = sy.ffma_runs(words)
    assert runs == [range(1, 10), range(10, 21)]
    for r in runs:
        sy.space_yields(words, r, 4)
        check_run(words, r, 4)
    # The FFMA before the target leaves nothing in the cache for it (it keeps ptxas's bits,
    # and ptxas put no reuse flag before an instruction that can be jumped to).
    assert words[9] == run[8]


def test_bank_conflicts_counted_before_and_after():
    """Partials in even registers, accumulators in odd ones, the scale in an even one: an FFMA
    that reads the scale from the register file (none cached) reads two even registers."""
    words = [
        ffma(101 + 2 * k, 20 + 2 * k, 200, 101 + 2 * k, yields=k % 2 == 1, reuse_b=k % 2 == 0)
        for k in range(16)
    ]
    run = range(16)
    assert sy.rf_conflicts(words, run) == 8  # ptxas: every FFMA after a yield, and the first
    sy.space_yields(words, run, 4)
    assert sy.rf_conflicts(words, run) == 4  # the first and the three after a yield


def test_branch_offsets_decode_as_cuobjdump_prints_them():
    # Words and addresses from cuobjdump -sass of the GEMM kernels (nvcc 13.0):
    #   /*02f0*/ @!P0 BRA 0x180 ;   /*0100*/ @P0 BRA 0x300 ;   /*0070*/ BSSY B0, 0x310 ;
    cases = [
        (0x2F0, 0xFFFFFFFC00A08947, 0x180),
        (0x100, 0x7C0947, 0x300),
        (0x70, 0x29000007945, 0x310),
    ]
    for pc, lo, target in cases:
        words = [(NOP, 0)] * 64
        words[pc // 16] = (lo, 0)
        assert target // 16 in sy.branch_targets(words)


def test_unknown_control_flow_is_refused():
    words = [(NOP, 0), (0x949 | (7 << 12), 0)] + ptxas_run(10)
    with pytest.raises(sy.Unpatchable, match="0x949"):
        sy.ffma_runs(words)


def test_installed_extension_is_rehinted(extension_binary):
    buf = extension_binary.read_bytes()
    texts = [t for t in sy.cubin_texts(buf) if "sm90_fp8_mega_moe_l1" in t[0]]
    assert texts, "no L1 kernel in the extension's cubin (compressed fatbin?)"
    for _, off, size in texts:
        words = sy.read_words(buf, off, size)
        runs = sy.ffma_runs(words)
        assert len(runs) >= 2, "L1's promotion runs not found"
        for run in runs:
            check_run(words, run, sy.kPeriod)


def test_report_of_installed_extension_matches_its_rehinting(extension_binary):
    """The report's counts for L1 as built equal what re-hinting would make of it: the installed
    code is already in that state."""
    lines = sy.report(extension_binary.read_bytes(), "sm90_fp8_mega_moe_l")
    l1 = [line for line in lines if "mega_moe_l1" in line]
    assert l1 and len(lines) > len(l1), lines  # L2's kernels are reported, not re-hinted
    for line in l1:
        before = line.split("; re-hinted by the build: ")
        assert len(before) == 2, line
        yields_now = int(before[0].split(" FFMA, ")[1].split(" yield")[0])
        yields_rehinted = int(before[1].split(" yield")[0])
        assert yields_now == yields_rehinted, line
