"""Spaces the yield hints of L1's promotion FFMA in a built binary's sm_90a code.

Why: a GEMM kernel launches 384 threads, so ptxas plans for three warps per scheduler and sets
the yield hint on every other FFMA of a long run of independent ones. A warp that yields loses
its operand reuse cache, so every other promotion FFMA (acc = part * scale + acc) reads all
three operands from the register file, and many of them read two from one bank (an extra
cycle each). With the 256-thread launch ptxas sets no yields and reuses the scale on every
FFMA: the math loop alone runs at 95 % of the tensor pipe against 86 % (tools/wgmma_ceiling.cu).
In the real kernels the warps do need to yield (without any yield L1 was 6.7 % slower: the
other warps on the scheduler, the producer's and the other warpgroup's, wait through a whole
promotion), but one yield in four is enough: L1 1.5-2.2 % faster at the power-capped steady
state (H200, benchmarks/RESULTS.md, 2026-12-02), bitwise the same results. L2 did not gain
from its own re-hinting, so only L1's kernel is patched by default.

What: in every run of at least kMinRun unpredicated accumulate-form FFMA (d == c) inside the
named kernels, every kPeriod-th instruction yields (and keeps nothing in the reuse cache), the
others do not yield and keep operand b (the scale) cached when the next FFMA reads the same
register there. The last FFMA of a run keeps the bits ptxas gave it, and a run is cut at every
branch target, so no instruction relies on the cache across a jump. Only the control bits
change: the instructions, their registers and their order stay as ptxas wrote them. The rule
the reuse flags rely on (the cache holds from an instruction that does not yield to the next)
is the one ptxas itself follows in these kernels, on the FFMA it leaves without a yield.

Encoding (sm_90, 128-bit instructions, little-endian): opcode in bits 0-11, predicate in 12-15
(7: always), registers d / a / b in bits 16, 24, 32 and c in bits 64-71; the control field
starts at bit 105: bit 109 is set for "do not yield", bits 122-125 are the reuse flags of
operands a, b, c. Relative branch offsets: BRA and CALL.REL in 4-byte units in bits 16-23 and
34-63 (signed), BSSY in bytes in bits 32-63 (signed), both from the next instruction.

    python3 tools/sass_yield.py BINARY [--kernels REGEX] [--period N] [--require | --report]
"""

from __future__ import annotations

import argparse
import re
import struct
import sys

kPeriod = 4
kMinRun = 8
kDefaultKernels = r"sm90_fp8_mega_moe_l1"

OP_FFMA = 0x223
OP_BRA, OP_CALL, OP_BSSY = 0x947, 0x944, 0x945
# Control-flow opcodes whose targets are understood (or that have none): BSYNC, CALL, BSSY,
# YIELD, BRA, WARPSYNC, EXIT, RET, BPT, NANOSLEEP. Any other opcode of the 0x94x-0x95x block
# (an indirect or absolute jump) makes the kernel unpatchable: its targets are unknown.
KNOWN_CONTROL = {0x941, 0x944, 0x945, 0x946, 0x947, 0x948, 0x94D, 0x950, 0x95C, 0x95D}
NO_YIELD = 1 << 45  # in the high 64-bit word
REUSE_ALL = 0xF << 58
REUSE_B = 1 << 59
EM_CUDA = 190


class Unpatchable(Exception):
    pass


def _op(lo: int) -> int:
    return lo & 0xFFF


def relative_target(i: int, lo: int) -> int:
    """The instruction index that the BRA or CALL.REL at index i (low word lo) jumps to."""
    off = ((lo >> 16) & 0xFF) | (((lo >> 34) & ((1 << 30) - 1)) << 8)
    off -= (off >> 37) << 38
    return i + 1 + off // 4


