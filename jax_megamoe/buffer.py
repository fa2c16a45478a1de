"""The symmetric workspace: one persistent device allocation per rank, same layout on every
rank, with each rank holding the base pointers of its peers (DESIGN §3)."""

from __future__ import annotations

import itertools
import threading
import weakref
from dataclasses import dataclass, field

import jax
import numpy as np
from jax.sharding import Mesh

from . import _ffi
from .quant import BLOCK

_ids = itertools.count(1)
_lock = threading.Lock()


def check_moe_dims(
    *, num_experts: int, hidden: int, intermediate: int, topk: int, num_ranks: int
) -> None:
    """The shape rules shared by the workspace and the op (DESIGN §1)."""
    if hidden % BLOCK or intermediate % BLOCK:
        raise ValueError(
            f"hidden ({hidden}) and intermediate ({intermediate}) must be multiples of {BLOCK}"
        )
    if num_experts % num_ranks:
        raise ValueError(
            f"num_experts ({num_experts}) must be divisible by the expert-axis size ({num_ranks})"
        )
    if not 1 <= topk <= num_experts:
        raise ValueError(f"topk ({topk}) must be in [1, num_experts={num_experts}]")


@dataclass(eq=False)
class SymmBuffer:
    """Workspace for ``fp8_mega_moe`` over ``axis_name`` of ``mesh``.

    Make it with :meth:`create`; free it with :meth:`close` or a ``with`` block. On devices that
    cannot run the fused kernels (CPU, non-Hopper, no CUDA extension) nothing is allocated
    (``allocated`` is False): the buffer still carries the capacity that calls are checked
    against, and only the reference implementation can use it.
    """

    mesh: Mesh
    axis_name: str
    num_experts: int
    hidden: int
    intermediate: int
    topk: int
    max_tokens_per_rank: int
    buffer_id: int
    nbytes_per_rank: int | None
    allocated: bool
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
    ) -> SymmBuffer:
        """Sizes the workspace exactly from the shapes and allocates it on every device of the
        mesh (each device's rank is its index along ``axis_name``). ``sm_budget`` caps the SMs
        the persistent kernels take (0 = all), leaving room for XLA's concurrent work."""
        if axis_name not in mesh.axis_names:
            raise ValueError(f"axis {axis_name!r} is not an axis of the mesh {mesh.axis_names}")
        num_ranks = mesh.shape[axis_name]
        check_moe_dims(
            num_experts=num_experts,
            hidden=hidden,
            intermediate=intermediate,
            topk=topk,
            num_ranks=num_ranks,
        )
        if max_tokens_per_rank < 1:
            raise ValueError(f"max_tokens_per_rank must be >= 1, got {max_tokens_per_rank}")
        if sm_budget < 0:
            raise ValueError(f"sm_budget must be >= 0 (0 = all SMs), got {sm_budget}")
        with _lock:
            buffer_id = next(_ids)
        buf = cls(
            mesh=mesh,
            axis_name=axis_name,
            num_experts=num_experts,
            hidden=hidden,
            intermediate=intermediate,
            topk=topk,
            max_tokens_per_rank=max_tokens_per_rank,
            buffer_id=buffer_id,
            nbytes_per_rank=None,
            allocated=False,
        )
        devices = list(mesh.devices.flat)
        if _ffi.extension_available() and all(_ffi.is_sm90(d) for d in devices):
            buf._allocate(sm_budget)
        return buf

    def _rank_groups(self) -> list[list[jax.Device]]:
        """Devices grouped by expert group, each group ordered by rank along the axis."""
        axis = self.mesh.axis_names.index(self.axis_name)
        grid = np.moveaxis(self.mesh.devices, axis, -1)
        return [list(row) for row in grid.reshape(-1, grid.shape[-1])]

    def _allocate(self, sm_budget: int) -> None:
        c = _ffi.extension()
        groups = self._rank_groups()
        if any(d.process_index != jax.process_index() for g in groups for d in g):
            raise NotImplementedError(
                "SymmBuffer: the mesh spans several processes; multi-process workspaces (CUDA "
                "IPC) are not supported yet — run one process over all GPUs of the host"
            )
        num_ranks = self.num_ranks
        nbytes = c.workspace_nbytes(
            num_ranks,
            self.num_experts,
            self.hidden,
            self.intermediate,
            self.topk,
            self.max_tokens_per_rank,
        )
        for group in groups:
            ords = [d.local_hardware_id for d in group]
            for a in ords:
                for b in ords:
                    if a != b and not c.can_access_peer(a, b):
                        raise RuntimeError(
                            f"SymmBuffer: GPU {a} cannot access GPU {b} as a peer; the expert "
                            "axis needs peer (NVLink) access between all of its GPUs"
                        )
        ordinals: list[int] = []
        finalizer = weakref.finalize(self, _destroy, self.buffer_id, ordinals)
        for group in groups:
            ords = [d.local_hardware_id for d in group]
            ptrs = []
            for rank, ordinal in enumerate(ords):
                free = c.device_free_bytes(ordinal)
                if free < nbytes:
                    raise MemoryError(
                        f"SymmBuffer needs {nbytes / 2**30:.2f} GiB on GPU {ordinal} but only "
                        f"{free / 2**30:.2f} GiB are free: JAX preallocates most of the GPU at "
                        "first use; lower XLA_PYTHON_CLIENT_MEM_FRACTION (e.g. 0.5), set "
                        "XLA_PYTHON_CLIENT_PREALLOCATE=false, or reduce max_tokens_per_rank"
                    )
                ptrs.append(
                    c.create_workspace(
                        self.buffer_id,
                        ordinal,
                        rank,
                        num_ranks,
                        self.num_experts,
                        self.hidden,
                        self.intermediate,
                        self.topk,
                        self.max_tokens_per_rank,
                        sm_budget,
                    )
                )
                ordinals.append(ordinal)
            for ordinal in ords:
                c.connect_workspace(self.buffer_id, ordinal, ords, ptrs)
        self._ordinals = ordinals
        self._finalizer = finalizer
        self.nbytes_per_rank = nbytes
        self.allocated = True

    def close(self) -> None:
        """Frees the workspace on every device (idempotent). Call it only once no computation
        that uses the buffer is in flight."""
        if self._finalizer is not None:
            self._finalizer()
        self.allocated = False

    def __enter__(self) -> SymmBuffer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _destroy(buffer_id: int, ordinals: list[int]) -> None:
    c = _ffi.extension()
    for ordinal in ordinals:
        c.destroy_workspace(buffer_id, ordinal)
