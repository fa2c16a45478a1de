"""Checks that the GEMM kernels touch no local memory inside their wgmma loops, from the cubin.

Why: a math warp runs a K loop once per 128-deep K block, 56 times per L1 tile at DeepSeek-V3's
shape. A spilled register there is a local-memory load or store per K block on the warps that
keep the tensor cores fed. Outside the K loops ptxas may keep a few per-tile values on the
stack (L1 did until 2026-12-05, design §4.2): a load once per tile costs little. `nvcc -Xptxas -v`
counts only the kernel's whole stack and spill bytes, so it cannot tell the two apart; this
script can, and CI runs it on the built extension (tests/test_sass_kloops.py).

What: in each kernel, a loop is the span from an instruction that a later BRA jumps back to
(its header) to the last such BRA; spans that share a header are one loop (a K loop's end and
its `continue` paths). A K loop is a loop that holds a QGMMA (wgmma on e4m3) and no other loop
that does: so a persistent kernel's tile loop, which holds the K loops, is not one, and a
barrier wait's retry loop inside a K loop does not hide it. Local memory is LDL and STL. Spans
are by address, which is how ptxas lays these loops out (each K loop's body is contiguous).

Opcodes (sm_90, bits 0-11 of the first word, the low 9 bits name the operation and the high 3
its operand form): LDL 0x183, STL 0x187, QGMMA 0x1f3 (checked against cuobjdump on the kernels
on 2026-12-03); BRA as tools/sass_yield.py decodes it.

    python3 tools/sass_kloops.py BINARY [--kernels REGEX] [--require]
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass

import sass_yield as sy

OP_LDL, OP_STL, OP_QGMMA = 0x183, 0x187, 0x1F3
kLocal = {OP_LDL, OP_STL}
kDefaultKernels = r"sm90_fp8_mega_moe_l[12]"


def _kind(lo: int) -> int:
    return lo & 0x1FF


def _count(words: list[tuple[int, int]], kinds: set[int]) -> int:
    """The instructions of `kinds` among words."""
    return sum(_kind(lo) in kinds for lo, _ in words)


@dataclass(frozen=True)
class Loop:
    start: int  # instruction index of the header
    end: int  # index of the last branch back to it
    wgmma: int  # QGMMA inside [start, end]
    local: int  # LDL and STL inside [start, end]


def loops(words: list[tuple[int, int]]) -> list[Loop]:
    """Every loop of a kernel's code, one per header, in address order."""
    ends: dict[int, int] = {}
    for i, (lo, _) in enumerate(words):
        if sy._op(lo) == sy.OP_BRA:
            target = sy.relative_target(i, lo)
            if target <= i:
                ends[target] = max(ends.get(target, i), i)
    return [
        Loop(s, e, _count(words[s : e + 1], {OP_QGMMA}), _count(words[s : e + 1], kLocal))
        for s, e in sorted(ends.items())
    ]


def k_loops(words: list[tuple[int, int]]) -> list[Loop]:
    """The loops that hold a wgmma and no other loop that does."""
    mma = [lp for lp in loops(words) if lp.wgmma]
    return [
        lp
        for lp in mma
        if not any(o is not lp and lp.start <= o.start and o.end <= lp.end for o in mma)
    ]


def check(
    buf: bytes | bytearray, kernels: str = kDefaultKernels
) -> list[tuple[str, list[Loop], int]]:
    """(kernel, its K loops, LDL/STL in the whole kernel) for each kernel matching `kernels`."""
    out = []
    for name, off, size in sy.cubin_texts(buf):
        if re.search(kernels, name):
            words = sy.read_words(buf, off, size)
            out.append((name, k_loops(words), _count(words, kLocal)))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("binary")
    ap.add_argument("--kernels", default=kDefaultKernels, help="regex over kernel names")
    ap.add_argument(
        "--require",
        action="store_true",
        help="fail on local memory in a K loop, or on a matching kernel without K loops",
    )
    args = ap.parse_args(argv)
    with open(args.binary, "rb") as f:
        found = check(f.read(), args.kernels)
    bad = []
    for name, kl, local in found:
        spans = ", ".join(f"{16 * lp.start:#x}-{16 * lp.end:#x}" for lp in kl)
        in_loops = sum(lp.local for lp in kl)
        print(
            f"{name}: {len(kl)} K loops ({spans}), local-memory instructions: {in_loops} in "
            f"them, {local} in the kernel"
        )
        if in_loops or not kl:
            bad.append(name)
    if args.require and (bad or not found):
        what = ", ".join(bad) if bad else f"no kernel matching {args.kernels!r}"
        print(
            f"sass_kloops: {args.binary}: local memory in a K loop, or no K loop: {what}",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
