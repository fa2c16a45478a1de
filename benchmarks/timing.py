"""Device time of jitted calls from the JAX profiler, with wall-clock as a cross-check.

``time_calls`` runs warm-up calls (compilation happens there, never in a timed loop), a
wall-clock loop (one ``block_until_ready`` per call), then the same number of calls under
``jax.profiler.trace``. The trace's ``.xplane.pb`` is read back with
``jax.profiler.ProfileData`` and, per device, the kernels are grouped into calls:

- device planes are ``/device:GPU:N`` (their ``Stream #…`` lines hold the CUPTI kernel and
  memcpy events; derived lines such as ``XLA Ops``/``XLA Modules`` repeat the same time and are
  skipped); on CPU the XLA thunks are events of ``/host:CPU`` carrying ``hlo_op`` and
  ``device_ordinal`` stats;
- events of one call share a ``run_id`` stat where the profiler records one; otherwise the calls
  are separated at the ``n - 1`` largest idle gaps of the device timeline (every timed call
  blocks, so the device idles between calls while the host dispatches the next one);
- a call's device time is the union of its kernels' intervals: the sum of kernel durations
  when kernels run one after another, without counting twice kernels that overlap on
  different streams (XLA runs collectives on their own streams). The plain sum and the span
  (first start to last end) are kept too.

If the profile cannot be read (no ``ProfileData`` in this jax, no device events), the result
says so in ``source`` and the wall-clock times stand in.
"""

from __future__ import annotations

import glob
import json
import os
import statistics
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

# Lines of a GPU device plane that are derived from the stream events (same time again).
_DERIVED_LINES = (
    "XLA Modules",
    "XLA Ops",
    "XLA TraceMe",
    "Steps",
    "TensorFlow Ops",
    "TensorFlow Name Scope",
    "Framework Name Scope",
    "Framework Ops",
    "Source code",
    "Launch Stats",
    "Async XLA Ops",
)


@dataclass
class Kernel:
    name: str
    start_ns: float
    end_ns: float
    run_id: object = None
    module: str | None = None


@dataclass
class Timing:
    """Per-call times of one jitted function."""

    source: str  # "profiler" or "wall-clock (<why the profile was not used>)"
    wall_us: list[float]
    busy_us: dict[str, list[float]] = field(default_factory=dict)  # device -> per call
    sum_us: dict[str, list[float]] = field(default_factory=dict)
    span_us: dict[str, list[float]] = field(default_factory=dict)
    kernels: list[tuple[str, float]] = field(default_factory=list)  # (name, µs/call), top few
    kernel_totals: dict[str, float] = field(default_factory=dict)  # every name, µs/call
    grouping: str = ""  # how kernels were assigned to calls
    timeline: list[list] = field(default_factory=list)  # one call, kernel by kernel (_timeline)

    def per_device_median_us(self) -> dict[str, float]:
        if self.busy_us:
            return {d: statistics.median(v) for d, v in self.busy_us.items()}
        return {"wall": statistics.median(self.wall_us)}

    def summary(self) -> dict:
        """Median over calls per device, then min and max over devices (the slowest rank
        bounds the layer)."""
        per_dev = self.per_device_median_us()
        out = {
            "min_us": min(per_dev.values()),
            "max_us": max(per_dev.values()),
            "wall_us": statistics.median(self.wall_us) if self.wall_us else None,
            "calls": len(self.wall_us),
            "source": self.source,
            "grouping": self.grouping,
            "per_device_us": per_dev,
            "kernels_us": [[n, t] for n, t in self.kernels],
        }
        if self.sum_us:
            out["sum_max_us"] = max(statistics.median(v) for v in self.sum_us.values())
            out["span_max_us"] = max(statistics.median(v) for v in self.span_us.values())
        if self.timeline:
            out["timeline_us"] = self.timeline
        return out


def _stats(event) -> dict:
    try:
        return {k: v for k, v in event.stats if k is not None}
    except Exception:  # stats are optional metadata: never fail the timing on them
        return {}


def _device_kernels(xplane_path: str) -> dict[str, list[Kernel]]:
    """Kernel events per device from one ``.xplane.pb``."""
    from jax.profiler import ProfileData

    data = ProfileData.from_file(xplane_path)
    per_device: dict[str, list[Kernel]] = defaultdict(list)
    for plane in data.planes:
        name = plane.name
        if name.startswith("/device:"):
            lines = list(plane.lines)
            streams = [ln for ln in lines if ln.name.startswith("Stream")]
            if not streams:
                streams = [ln for ln in lines if ln.name not in _DERIVED_LINES]
            for line in streams:
                for ev in line.events:
                    st = _stats(ev)
                    per_device[name].append(
                        Kernel(
                            ev.name,
                            ev.start_ns,
                            ev.start_ns + ev.duration_ns,
                            st.get("run_id"),
                            st.get("hlo_module"),
                        )
                    )
        elif name == "/host:CPU":
            # XLA:CPU runs thunks on host threads; each carries its device ordinal.
            for line in plane.lines:
                for ev in line.events:
                    st = _stats(ev)
                    if "hlo_op" not in st or "device_ordinal" not in st:
                        continue
                    per_device[f"/device:CPU:{st['device_ordinal']}"].append(
                        Kernel(
                            st.get("hlo_op") or ev.name,
                            ev.start_ns,
                            ev.start_ns + ev.duration_ns,
                            st.get("run_id"),
                            st.get("hlo_module"),
                        )
                    )
    return per_device


