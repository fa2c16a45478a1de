"""The symmetric workspace: one persistent device allocation per rank, same layout on every
rank, with each rank holding the base pointers of its peers (docs/design.md §3).

One process may drive all GPUs of an expert group (peers are raw pointers with peer access), or
the group may span several processes of one host (``jax.distributed``; peers in other
processes are mapped through CUDA IPC handles exchanged through the coordinator's key-value
store, see ``distributed.py``). An expert group never spans hosts: there is no NVLink between
them."""

from __future__ import annotations

import base64
import itertools
import threading
import warnings
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field

import jax
from jax.sharding import Mesh

from . import _ffi, checks
from . import distributed as dist
from .constants import BLOCK_M, QUANT_BLOCK

_ids = itertools.count(1)  # buffer_id: unique in this process (the extension's registry key)
# Per set of processes, the buffers they created together: numbers the setup keys
# (distributed.setup_name), which every process of a mesh agrees on.
_setups: dict[tuple[int, ...], itertools.count] = {}
_lock = threading.Lock()
_REGION_ALIGN = 128  # kRegionAlign in layout/workspace.h


def workspace_nbytes(
    *,
    num_ranks: int,
    num_experts: int,
    hidden: int,
    intermediate: int,
    topk: int,
    max_tokens_per_rank: int,
) -> int:
    """Exact bytes of one rank's workspace, as a GPU allocates it: the Python mirror of
    ``WorkspaceLayout::make`` (``csrc/include/jax_megamoe/layout/workspace.h``), so the size is
    known on any backend. Regions in the header's order, each padded to 128 bytes; the two
    ``alignas(128)`` structs (``HeaderFixed``, ``RouteScalars``) take 128 bytes each."""
    r, m, h, i, k = num_ranks, max_tokens_per_rank, hidden, intermediate, topk
    local = num_experts // num_ranks
    rows = checks.pool_rows_bound(num_ranks=r, num_experts=num_experts, topk=k, max_tokens=m)
    qb = QUANT_BLOCK
    staged = m if r > 1 else 0  # one rank stages nothing: its kernels read the call's inputs
    regions = (
        [_REGION_ALIGN]
        + [r * 8] * 2  # HeaderFixed; dispatch/combine flags
        + [r * 4] * 2  # dispatch/combine statuses
        + [r * 8] * 2  # peer/combine bases
        + [staged * h, staged * (h // qb) * 4, staged * k * 4, staged * k * 4]  # staging
        + [local * 4] * 3  # expert_count, expert_fill, expert_offset
        + [_REGION_ALIGN]  # RouteScalars
        + [rows // BLOCK_M * 4] * 2  # block_expert, block_stored
        + [rows * 4, rows * 4]  # row_src, row_weight
        + [rows * h, rows * (h // qb) * 4, rows * i, rows * (i // qb) * 4]  # pool, act
        + [k * m * h * 2]  # combine (bf16)
    )
    return sum(-(-n // _REGION_ALIGN) * _REGION_ALIGN for n in regions)


class MegaMoeDeviceError(RuntimeError):
    """A failure the fused kernels recorded on a device instead of trapping (docs/design.md
    §3.3), raised by :meth:`SymmBuffer.check`. ``kind``: ``"device_order"`` (the buffer was made
    for another device order than the call's mesh), ``"timeout"`` (a cross-rank wait ran past
    the timeout), ``"peer_aborted"`` (a peer failed the call and sent no rows) or
    ``"launch_failed"`` (a kernel launch of the call failed on this device, and the call raised
    that error; the message names the CUDA error). ``rank`` (this
    device's rank), ``phase`` (``"dispatch"`` or ``"combine"``), ``peer``, ``epoch`` (the failed
    call, counted from 1 on that rank), ``seen`` (timeout: the epoch the peer's flag held),
    ``expected_rank`` (device order: the axis index ``peer`` ran as, else -1), ``buffer_id`` and
    ``device`` (the local GPU ordinal) name it; the message says what to do."""

    def __init__(self, record: dict, *, buffer_id: int, device: int):
        super().__init__(f"jax_megamoe: {record['message']}")
        self.kind: str = record["kind"]
        self.rank: int = record["rank"]
        self.phase: str = record["phase"]
        self.peer: int = record["peer"]
        self.epoch: int = record["epoch"]
        self.seen: int = record["seen"]
        self.expected_rank: int = record["expected_rank"]
        self.buffer_id = buffer_id
        self.device = device


@dataclass(eq=False)
class SymmBuffer:
    """Workspace for ``fp8_mega_moe`` over ``axis_name`` of ``mesh``.

    Make it with :meth:`create`; free it with :meth:`close` or a ``with`` block. On devices that
    cannot run the fused kernels (CPU, non-Hopper, no CUDA extension) nothing is allocated
    (``allocated`` is False): the buffer still carries the capacity that calls are checked
    against and the size a GPU would allocate (``nbytes_per_rank``), and only the reference
    implementation can use it. A closed buffer (``closed``) refuses every call but
    ``impl='reference'``: every new trace. On backends where nothing was allocated, a program
    jitted before ``close()`` keeps running from JAX's cache (it runs the reference path and
    holds no workspace); on GPUs ``close()`` drops such programs (see there).

    A call that fails on the device (the buffer made for another device order than the call's
    mesh, a peer that never makes the matching call) returns NaN instead of killing the process;
    :meth:`check` raises the reason, and so does the next call on the buffer, which refuses to
    run until the buffer is closed and created anew.

    When the mesh spans several processes (``jax.distributed``), :meth:`create` and :meth:`close`
    are collective: every process whose devices are in the mesh calls them, for the same buffers
    in the same order.
    """

    mesh: Mesh
    axis_name: str
    num_experts: int
    hidden: int
    intermediate: int
    topk: int
    max_tokens_per_rank: int
    buffer_id: int
    nbytes_per_rank: int  # what each GPU of the mesh allocates (or would, on other backends)
    allocated: bool = False
    closed: bool = False
    # Cross-rank wait limit in seconds; None: JAX_MEGAMOE_TIMEOUT_S, else DEFAULT_TIMEOUT_S.
    timeout_s: float | None = None
    # Processes whose devices are in the mesh (the peers of create/close); () when this
    # process has none.
    processes: tuple[int, ...] = ()
    # The name the processes of the mesh agree on (distributed.setup_name); "" when this
    # process has none of its devices.
    setup: str = ""
    # Host identity of each process of the mesh (see distributed.host_id).
    hosts: dict[int, str] = field(default_factory=dict, repr=False)
    # Set when fp8_mega_moe traced the fused kernels with this buffer (see close()).
    traced: bool = field(default=False, repr=False)
    # The cross-rank wait limit the kernels were given, as the extension resolved it.
    _kernel_timeout_s: float = field(default=0.0, repr=False)
    _ordinals: list[int] = field(default_factory=list, repr=False)
    _finalizer: weakref.finalize | None = field(default=None, repr=False)

    @property
    def num_ranks(self) -> int:
        return self.mesh.shape[self.axis_name]

    @classmethod
    def create(
        cls,
        mesh: Mesh,
        axis_name: str,
        *,
        num_experts: int,
        hidden: int,
        intermediate: int,
        topk: int,
        max_tokens_per_rank: int,
        sm_budget: int = 0,
        timeout_s: float | None = None,
    ) -> SymmBuffer:
        """Sizes the workspace exactly from the shapes and allocates it on every device of the
        mesh (each device's rank is its index along ``axis_name``). ``sm_budget`` caps the SMs
        the persistent kernels take (0 = all), leaving room for XLA's concurrent work.
        ``timeout_s`` bounds each cross-rank wait of a call (None: ``JAX_MEGAMOE_TIMEOUT_S``,
        else ``DEFAULT_TIMEOUT_S`` = 300 s); past it the call fails with NaN output and
        :meth:`check` says why. Every argument is checked on every backend by the rules the CUDA
        side applies.

        Each group of devices along ``axis_name`` (one per index of the other mesh axes) is an
        independent expert group with its own peers; its GPUs must be on one host. With several
        processes every process allocates its own devices' workspaces and maps its peers'."""
        if not isinstance(mesh, Mesh):
            raise TypeError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}")
        if axis_name not in mesh.axis_names:
            raise ValueError(f"axis {axis_name!r} is not an axis of the mesh {mesh.axis_names}")
        num_ranks = mesh.shape[axis_name]
        dims = checks.check_workspace_args(
            num_ranks=num_ranks,
            sm_budget=sm_budget,
            num_experts=num_experts,
            hidden=hidden,
            intermediate=intermediate,
            topk=topk,
            max_tokens_per_rank=max_tokens_per_rank,
        )
        timeout_s = checks.check_timeout(timeout_s)
        me = jax.process_index()
        processes = tuple(sorted({d.process_index for d in mesh.devices.flat}))
        with _lock:
            buffer_id = next(_ids)
            if me in processes:
                number = next(_setups.setdefault(processes, itertools.count(1)))
        nbytes = workspace_nbytes(num_ranks=num_ranks, **dims)
        buf = cls(
            mesh,
            axis_name,
            buffer_id=buffer_id,
            nbytes_per_rank=nbytes,
            timeout_s=timeout_s,
            **dims,
        )
        if me in processes:  # else none of this process's devices is in the mesh
            buf.processes = processes
            buf.setup = dist.setup_name(processes, number)
            buf._setup(int(sm_budget))
        return buf

    def _rank_groups(self) -> list[list[jax.Device]]:
        """Devices grouped by expert group, each group ordered by rank along the axis."""
        return checks.rank_groups(self.mesh, self.axis_name)

    def _fingerprint(self) -> list:
        """What every process must agree on for one buffer."""
        return [
            self.axis_name,
            list(self.mesh.axis_names),
            [int(d.id) for d in self.mesh.devices.flat],
            list(self.mesh.devices.shape),
            self.num_experts,
            self.hidden,
            self.intermediate,
            self.topk,
            self.max_tokens_per_rank,
        ]

    def _exchange(self, phase: str, compute) -> dict[int, object]:
        """``{process: compute() there}`` over the mesh's processes; with one process, just
        ``{me: compute()}`` (see ``distributed.exchange``)."""
        return dist.exchange(self.setup, phase, self.processes, compute)

    def _setup(self, sm_budget: int) -> None:
        """The same sequence for one or many processes: agree on the arguments and on whether
        every process can run the kernels, then allocate, exchange handles, connect."""
        me = jax.process_index()
        local = [d for d in self.mesh.devices.flat if d.process_index == me]
        can_fuse = _ffi.extension_available() and all(_ffi.is_sm90(d) for d in local)
        mine = {"host": dist.host_id(), "fused": can_fuse, "config": self._fingerprint()}
        info = self._exchange("info", lambda: mine)
        for p, v in sorted(info.items()):
            if v["config"] != mine["config"]:
                raise ValueError(
                    f"SymmBuffer {self.setup}: process {p} created it with "
                    f"{v['config']}, process {me} with {mine['config']} "
                    "([axis, axis names, device ids, mesh shape, E, H, I, K, max tokens]); "
                    "every process must call SymmBuffer.create with the same arguments, for "
                    "the same buffers in the same order"
                )
        self.hosts = {int(p): v["host"] for p, v in sorted(info.items())}
        if not all(v["fused"] for v in info.values()):
            return  # some process cannot run the kernels: every process uses the reference
        check_groups_on_one_host(self._rank_groups(), self.hosts, self.axis_name)
        self._allocate(sm_budget)

    def _allocate(self, sm_budget: int) -> None:
        c = _ffi.extension()
        ordinals: list[int] = []
        self._finalizer = weakref.finalize(self, _destroy, self.buffer_id, ordinals)
        self._ordinals = ordinals
        ptrs: dict[int, int] = {}  # device id -> workspace pointer, this process's devices
        try:
            # Nobody maps a peer before every process has allocated and exported: on an error
            # here no handle is open anywhere, so each process just frees its own.
            exported = self._exchange(
                "handles", lambda: self._allocate_local(c, sm_budget, ptrs, ordinals)
            )
        except BaseException:
            self._finalizer()
            raise
        remote = {k: v for per_process in exported.values() for k, v in per_process.items()}
        try:
            self._exchange("connected", lambda: self._connect_local(c, ptrs, remote))
            dist.forget(self.setup, self.processes, "info", "handles")  # all have read them
        except BaseException as e:
            _cleanup_noting(e, lambda: self._teardown(strict=False, after_calls=False), "cleanup")
            raise
        self.allocated = True

    def _local(self):
        """``(rank, device, group)`` for each of this process's devices in the mesh."""
        me = jax.process_index()
        for group in self._rank_groups():
            for rank, d in enumerate(group):
                if d.process_index == me:
                    yield rank, d, group

    def _allocate_local(self, c, sm_budget, ptrs, ordinals) -> dict[str, dict]:
        """Allocates this process's workspaces; returns the IPC handle and PCI bus id of each
        one whose expert group reaches into another process (the others need none)."""
        for _, d, group in self._local():
            for p in group:
                a, b = d.local_hardware_id, p.local_hardware_id
                if p.process_index == d.process_index and not c.can_access_peer(a, b):
                    raise RuntimeError(
                        f"SymmBuffer: GPU {a} cannot access GPU {b} as a peer; the expert axis "
                        "needs peer (NVLink) access between all of its GPUs"
                    )
        nbytes = self.nbytes_per_rank
        for rank, d, _ in self._local():
            ordinal = d.local_hardware_id
            free = c.device_free_bytes(ordinal)
            if free < nbytes:
                raise MemoryError(
                    f"SymmBuffer needs {nbytes / 2**30:.2f} GiB on GPU {ordinal} but only "
                    f"{free / 2**30:.2f} GiB are free: JAX preallocates most of the GPU at first "
                    "use; lower XLA_PYTHON_CLIENT_MEM_FRACTION (e.g. 0.5), set "
                    "XLA_PYTHON_CLIENT_PREALLOCATE=false, or reduce max_tokens_per_rank"
                )
            ptrs[d.id] = c.create_workspace(
                self.buffer_id,
                ordinal,
                rank,
                self.num_ranks,
                self.num_experts,
                self.hidden,
                self.intermediate,
                self.topk,
                self.max_tokens_per_rank,
                sm_budget,
                0.0 if self.timeout_s is None else self.timeout_s,  # 0: the environment's
            )
            ordinals.append(ordinal)
        # As the extension resolved it at create_workspace (the same for every local workspace).
        self._kernel_timeout_s = max(
            (c.workspace_timeout_s(self.buffer_id, o) for o in ordinals), default=0.0
        )
        return {
            str(d.id): {
                "handle": base64.b64encode(
                    c.export_ipc_handle(self.buffer_id, d.local_hardware_id)
                ).decode(),
                "bus_id": c.device_pci_bus_id(d.local_hardware_id),
            }
            for _, d, group in self._local()
            if any(p.process_index != d.process_index for p in group)
        }

    def _connect_local(self, c, ptrs, remote) -> bool:
        """Gives each local workspace its peers' pointers: local peers directly, peers of other
        processes mapped from their IPC handles."""
        for _, d, group in self._local():
            ordinal = d.local_hardware_id
            peer_ords = []
            peer_ptrs = []
            for rank, p in enumerate(group):
                if p.process_index == d.process_index:
                    peer_ords.append(p.local_hardware_id)
                    peer_ptrs.append(ptrs[p.id])
                    continue
                entry = remote[str(p.id)]
                visible = c.device_by_pci_bus_id(entry["bus_id"])
                if visible >= 0 and not c.can_access_peer(ordinal, visible):
                    raise RuntimeError(
                        f"SymmBuffer: GPU {ordinal} cannot access GPU {entry['bus_id']} "
                        f"(rank {rank}, process {p.process_index}) as a peer; the expert axis "
                        "needs peer (NVLink) access between all of its GPUs"
                    )
                handle = base64.b64decode(entry["handle"])
                peer_ords.append(-1)
                peer_ptrs.append(c.open_ipc_handle(self.buffer_id, ordinal, handle))
            c.connect_workspace(self.buffer_id, ordinal, peer_ords, peer_ptrs)
        return True

    def _teardown(self, *, strict: bool, after_calls: bool = True) -> None:
        """Unmap the peers' workspaces here, wait until every process of the mesh has done the
        same, then free this process's workspaces (a peer may still map them until then).
        ``strict``: if a peer does not arrive, raise and keep this process's memory (freed at
        exit) rather than free memory a live peer may still use. One process: no wait.
        ``after_calls``: the wait is the setup timeout plus the kernels' cross-rank timeout, as
        a peer may first wait that out in a call this process never made (it failed before, at
        trace time) and only then reach its own close(); a failed setup has run no call."""
        c = _ffi.extension()
        unmap_error = None
        for ordinal in self._ordinals:
            try:
                c.close_ipc_handles(self.buffer_id, ordinal)
            except Exception as e:  # keep going: the peers wait for this process at the barrier
                unmap_error = unmap_error or e
        try:
            extra_s = self._kernel_timeout_s if after_calls else 0.0
            dist.all_gather(self.setup, "closed", self.processes, True, extra_s=extra_s)
            dist.forget(self.setup, self.processes, "connected")
        except dist.SetupError:
            if strict:
                raise
        except RuntimeError as e:  # jax.distributed was shut down: no peer is left to wait for
            warnings.warn(f"SymmBuffer.close: freeing without a barrier ({e})", stacklevel=3)
        self._finalizer()
        if unmap_error is not None:
            raise unmap_error

    def check(self) -> None:
        """Raises :class:`MegaMoeDeviceError` if a call on this buffer failed on one of this
        process's devices; returns None otherwise, and always where nothing is allocated (CPU,
        no extension, closed).

        It reads what the kernels that have finished recorded, without syncing: call it after
        ``block_until_ready()`` on a result. A failed call's output is NaN, and the next
        ``fp8_mega_moe`` call on the buffer raises the same reason at its FFI handler; but
        inside a program already running (later layers, ``lax.scan``) and on XLA command-buffer
        replays the handler does not run again, so ``check()`` is how to learn why. A failed
        buffer refuses every further call: close it and create a new one."""
        if not self.allocated:
            return None
        c = _ffi.extension()
        for ordinal in self._ordinals:
            record = c.buffer_error(self.buffer_id, ordinal)
            if record is not None:
                raise MegaMoeDeviceError(record, buffer_id=self.buffer_id, device=ordinal)
        return None

    def close(self) -> None:
        """Frees the workspace on every device (idempotent). Call it only once no computation
        that uses the buffer is in flight. With several processes it is collective: each
        process unmaps its peers, all wait for each other (up to ``JAX_MEGAMOE_SETUP_TIMEOUT_S``
        plus the kernels' cross-rank timeout), then each frees its own workspaces. Later calls
        with the buffer raise.

        If a program was traced with the buffer's fused kernels, this clears JAX's compilation
        caches (``jax.clear_caches()``: every jitted function compiles again at its next call).
        Such a program holds the workspace's address, and XLA replays its recorded kernels
        (command buffers) without the handler's check, so a cached copy would run on freed
        memory; retraced, it raises instead. A program compiled ahead of time
        (``jit(...).lower(...).compile()``) is out of reach: drop it before closing."""
        finalizer = self._finalizer
        self.allocated = False
        self.closed = True
        if finalizer is not None and finalizer.alive:
            if self.traced:
                jax.clear_caches()
            self._teardown(strict=True)

    def __enter__(self) -> SymmBuffer:
        return self

    # A buffer is a handle to device memory and to state its calls and close() share (closed,
    # traced, the finalizer): a copy that split them could run on memory another copy freed.
    # So copies are the buffer itself (a layer holding one deep-copies safely), and pickling,
    # which would carry it to another process, is refused.
    def __copy__(self) -> SymmBuffer:
        return self

    def __deepcopy__(self, memo) -> SymmBuffer:
        return self

    def __reduce__(self):
        raise TypeError(
            f"SymmBuffer {self.buffer_id} cannot be pickled: it holds this process's device "
            "memory. Create the buffer in each process (SymmBuffer.create, collective over "
            "the mesh's processes)"
        )

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc is None:
            self.close()
        else:
            _cleanup_noting(exc, self.close, "close() on the way out")


def check_groups_on_one_host(
    groups: Sequence[Sequence[jax.Device]], hosts: dict[int, str], axis_name: str
) -> None:
    """Refuses an expert group whose devices live on different hosts (their GPUs cannot reach
    each other's memory: no NVLink between hosts). ``hosts`` maps process index to host id."""
    for group in groups:
        spans: dict[str, list[int]] = {}
        for d in group:
            procs = spans.setdefault(hosts[d.process_index], [])
            if d.process_index not in procs:
                procs.append(d.process_index)
        if len(spans) > 1:
            where = "; ".join(f"host {h!r}: processes {p}" for h, p in spans.items())
            raise ValueError(
                f"SymmBuffer: the expert axis {axis_name!r} spans {len(spans)} hosts ({where}); "
                "the fused kernels read and write peer GPUs' memory over NVLink, which does not "
                "reach across hosts. Make each expert group one host's GPUs, e.g. a 2-D mesh "
                "Mesh(devices.reshape(num_hosts, gpus_per_host), ('data', 'expert')) with "
                "the expert axis inside a host"
            )


def _cleanup_noting(error: BaseException, cleanup, what: str) -> None:
    """Runs ``cleanup`` while ``error`` is on its way out; a failure of it becomes a note on
    ``error``, which stays the one raised (it says what went wrong first)."""
    try:
        cleanup()
    except Exception as e:
        error.add_note(f"SymmBuffer {what} failed too: {e!r}")


def _destroy(buffer_id: int, ordinals: list[int]) -> None:
    """Frees this process's workspaces (unmapping the peers they opened first). The GC/exit
    path: no barrier with other processes; ``close()`` is the collective, safe one."""
    c = _ffi.extension()
    first = None
    for ordinal in ordinals:
        try:
            c.destroy_workspace(buffer_id, ordinal)
        except Exception as e:
            first = first or e
    ordinals.clear()
    if first is not None:
        raise first
