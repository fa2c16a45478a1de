"""Maps compute-sanitizer racecheck reports to the SASS they name, grouped by shared address.

Why: racecheck reports every mbarrier hand-off of the GEMM kernels as a race (it does not model
mbarrier ordering: tools/racecheck_mbarrier_probe.cu), so a run always has reports, and a real
race hides among them. A report names only `kernel+0xOFFSET` per access. This script prints the
instruction at each offset and the shared-memory address it names (the immediate of `[Rx+0x..]`),
and sums the reports per address, so each address can be matched with the kernel's shared-memory
map: the known hand-offs are the tile slots, the tile count, the scale stages and L2's
store-warp records (design §4.2). On 2026-12-04 this is how a race between L1's gather warps
showed: one address that none of them use, the warps' tokens (benchmarks/RESULTS.md).

With `--private FILE` (what `gemm_sanitize --private-smem` prints: per line a kernel, the
begin and end of a shared-memory range, and its name) it also checks the ranges that no two
warps share but through a barrier racecheck follows (launch.h's gemm_private_smem): a report
that names one is a race, and the exit status is 3.

The SASS must come from a build of the same source with the same flags (device_run.sh's
`build_tool`, then tools/sass_yield.py), e.g. a local build of tools/gemm_sanitize.cu:

    cuobjdump -sass /tmp/gemm_sanitize > gemm_sanitize.sass
    /tmp/gemm_sanitize --private-smem > private_smem.txt
    python3 tools/racecheck_sass.py --private private_smem.txt gemm_sanitize.sass LOG [...]

Run racecheck with a print limit above its report count (`SANITIZE_PRINT_LIMIT`), or the
reports past the limit are not in the log.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import defaultdict
from dataclasses import dataclass, field

# One access of a report: "Race reported between Read access at KERNEL+0x620" on the report's
# first line, "and Write access at KERNEL+0x20230 [32 hazards]" on each further one.
_ACCESS = re.compile(
    r"(?P<first>Race reported between|and) (?P<kind>Read|Write) access at "
    r"(?P<kernel>.+)\+0x(?P<offset>[0-9a-f]+)(?: \[(?P<hazards>\d+) hazards?\])?"
)
_FUNCTION = re.compile(r"^\s*Function : (\S+)")
_INSTRUCTION = re.compile(r"/\*(?P<offset>[0-9a-f]{4,})\*/\s+(?P<text>[^;]*;)")
_SHARED_IMMEDIATE = re.compile(r"\[[^\]]*?(0x[0-9a-f]+)\]")


@dataclass
class Access:
    kind: str  # Read or Write
    kernel: str  # as racecheck prints it (demangled)
    offset: int
    hazards: int = 0


@dataclass
class Report:
    accesses: list[Access] = field(default_factory=list)


def without_signature(name: str) -> str:
    """A demangled kernel name without its return type and parameters."""
    return re.sub(r"^void |\([^()]*\)$", "", name.strip())


def normalize_kernel(name: str) -> str:
    """One spelling for racecheck's and c++filt's demangled names: racecheck writes template
    arguments as `(int)4, (bool)0`, c++filt as `4, false`; the return type and the parameters
    are left out."""
    name = without_signature(name)
    name = re.sub(r"\((?:int|bool|unsigned int|long)\)", "", name)
    name = re.sub(r"\bfalse\b", "0", re.sub(r"\btrue\b", "1", name))
    return re.sub(r"\s+", "", name)


@dataclass
class PrivateRange:
    kernel: str  # normalized
    begin: int
    end: int
    what: str


def parse_private(lines) -> list[PrivateRange]:
    """`gemm_sanitize --private-smem` output: kernel, begin, end, what (tab-separated)."""
    ranges = []
    for line in lines:
        if line.strip():
            kernel, begin, end, what = line.rstrip("\n").split("\t")
            ranges.append(PrivateRange(normalize_kernel(kernel), int(begin, 0), int(end, 0), what))
    return ranges


def parse_reports(lines) -> list[Report]:
    reports: list[Report] = []
    for line in lines:
        m = _ACCESS.search(line)
        if m is None:
            continue
        if m["first"] != "and":
            reports.append(Report())
        elif not reports:
            continue  # a continuation line without its report (a cut log)
        reports[-1].accesses.append(
            Access(m["kind"], m["kernel"].strip(), int(m["offset"], 16), int(m["hazards"] or 0))
        )
    return reports


def parse_sass(lines, demangle) -> dict[str, dict[int, str]]:
    """{normalized kernel name: {offset: instruction}} from `cuobjdump -sass` output."""
    kernels: dict[str, dict[int, str]] = {}
    current: dict[int, str] | None = None
    for line in lines:
        f = _FUNCTION.match(line)
        if f is not None:
            current = kernels.setdefault(normalize_kernel(demangle(f[1])), {})
            continue
        i = _INSTRUCTION.search(line)
        if i is not None and current is not None:
            current[int(i["offset"], 16)] = " ".join(i["text"].split())
    return kernels


def accesses_shared(instruction: str) -> bool:
    """Whether the instruction reads or writes shared memory, as every access racecheck reports
    does (one that does not: the SASS is of another build)."""
    return re.match(r"(@!?U?P\w+\s+)?(LDS|STS|LDGSTS|ATOMS|LDSM)\b", instruction) is not None


def shared_address(instruction: str) -> str | None:
    """The immediate of a shared-memory operand (LDS, STS, LDGSTS's destination), or None when
    the address is in a register alone."""
    if not accesses_shared(instruction):
        return None
    m = _SHARED_IMMEDIATE.search(instruction)
    return m[1] if m else None


def cxx_demangler():
    """Demangles through one c++filt process (the names come in the hundreds)."""
    import subprocess

    proc = subprocess.Popen(
        ["c++filt"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1
    )

    def demangle(name: str) -> str:
        proc.stdin.write(name + "\n")
        return proc.stdout.readline().rstrip("\n")

    return demangle


@dataclass
class Summary:
    missing: int = 0  # accesses that name no shared-memory instruction (another build)
    races: list[str] = field(default_factory=list)  # accesses in a private range


def summarize(
    reports: list[Report], kernels: dict[str, dict[int, str]], out, private=()
) -> Summary:
    """Prints each report's instructions, then the accesses per (kernel, shared address)."""
    by_address: dict[tuple[str, str], list[str]] = defaultdict(list)
    result = Summary()
    for n, report in enumerate(reports):
        print(f"report {n}:", file=out)
        for a in report.accesses:
            kernel = normalize_kernel(a.kernel)
            instruction = kernels.get(kernel, {}).get(a.offset)
            if instruction is None or not accesses_shared(instruction):
                result.missing += 1
                instruction = f"(no shared-memory access here: {instruction})"
            address = shared_address(instruction)
            short = without_signature(a.kernel).split("::")[-1]
            for r in private:
                if (
                    address is not None
                    and r.kernel == kernel
                    and r.begin <= int(address, 16) < r.end
                ):
                    result.races.append(f"report {n}: {a.kind} {short}+{a.offset:#x} ({r.what})")
            print(
                f"  {a.kind:5} {short}+{a.offset:#x} {instruction}"
                + (f" [{a.hazards} hazards]" if a.hazards else ""),
                file=out,
            )
            key = (short, address or "no immediate")
            by_address[key].append(f"{a.kind[0]}{a.offset:#x}")
    print("\naccesses per kernel and shared operand's immediate (R/W + offset):", file=out)
    for (kernel, address), seen in sorted(by_address.items()):
        print(f"  {kernel} {address}: {' '.join(sorted(set(seen)))}", file=out)
    for race in result.races:
        print(f"RACE in a private range: {race}", file=out)
    return result


def check(kernels, reports: list[Report], private: list[PrivateRange], out, err) -> int:
    """The exit status: 0, 1 (the SASS is of another build, or lacks a kernel of a private
    range: its ranges would go unchecked) or 3 (a report in a private range)."""
    unknown = sorted({r.kernel for r in private} - set(kernels))
    if unknown:
        print(f"private ranges of kernels the SASS lacks: {unknown}", file=err)
        return 1
    result = summarize(reports, kernels, out, private)
    print(f"{len(reports)} reports, {len(result.races)} accesses in private ranges", file=err)
    if result.missing:
        what = "accesses name no shared-memory instruction"
        print(f"{result.missing} {what}: the SASS of another build?", file=err)
        return 1
    return 3 if result.races else 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("sass", help="cuobjdump -sass output of the binary that racecheck ran")
    p.add_argument("logs", nargs="+", help="racecheck logs")
    p.add_argument("--private", help="gemm_sanitize --private-smem output")
    args = p.parse_args(argv)
    with open(args.sass) as f:
        kernels = parse_sass(f, cxx_demangler())
    private = []
    if args.private:
        with open(args.private) as f:
            private = parse_private(f)
    reports = []
    for path in args.logs:
        with open(path) as f:
            reports += parse_reports(f)
    return check(kernels, reports, private, sys.stdout, sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