def _union_ns(kernels: Sequence[Kernel]) -> float:
    total, end = 0.0, float("-inf")
    for k in sorted(kernels, key=lambda k: k.start_ns):
        if k.start_ns >= end:
            total += k.end_ns - k.start_ns
            end = k.end_ns
        elif k.end_ns > end:
            total += k.end_ns - end
            end = k.end_ns
    return total


def _timeline(calls: list[list[Kernel]]) -> list[list]:
    """The call of median span, kernel by kernel in start order: [name, start µs after the
    call's first kernel, µs, idle µs before it]. Idle is the time since every earlier kernel of
    the call ended (0 for a kernel that starts while another runs): what a call's span loses
    between kernels, boundary by boundary."""
    spans = [max(k.end_ns for k in c) - min(k.start_ns for k in c) for c in calls]
    median = sorted(range(len(calls)), key=spans.__getitem__)[len(calls) // 2]
    call = sorted(calls[median], key=lambda k: k.start_ns)
    t0 = end = call[0].start_ns
    rows = []
    for k in call:
        idle = max(0.0, k.start_ns - end)
        rows.append(
            [
                _short(k.name, 60),
                round((k.start_ns - t0) / 1e3, 2),
                round((k.end_ns - k.start_ns) / 1e3, 2),
                round(idle / 1e3, 2),
            ]
        )
        end = max(end, k.end_ns)
    return rows


def _split_calls(kernels: list[Kernel], n_calls: int) -> tuple[list[list[Kernel]], str]:
    """Assigns the kernels of one device to ``n_calls`` calls."""
    run_ids = {k.run_id for k in kernels}
    if None not in run_ids and len(run_ids) == n_calls:
        groups: dict[object, list[Kernel]] = defaultdict(list)
        for k in kernels:
            groups[k.run_id].append(k)
        return sorted(groups.values(), key=lambda g: min(k.start_ns for k in g)), "run_id"
    ks = sorted(kernels, key=lambda k: k.start_ns)
    # Merge overlapping kernels into busy segments, then cut at the largest idle gaps.
    segments: list[list[Kernel]] = []
    end = float("-inf")
    for k in ks:
        if segments and k.start_ns < end:
            segments[-1].append(k)
            end = max(end, k.end_ns)
        else:
            segments.append([k])
            end = k.end_ns
    if len(segments) < n_calls:
        raise ValueError(f"{len(segments)} busy segments for {n_calls} calls")
    seg_end = [max(k.end_ns for k in s) for s in segments]
    gaps = [(segments[j + 1][0].start_ns - seg_end[j], j) for j in range(len(segments) - 1)]
    cuts = sorted(j for _, j in sorted(gaps, reverse=True)[: n_calls - 1])
    calls, start = [], 0
    for j in [*cuts, len(segments) - 1]:
        calls.append([k for s in segments[start : j + 1] for k in s])
        start = j + 1
    return calls, "idle gaps"


def parse_profile(
    trace_dir: str,
    n_calls: int,
    module: str | None = None,
    top: int = 8,
    only_module: bool = False,
) -> Timing:
    """Per device, per call device time from the trace written into ``trace_dir``. With
    ``only_module`` the kernels must name ``module`` (other work ran between the calls)."""
    files = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)
    if not files:
        raise FileNotFoundError(f"no .xplane.pb under {trace_dir}")
    per_device: dict[str, list[Kernel]] = defaultdict(list)
    for f in files:  # one file per host; one host here
        for dev, ks in _device_kernels(f).items():
            per_device[dev].extend(ks)
    if module is not None:
        # Keep our jitted program's kernels when the events say which module they belong to.
        mine = {
            d: [k for k in ks if k.module and module in k.module] for d, ks in per_device.items()
        }
        if any(mine.values()):
            per_device = mine
        elif only_module:
            raise ValueError(f"no kernel of the profile names module {module}")
    return timing_from_kernels(per_device, n_calls, top)


