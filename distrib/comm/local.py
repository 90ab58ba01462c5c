"""A world of one rank: every collective is the identity, so a plain `python` runs every code path."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from distrib.comm.base import Communicator
from distrib.comm.transport import Pending


class LocalCommunicator(Communicator):
    """Rank 0 of 1. The base class already skips communication at size 1; these keep the contract."""

    backend = "local"
    devices = ("cpu", "cuda")  # its collectives are copies and no-ops: any device's tensors, none staged

    def __init__(self, *, timeout: float | None = None, algorithm: str = "native") -> None:
        super().__init__(0, 1, timeout=timeout, algorithm=algorithm)

    def post(
        self, sends: Sequence[tuple[torch.Tensor, int]] = (), recvs: Sequence[tuple[torch.Tensor, int]] = ()
    ) -> Pending:
        if sends or recvs:
            raise ValueError("a world of one rank has no peers to send to or receive from")
        return []

    def wait_all(self, pending: Pending, what: str) -> None:
        return None

    def split(self, color: int, key: int) -> LocalCommunicator:
        return LocalCommunicator(timeout=self.timeout)

    def _shm_unavailable(self) -> str:
        return ""  # one rank shares memory with itself: "shm", like every algorithm, is the identity

    def _native_allreduce(self, flat: torch.Tensor, op: str) -> None:
        return None

    def _native_reduce_scatter(self, flat: torch.Tensor, out: torch.Tensor, op: str) -> None:
        out.copy_(flat)

    def _native_allgather(self, shard: torch.Tensor, out: torch.Tensor) -> None:
        out.copy_(shard)

    def _native_broadcast(self, t: torch.Tensor, root: int) -> None:
        return None

    def _native_barrier(self) -> None:
        return None
