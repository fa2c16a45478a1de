"""tools/racecheck_sass.py: racecheck reports mapped to SASS and grouped by shared address. The
inputs are in the formats of the H200 machines' compute-sanitizer and of cuobjdump 13
(excerpts of the 2026-12-04 logs of the GEMM kernels, shortened); the race found that day
shows as an address that only the gather warps' tokens use."""

import io
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
import racecheck_sass as rs  # noqa: E402

PARAMS = "(jax_megamoe::sm90::L1KernelParams)"
L1 = "void jax_megamoe::sm90::sm90_fp8_mega_moe_l1<(int)4, (bool)1>" + PARAMS
MANGLED = "_ZN11jax_megamoe4sm9020sm90_fp8_mega_moe_l1ILi4ELb1EEEvNS0_14L1KernelParamsE"
DEMANGLED = "void jax_megamoe::sm90::sm90_fp8_mega_moe_l1<4, true>" + PARAMS

LOG = f"""\
========= COMPUTE-SANITIZER
========= Error: Race reported between Read access at {L1}+0x620
=========     and Write access at {L1}+0x200c0 [8 hazards]
=========
========= Error: Race reported between Write access at {L1}+0x22070
=========     and Read access at {L1}+0x23a20 [32 hazards]
=========     and Read access at {L1}+0x23c70 [32 hazards]
=========
all checks passed
========= RACECHECK SUMMARY: 2 hazards displayed (2 errors, 0 warnings)
"""

SASS = f"""\
\t\tFunction : {MANGLED}
\t.headerflags\t@"EF_CUDA_VIRTUAL_SM(EF_CUDA_SM90)"
        /*0620*/                   LDS R8, [UR6+0x32a70] ;                  /* 0x032a7006ff087984 */
        /*200c0*/                   STS [R11+0x32a70], RZ ;                 /* 0x032a700bff007388 */
        /*22070*/                   STS [R3+0x36b00], R2 ;                  /* 0x036b000302007388 */
        /*23a20*/                   LDS R33, [R15+0x36b00] ;                /* 0x036b00000f217984 */
        /*23c70*/                   LDS R33, [R15+0x36b10] ;                /* 0x036b10000f217984 */
        /*23c80*/              @!P0 BRA 0x23a20 ;                           /* 0x0000000000008947 */
"""


def kernels():
    return rs.parse_sass(io.StringIO(SASS), {MANGLED: DEMANGLED}.__getitem__)


def test_reports_keep_every_access_of_a_multi_line_report():
    reports = rs.parse_reports(io.StringIO(LOG))
    assert [[(a.kind, a.offset, a.hazards) for a in r.accesses] for r in reports] == [
        [("Read", 0x620, 0), ("Write", 0x200C0, 8)],
        [("Write", 0x22070, 0), ("Read", 0x23A20, 32), ("Read", 0x23C70, 32)],
    ]


def test_racecheck_and_cxxfilt_spellings_of_a_kernel_meet():
    assert rs.normalize_kernel(L1) == rs.normalize_kernel(DEMANGLED)
    other = L1.replace("(bool)1", "(bool)0")
    assert rs.normalize_kernel(other) != rs.normalize_kernel(DEMANGLED)


def test_accesses_grouped_by_the_shared_operand_immediate():
    out = io.StringIO()
    assert rs.summarize(rs.parse_reports(io.StringIO(LOG)), kernels(), out).missing == 0
    table = out.getvalue().split("immediate (R/W + offset):\n")[1].splitlines()
    assert table == [
        "  sm90_fp8_mega_moe_l1<(int)4, (bool)1> 0x32a70: R0x620 W0x200c0",
        "  sm90_fp8_mega_moe_l1<(int)4, (bool)1> 0x36b00: R0x23a20 W0x22070",
        "  sm90_fp8_mega_moe_l1<(int)4, (bool)1> 0x36b10: R0x23c70",
    ]


def test_sass_of_another_build_is_flagged():
    """An offset that holds no shared-memory instruction (a branch here), or none at all."""
    log = LOG.replace("+0x23c70", "+0x23c80").replace("+0x620", "+0x630")
    out = io.StringIO()
    assert rs.summarize(rs.parse_reports(io.StringIO(log)), kernels(), out).missing == 2
    assert "no shared-memory access here: @!P0 BRA 0x23a20" in out.getvalue()
    assert "no shared-memory access here: None" in out.getvalue()