def branch_targets(words: list[tuple[int, int]]) -> set[int]:
    """Instruction indices that a branch, a call's return or a reconvergence point reaches."""
    targets = set()
    for i, (lo, _) in enumerate(words):
        op = _op(lo)
        if 0x940 <= op <= 0x95F and op not in KNOWN_CONTROL:
            raise Unpatchable(f"control opcode {op:#x} at {16 * i:#x}: targets unknown")
        if op in (OP_BRA, OP_CALL):
            targets.add(relative_target(i, lo))
            if op == OP_CALL:
                targets.add(i + 1)
        elif op == OP_BSSY:
            off = (lo >> 32) & 0xFFFFFFFF
            off -= (off >> 31) << 32
            targets.add(i + 1 + off // 16)
    return targets


def operands(lo: int, hi: int) -> tuple[int, int, int]:
    """The registers of an FFMA's operands a, b, c (reuse-flag slots 0, 1, 2)."""
    return (lo >> 24) & 0xFF, (lo >> 32) & 0xFF, hi & 0xFF


def _acc_ffma(lo: int, hi: int) -> bool:
    return _op(lo) == OP_FFMA and (lo >> 12) & 0xF == 7 and (lo >> 16) & 0xFF == hi & 0xFF


def ffma_runs(words: list[tuple[int, int]], min_run: int = kMinRun) -> list[range]:
    """Runs of accumulate-form FFMA, cut at branch targets, at least min_run long."""
    targets = branch_targets(words)
    runs, start = [], None
    for i, (lo, hi) in enumerate(words + [(0, 0)]):
        inside = i < len(words) and _acc_ffma(lo, hi)
        if start is not None and (not inside or i in targets):
            if i - start >= min_run:
                runs.append(range(start, i))
            start = None
        if inside and start is None:
            start = i
    return runs


def space_yields(words: list[tuple[int, int]], run: range, period: int) -> int:
    """Rewrites the control bits of one run in place; returns how many words changed."""
    changed = 0
    for k, i in enumerate(run[:-1]):
        lo, hi = words[i]
        if (k + 1) % period == 0:
            new = hi & ~NO_YIELD & ~REUSE_ALL
        else:
            new = (hi | NO_YIELD) & ~REUSE_B
            rb = operands(lo, hi)[1]
            if operands(*words[i + 1])[1] == rb and (lo >> 16) & 0xFF != rb:
                new |= REUSE_B
        if new != hi:
            words[i] = (lo, new)
            changed += 1
    return changed


def rf_conflicts(words: list[tuple[int, int]], run: range) -> int:
    """FFMA of the run that read two operands from one register bank: banks by register number
    mod 2, operands a, b, c counted unless the FFMA before kept them in the reuse cache (its
    reuse flag on that slot, the same register, no yield)."""
    conflicts = 0
    for i in run:
        regs = operands(*words[i])
        prev_hi = words[i - 1][1] if i > run[0] else 0  # the run's first: nothing cached
        prev = operands(*words[i - 1])
        read = {
            reg
            for slot, reg in enumerate(regs)
            if not (prev_hi & NO_YIELD and prev_hi >> (58 + slot) & 1 and prev[slot] == reg)
        }
        conflicts += len({r % 2 for r in read}) < len(read)
    return conflicts


def _hint_counts(words: list[tuple[int, int]], runs: list[range]) -> tuple[int, int]:
    yields = sum(not words[i][1] & NO_YIELD for r in runs for i in r[:-1])
    return yields, sum(rf_conflicts(words, r) for r in runs)


def report(buf: bytes | bytearray, kernels: str) -> list[str]:
    """Per kernel matching `kernels`: its FFMA runs, how many yield and how many read two
    operands from one bank, as ptxas wrote them and, for the kernels the build re-hints
    (kDefaultKernels), as the build leaves them."""
    lines = []
    for name, _, words, runs in kernel_runs(buf, kernels):
        yields, conflicts = _hint_counts(words, runs)
        line = (
            f"{name}: {len(runs)} FFMA runs, {sum(len(r) for r in runs)} FFMA, "
            f"{yields} yield, {conflicts} read two operands from one bank"
        )
        if re.search(kDefaultKernels, name):
            for r in runs:
                space_yields(words, r, kPeriod)
            yields, conflicts = _hint_counts(words, runs)
            line += f"; re-hinted by the build: {yields} yield, {conflicts} from one bank"
        lines.append(line)
    return lines


def cubin_texts(buf: bytes | bytearray):
    """(kernel name, offset, size) of each kernel's code in the sm_90 cubins embedded in buf."""
    pos = buf.find(b"\x7fELF\x02\x01\x01")
    while pos >= 0:
        if struct.unpack_from("<H", buf, pos + 18)[0] == EM_CUDA:
            shoff = struct.unpack_from("<Q", buf, pos + 0x28)[0]
            entsize, count, strndx = struct.unpack_from("<HHH", buf, pos + 0x3A)
            heads = [
                struct.unpack_from("<IIQQQQ", buf, pos + shoff + k * entsize) for k in range(count)
            ]
            names = pos + heads[strndx][4]
            for name_off, _, _, _, off, size in heads:
                end = buf.index(b"\0", names + name_off)
                name = bytes(buf[names + name_off : end]).decode()
                if name.startswith(".text."):
                    yield name[len(".text.") :], pos + off, size
        pos = buf.find(b"\x7fELF\x02\x01\x01", pos + 4)


def read_words(buf, off: int, size: int) -> list[tuple[int, int]]:
    return [struct.unpack_from("<QQ", buf, p) for p in range(off, off + size, 16)]


def kernel_runs(buf, kernels: str):
    """(name, code offset, instruction words, FFMA runs) of each kernel matching `kernels`."""
    for name, off, size in cubin_texts(buf):
        if re.search(kernels, name):
            words = read_words(buf, off, size)
            yield name, off, words, ffma_runs(words)


def patch(buf: bytearray, kernels: str = kDefaultKernels, period: int = kPeriod):
    """Patches buf in place; returns [(kernel, runs, words changed)] for the matching kernels."""
    done = []
    for name, off, words, runs in kernel_runs(buf, kernels):
        changed = sum(space_yields(words, run, period) for run in runs)
        for i in (i for run in runs for i in run):
            struct.pack_into("<QQ", buf, off + 16 * i, *words[i])
        done.append((name, len(runs), changed))
    return done


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("binary")
    ap.add_argument("--kernels", default=kDefaultKernels, help="regex over kernel names")
    ap.add_argument("--period", type=int, default=kPeriod, help="one yield per this many FFMA")
    ap.add_argument("--require", action="store_true", help="fail unless a kernel was patched")
    ap.add_argument(
        "--report", action="store_true", help="count yields and bank conflicts; change nothing"
    )
    args = ap.parse_args(argv)
    with open(args.binary, "rb") as f:
        buf = bytearray(f.read())
    try:
        if args.report:
            print("\n".join(report(buf, args.kernels)))
            return 0
        patched = patch(buf, args.kernels, args.period)
    except Unpatchable as e:
        print(f"sass_yield: {args.binary}: {e}", file=sys.stderr)
        return 1
    if args.require and not any(runs for _, runs, _ in patched):
        print(
            f"sass_yield: no FFMA run in a kernel matching {args.kernels!r} in {args.binary} "
            "(is the fatbin compressed? build with nvcc --no-compress, or configure with "
            "-DJAX_MEGAMOE_FFMA_YIELDS=OFF)",
            file=sys.stderr,
        )
        return 1
    with open(args.binary, "r+b") as f:
        f.write(buf)
    for name, runs, changed in patched:
        print(f"sass_yield: {name}: {runs} FFMA runs, {changed} instructions re-hinted")
    return 0


if __name__ == "__main__":
    sys.exit(main())
