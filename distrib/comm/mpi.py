"""The MPI backend over mpi4py: point-to-point with deadlines, MPI's native collectives, abort on failure.

CPU tensors are handed to MPI as views of their memory (no copies). MPI has no fp16/bf16 datatype: their bytes
travel as int16, and native reductions on them are computed in float32. CUDA tensors are staged through
pinned host memory by the base class unless this MPI reports CUDA support.
"""

from __future__ import annotations

import os
import sys
import time
import traceback
from collections.abc import Sequence

import torch
from mpi4py import MPI

from distrib.comm.base import Communicator, Pending

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
_OPS = {"sum": MPI.SUM, "max": MPI.MAX, "min": MPI.MIN}
_HALF = (torch.float16, torch.bfloat16)
_SPINS_PER_CHECK = 64  # polls between looks at the clock (and yields, for oversubscribed ranks)


def _buffer(t: torch.Tensor) -> list:
    """[memory, MPI datatype] for a contiguous tensor, sharing its storage."""
    if t.device.type == "cuda":
        return [t.detach().view(torch.int16) if t.dtype in _HALF else t.detach(), _TYPES[t.dtype]]
    words = t.detach().view(torch.int16) if t.dtype in _HALF else t.detach()
    return [words.numpy(), _TYPES[t.dtype]]


def _cuda_aware() -> bool:
    query = getattr(MPI, "Query_cuda_support", None)
    return bool(query and query())


class MPICommunicator(Communicator):
    """Collectives over an MPI communicator (a private duplicate of COMM_WORLD by default)."""

    backend = "mpi"

    def __init__(self, comm: MPI.Comm | None = None, *, timeout: float | None = None, algorithm: str = "native"):
        self._comm = (comm or MPI.COMM_WORLD).Dup()  # our traffic never matches a user's own MPI calls
        super().__init__(self._comm.Get_rank(), self._comm.Get_size(), timeout=timeout, algorithm=algorithm)
        if torch.cuda.is_available() and _cuda_aware():
            self.devices = ("cpu", "cuda")

    def post(
        self, sends: Sequence[tuple[torch.Tensor, int]] = (), recvs: Sequence[tuple[torch.Tensor, int]] = ()
    ) -> Pending:
        pending = [(self._comm.Irecv(_buffer(t), source=src), src) for t, src in recvs]
        return pending + [(self._comm.Isend(_buffer(t), dest=dst), dst) for t, dst in sends]

    def wait_all(self, pending: Pending, what: str) -> None:
        # MPI's own waits cannot time out, so poll: a dead or missing peer becomes an error, not a hang.
        requests = [request for request, _ in pending]
        if not requests or MPI.Request.Testall(requests):
            return
        deadline = time.monotonic() + self.timeout
        spins = 0
        while not MPI.Request.Testall(requests):
            spins += 1
            if spins % _SPINS_PER_CHECK == 0:
                if time.monotonic() > deadline:
                    raise self._timeout(what, [peer for request, peer in pending if not request.Test()])
                os.sched_yield()

    def _native_allreduce(self, flat: torch.Tensor, op: str) -> None:
        if flat.dtype in _HALF:
            wide = flat.float()
            self._native_allreduce(wide, op)
            flat.copy_(wide)
            return
        self.wait_all([(self._comm.Iallreduce(MPI.IN_PLACE, _buffer(flat), _OPS[op]), -1)], "MPI allreduce")

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

    def close(self) -> None:
        self._comm.Free()


def abort_on_exception(rank: int, size: int) -> None:
    """Make an unhandled exception on any rank end the whole job at once, showing the rank and traceback.

    Without this, the other ranks would sit in their next collective until the deadline.
    """

    def hook(kind, value, tb) -> None:
        err = sys.__stderr__  # the real stream: wrappers (torch.distributed's) may buffer sys.stderr
        err.write(f"distrib: rank {rank} of {size} failed; aborting the job\n")
        traceback.print_exception(kind, value, tb, file=err)
        err.flush()
        MPI.COMM_WORLD.Abort(1)

    sys.excepthook = hook