def test_predicated_and_register_only_operands():
    assert rs.shared_address("@P4 LDGSTS.E [R33+0x32000], desc[UR44][R4.64] ;") == "0x32000"
    assert rs.shared_address("LDS R199, [R198] ;") is None
    assert rs.shared_address("LDG.E R2, desc[UR4][R2.64+0x10] ;") is None


def test_an_access_to_a_private_range_is_a_race_and_only_in_its_kernel():
    """The gather warps' tokens (gemm_sanitize --private-smem's format) are named by report 1;
    report 0's address lies in a range of the other L1 instance, so it is no race."""
    private = rs.parse_private(
        io.StringIO(
            "jax_megamoe::sm90::sm90_fp8_mega_moe_l1<4, true>\t0x36b00\t0x36d40\tgather tokens\n"
            "jax_megamoe::sm90::sm90_fp8_mega_moe_l1<4, false>\t0x32a00\t0x32b00\tother\n"
        )
    )
    out = io.StringIO()
    result = rs.summarize(rs.parse_reports(io.StringIO(LOG)), kernels(), out, private)
    assert result.missing == 0
    assert result.races == [
        "report 1: Write sm90_fp8_mega_moe_l1<(int)4, (bool)1>+0x22070 (gather tokens)",
        "report 1: Read sm90_fp8_mega_moe_l1<(int)4, (bool)1>+0x23a20 (gather tokens)",
        "report 1: Read sm90_fp8_mega_moe_l1<(int)4, (bool)1>+0x23c70 (gather tokens)",
    ]
    assert "RACE in a private range: report 1: Write" in out.getvalue()
    # Without the private ranges the same reports are the hand-offs racecheck always shows.
    assert rs.summarize(rs.parse_reports(io.StringIO(LOG)), kernels(), io.StringIO()).races == []


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc on PATH")
def test_gemm_sanitize_prints_private_ranges_the_script_reads(tmp_path):
    """`gemm_sanitize --private-smem` runs without a GPU (built here at -O1: the ranges are
    constants): every range the script reads is non-empty, and a kernel's ranges are disjoint."""
    binary = tmp_path / "gemm_sanitize"
    cmd = [
        "nvcc", "-std=c++17", "-O1", "-gencode=arch=compute_90a,code=sm_90a",
        "--expt-relaxed-constexpr", f"-I{REPO / 'csrc' / 'include'}",
        str(REPO / "tools" / "gemm_sanitize.cu"), str(REPO / "csrc" / "launch" / "gemm.cu"),
        "-o", str(binary),
    ]  # fmt: skip
    built = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert built.returncode == 0, built.stderr[-4000:]
    printed = subprocess.run([binary, "--private-smem"], capture_output=True, text=True)
    assert printed.returncode == 0, printed.stderr
    ranges = rs.parse_private(io.StringIO(printed.stdout))
    kinds = {(r.kernel, r.what) for r in ranges}
    for gather in ("0", "1"):
        kernel = f"jax_megamoe::sm90::sm90_fp8_mega_moe_l1<4,{gather}>"
        assert {(kernel, "tail accumulators"), (kernel, "lone-block row maxima")} <= kinds
    assert ("jax_megamoe::sm90::sm90_fp8_mega_moe_l1<4,1>", "gather tokens") in kinds
    for r in ranges:
        assert 0 < r.begin < r.end <= 227 * 1024
        for other in ranges:
            if other is not r and other.kernel == r.kernel:
                assert other.end <= r.begin or r.end <= other.begin, (r, other)


def test_status_and_a_private_range_of_a_kernel_the_sass_lacks():
    """A renamed kernel would leave its ranges unchecked: that is an error, not a pass."""
    reports = rs.parse_reports(io.StringIO(LOG))
    tokens = "jax_megamoe::sm90::sm90_fp8_mega_moe_l1<4, true>\t0x36b00\t0x36d40\ttokens\n"
    err = io.StringIO()
    private = rs.parse_private(io.StringIO(tokens))
    assert rs.check(kernels(), reports, private, io.StringIO(), err) == 3
    assert rs.check(kernels(), reports, [], io.StringIO(), io.StringIO()) == 0
    renamed = rs.parse_private(io.StringIO(tokens.replace("mega_moe_l1", "mega_moe_gemm1")))
    assert rs.check(kernels(), reports, renamed, io.StringIO(), err) == 1
    assert "private ranges of kernels the SASS lacks" in err.getvalue()
