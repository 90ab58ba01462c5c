"""The MPI transport over mpi4py: point-to-point with deadlines, MPI's native collectives, MPI_Abort on failure.

CPU tensors are handed to MPI as views of their memory (no copies). MPI has no fp16/bf16 datatype: their bytes
travel as int16, and native reductions on them are computed in float32. CUDA tensors are staged through
pinned host memory by the base class unless this MPI reports CUDA support.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from mpi4py import MPI

from distrib.comm.base import Communicator
from distrib.comm.contract import poll
from distrib.comm.shm import SharedMemory
from distrib.comm.transport import Pending

_TYPES = {
    torch.float32: MPI.FLOAT,
    torch.float64: MPI.DOUBLE,
    torch.int32: MPI.INT32_T,
    torch.int64: MPI.INT64_T,
    torch.int8: MPI.INT8_T,
    torch.uint8: MPI.UINT8_T,
    torch.float16: MPI.INT16_T,  # moved as raw 16-bit words, never reduced by MPI
    torch.bfloat16: MPI.INT16_T,
}
_NUMPY = {d for d in _TYPES if d != torch.bfloat16}  # the dtypes numpy holds: the algorithms get numpy views
_NUMPY_TYPES = {torch.empty(0, dtype=d).numpy().dtype: _TYPES[d] for d in _NUMPY}
_OPS = {"sum": MPI.SUM, "max": MPI.MAX, "min": MPI.MIN}
_HALF = (torch.float16, torch.bfloat16)
SAVED_MAX = 256  # persistent allreduces a communicator keeps (each holds MPI's schedule of one kind of call)
NO_PART, NEW, FITS = 0, 1, 2  # votes on restarting one (MPICommunicator._vote)
_ABORT_GRACE = 0.5  # seconds a failing rank gives the launcher to forward its message before aborting the job


def _buffer(t: torch.Tensor | np.ndarray) -> list:
    """[memory, MPI datatype] for a contiguous tensor or array, sharing its storage; the caller keeps `t` alive."""
    if isinstance(t, np.ndarray):
        return [t, _NUMPY_TYPES[t.dtype]]
    if t.is_cuda:  # CUDA-aware MPI reads device memory outside torch's stream order: let queued kernels finish
        torch.cuda.current_stream(t.device).synchronize()
        return [t.detach().view(torch.int16) if t.dtype in _HALF else t.detach(), _TYPES[t.dtype]]
    # A bare address is the cheapest handle for MPI (a numpy view costs a microsecond more per message).
    return [MPI.memory.fromaddress(t.data_ptr(), t.numel() * t.itemsize), _TYPES[t.dtype]]


def _cores() -> set[int]:
    """The CPU cores this process may run on."""
    affinity = getattr(os, "sched_getaffinity", None)
    return set(affinity(0)) if affinity else set(range(os.cpu_count() or 1))


def _cuda_aware() -> bool:
    query = getattr(MPI, "Query_cuda_support", None)
    return bool(query and query())


class MPICommunicator(Communicator):
    """Collectives over an MPI communicator (a private duplicate of COMM_WORLD by default)."""

    backend = "mpi"
    spins = True  # MPI progresses inside our polls

    def __init__(self, comm: MPI.Comm | None = None, *, timeout: float | None = None, algorithm: str = "native"):
        self._comm = (comm or MPI.COMM_WORLD).Dup()  # our traffic never matches a user's own MPI calls
        self._host = self._comm.Split_type(MPI.COMM_TYPE_SHARED)  # the ranks on this host
        self._shared: SharedMemory | None = None  # algorithm "shm"'s window, made on first use
        # Per kind of allreduce (kinds.Kind): the memory its persistent request reads, and the request (_restart).
        self._saved: dict[Any, tuple[int, MPI.Prequest]] = {}
        self._persists = MPI.Get_version() >= (4, 0) and hasattr(self._comm, "Allreduce_init")
        super().__init__(self._comm.Get_rank(), self._comm.Get_size(), timeout=timeout, algorithm=algorithm)
        cores = set().union(*self._host.allgather(_cores()))
        self._crowded = self._host.Get_size() > len(cores)  # oversubscribed: waiting ranks must give way
        if torch.cuda.is_available() and _cuda_aware():
            self.devices = ("cpu", "cuda")
        self.open_flight()

    def _flight_store(self):  # noqa: ANN202 -- a torch.distributed TCPStore, imported only where hosts differ
        from distrib.comm.torch_dist import rendezvous

        return rendezvous(self)  # on rank 0, met through MPI: only jobs that span hosts pay for it

    def post(
        self, sends: Sequence[tuple[torch.Tensor, int]] = (), recvs: Sequence[tuple[torch.Tensor, int]] = ()
    ) -> Pending:
        comm, pending = self._comm, []
        for t, src in recvs:
            pending.append((comm.Irecv(_buffer(t), src), src))
        for t, dst in sends:
            pending.append((comm.Isend(_buffer(t), dst), dst))
        return pending

    def wait_all(self, pending: Pending, what: str) -> None:
        # MPI's own waits cannot time out, so poll: a dead or missing peer becomes an error, not a hang.
        requests = [request for request, _ in pending]
        done = requests[0].Test if len(requests) == 1 else lambda: MPI.Request.Testall(requests)  # one: no list
        if requests and not done():
            self._until(done, what, lambda: [p for r, p in pending if not r.Test()], sleeps=False)  # Test progresses

    def _wait_one(self, request: MPI.Request, what: str) -> None:
        """wait_all for one native collective's request, without its lists: the small calls' hot path."""
        if not request.Test() and not poll(request.Test, self.timeout, self._crowded, sleeps=False):  # Test progresses
            raise self._timeout(what, [-1])

    def _until(
        self, done: Callable[[], bool], what: str, missing: Callable[[], list[int]], sleeps: bool = True
    ) -> None:
        """Poll `done` until it holds, else raise CollectiveTimeout naming `what` and the `missing()` ranks."""
        if not poll(done, self.timeout, self._crowded, sleeps=sleeps):
            raise self._timeout(what, missing())

    def _array(self, flat: torch.Tensor) -> torch.Tensor | np.ndarray:
        return flat.detach().numpy() if flat.device.type == "cpu" and flat.dtype in _NUMPY else flat

    def _shm_unavailable(self) -> str:
        if self._host.Get_size() < self._comm.Get_size():
            return f"needs every rank on one host, but these {self._comm.Get_size()} ranks span several hosts"
        return ""

    def shared_zeros(self, numel: int, dtype: torch.dtype) -> torch.Tensor | None:
        return None if self._shm_unavailable() else self._shm().regions.make(self, numel, dtype)

    def _shm(self) -> SharedMemory:
        if self._shared is None:
            self._native_barrier()  # all ranks are here (a wait with a deadline) before a set-up that has none
            self._shared = SharedMemory(self._host, self._until)
        return self._shared

    def _native_allreduce(self, flat: torch.Tensor, op: str) -> None:
        if flat.dtype in _HALF:
            wide = flat.float()
            self._native_allreduce(wide, op)
            flat.copy_(wide)
            return
        self._wait_one(self._comm.Iallreduce(MPI.IN_PLACE, _buffer(flat), _OPS[op]), "MPI allreduce")

    def _vote(self, kind: Any, t: torch.Tensor | None) -> int:
        """FITS where this rank's persistent allreduce for `kind` reads t's memory, NEW where it may make one, NO_PART
        where it makes none (not a native allreduce of a CPU tensor MPI reduces, or SAVED_MAX kept already)."""
        saved = self._saved.get(kind)
        if saved is not None:  # a kind that qualified: only t may not
            return FITS if saved[0] == t.data_ptr() and t.is_contiguous() else NEW if t.is_cpu else NO_PART
        if kind.name != "allreduce" or (kind.chosen or kind.algorithm) != "native" or not self._persists:
            return NO_PART
        if not t.is_cpu or t.dtype in _HALF or not kind.nbytes or len(self._saved) >= SAVED_MAX:
            return NO_PART
        return NEW

    def _restart(self, kind: Any, flat: torch.Tensor, op: str) -> bool:
        """A repeated allreduce restarts a persistent request (MPI-4's MPI_Allreduce_init) instead of a new
        MPI_Iallreduce, whose schedule MPICH builds on every call (at 4 KiB ~1 us of ~4). Making one is collective,
        and it reads one buffer: restart only if every rank's saved request reads this call's tensor, else every rank
        makes a new one together; the votes (_vote) are on the board, where every rank of one host reads them."""
        board, seq = self._board, self._seq
        if board is None or not board.whole:
            return False
        least = board.least_vote(seq)
        if least < 0:  # a peer not in the call yet: the check is off
            self._until(lambda: board.least_vote(seq) >= 0, "MPI allreduce (votes)", lambda: [-1])
            least = board.least_vote(seq)
        if least == NO_PART:
            return False
        if least == NEW:
            old = self._saved.pop(kind, None)
            if old is not None:
                old[1].Free()
            self._saved[kind] = flat.data_ptr(), self._comm.Allreduce_init(MPI.IN_PLACE, _buffer(flat), _OPS[op])
        request = self._saved[kind][1]
        request.Start()
        self._wait_one(request, "MPI allreduce")
        return True

    def _native_reduce_scatter(self, flat: torch.Tensor, out: torch.Tensor, op: str) -> None:
        if flat.dtype in _HALF:
            wide = out.float()
            self._native_reduce_scatter(flat.float(), wide, op)
            out.copy_(wide)
            return
        request = self._comm.Ireduce_scatter_block(_buffer(flat), _buffer(out), _OPS[op])
        self.wait_all([(request, -1)], "MPI reduce_scatter")

    def _native_allgather(self, shard: torch.Tensor, out: torch.Tensor) -> None:
        part = shard.numel()
        in_place = shard.data_ptr() == out.data_ptr() + self.rank * part * out.element_size()
        send = MPI.IN_PLACE if in_place else _buffer(shard)
        self.wait_all([(self._comm.Iallgather(send, _buffer(out)), -1)], "MPI allgather")

    def _native_broadcast(self, t: torch.Tensor, root: int) -> None:
        self.wait_all([(self._comm.Ibcast(_buffer(t), root=root), -1)], f"MPI broadcast from rank {root}")

    def _native_barrier(self) -> None:
        self.wait_all([(self._comm.Ibarrier(), -1)], "MPI barrier")

    def split(self, color: int, key: int) -> MPICommunicator:
        self._native_barrier()  # all ranks are here (a wait with a deadline) before calls that have none
        part = self._comm.Split(color, key)
        try:
            return MPICommunicator(part, timeout=self.timeout)
        finally:
            part.Free()

    def close(self) -> None:
        if not self._close_parts():
            return
        if self._shared is not None:
            self._shared.close()
        for _, request in self._saved.values():
            with contextlib.suppress(MPI.Exception):  # one still active after a timeout: the job is ending anyway
                request.Free()
        self._host.Free()
        self._comm.Free()


def abort_job() -> None:
    """MPI_Abort on the world: the launcher ends every rank at once, instead of leaving them in their next collective.

    For a process whose unhandled exception has been reported already (distrib.process installs the hook).
    """
    # The launcher forwards our stderr through a pipe but gets the abort on another channel: without a pause
    # it could kill the job before forwarding the message (a bare Abort lost it in 5 of 60 runs here).
    time.sleep(_ABORT_GRACE)
    MPI.COMM_WORLD.Abort(1)
    os._exit(1)  # Abort returns when the launcher is out of reach (a cut link): end here, not in MPI_Finalize