def timing_from_kernels(per_device: dict[str, list[Kernel]], n_calls: int, top: int = 8) -> Timing:
    """Per device, per call device time from the kernels of ``n_calls`` blocking calls (any
    profiler's: ``bench_peer_gemm.py`` feeds it PyTorch's)."""
    per_device = {d: ks for d, ks in per_device.items() if ks}
    if not per_device:
        raise ValueError("the profile holds no device kernel events")
    t = Timing(source="profiler", wall_us=[])
    names: dict[str, float] = defaultdict(float)
    groupings = set()
    for dev in sorted(per_device):
        calls, how = _split_calls(per_device[dev], n_calls)
        groupings.add(how)
        if not t.timeline:  # the first device's
            t.timeline = _timeline(calls)
        t.busy_us[dev] = [_union_ns(c) / 1e3 for c in calls]
        t.sum_us[dev] = [sum(k.end_ns - k.start_ns for k in c) / 1e3 for c in calls]
        t.span_us[dev] = [
            (max(k.end_ns for k in c) - min(k.start_ns for k in c)) / 1e3 for c in calls
        ]
        for c in calls:
            for k in c:
                names[k.name] += (k.end_ns - k.start_ns) / 1e3
    scale = 1.0 / (n_calls * len(per_device))  # µs per call, averaged over devices
    ranked = sorted(names.items(), key=lambda kv: -kv[1])
    t.kernel_totals = {n: v * scale for n, v in ranked}
    t.kernels = [(_short(n), v * scale) for n, v in ranked[:top]]
    t.grouping = "+".join(sorted(groupings))
    return t


def _short(name: str, width: int = 80) -> str:
    """Kernel names of templated CUDA code run to kilobytes; keep the head."""
    return name if len(name) <= width else name[: width - 1] + "…"


def time_calls(
    fn: Callable,
    arg_sets: Sequence[tuple],
    *,
    iters: int,
    warmup: int = 2,
    module: str | None = None,
    profile: bool = True,
    budget_s: float = 5.0,
    min_iters: int = 3,
    between: Callable | None = None,
) -> Timing:
    """Times ``fn(*arg_sets[j % len(arg_sets)])`` over ``iters`` calls, rotating the input
    sets so no call sees the inputs (and caches) of the call before it. ``between`` (if given)
    runs to completion before every call, outside its wall-clock time; give it a module of its
    own, so that ``module`` leaves its kernels out of the profile.

    A slow function (a baseline at large M can take seconds per call) gets fewer calls, so
    that each timed loop stays within about ``budget_s`` (never fewer than ``min_iters``):
    the sweep must fit a device session.
    """

    import jax  # here, not at the top: bench_peer_gemm.py (PyTorch) needs only the grouping

    def call(j):
        jax.block_until_ready(fn(*arg_sets[j % len(arg_sets)]))

    def pause():
        if between is not None:
            jax.block_until_ready(between())

    for j in range(max(warmup, 1)):  # the first call compiles
        pause()
        t0 = time.perf_counter()
        call(j)
        last = time.perf_counter() - t0
    if last * iters > budget_s:
        iters = max(min(iters, min_iters), min(iters, int(budget_s / last)))
    wall = []
    for j in range(iters):
        pause()
        t0 = time.perf_counter()
        call(j)
        wall.append((time.perf_counter() - t0) * 1e6)
    if not profile:
        return Timing(source="wall-clock (profiling off)", wall_us=wall)
    if not hasattr(jax.profiler, "ProfileData"):
        return Timing(source="wall-clock (this jax has no jax.profiler.ProfileData)", wall_us=wall)
    with tempfile.TemporaryDirectory(prefix="megamoe_trace_") as d:
        try:
            with jax.profiler.trace(d):
                for j in range(iters):
                    pause()
                    call(j)
            timing = parse_profile(d, iters, module=module, only_module=between is not None)
        except Exception as e:  # a broken profile must not lose the measurement
            return Timing(source=f"wall-clock (profile unusable: {e})", wall_us=wall)
    timing.wall_us = wall
    return timing


def measure(
    fn, arg_sets, args, module: str, between: Callable | None = None
) -> tuple[dict, Timing]:
    """``time_calls`` with the benchmarks' common flags (``--iters``, ``--warmup``,
    ``--no-profile``); returns the summary (``status`` ok) and the full timing."""
    t = time_calls(
        fn,
        arg_sets,
        iters=args.iters,
        warmup=args.warmup,
        module=module,
        profile=not args.no_profile,
        between=between,
    )
    out = t.summary()
    out["status"] = "ok"
    return out, t


def failure(e: BaseException) -> str:
    """How a failed measurement is reported: ``OOM``, or the error's type and first line."""
    msg = str(e)
    if any(s in msg for s in ("RESOURCE_EXHAUSTED", "out of memory", "Out of memory", "OOM")):
        return "OOM"
    first = msg.strip().splitlines()[0] if msg.strip() else ""
    return f"error: {type(e).__name__}: {first[:240]}"


def write_results(result: dict, out: str, table: str) -> None:
    """``results.json`` (every number) and ``results.md`` (``table``) into ``out``; prints the
    table, which is what a device call's output tail shows."""
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(result, f, indent=1, default=str)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(table)
    print(table)
