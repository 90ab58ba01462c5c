"""Failures on purpose, one per run: `python scenarios.py NAME [backend]` under a launcher.

Checked from outside by tests/test_failures.py: the job must end (never hang) with a message naming the problem.
"""

from __future__ import annotations

import sys
import time

import torch

import distrib


def timeout(comm: distrib.Communicator) -> None:
    """Rank 1 never arrives: the others raise CollectiveTimeout naming it, and the job goes down."""
    if comm.rank == 1:
        time.sleep(600)
    comm.allreduce(torch.ones(10), algorithm="ring")


def crash(comm: distrib.Communicator) -> None:
    """Rank 1 raises while the others wait in a collective: the whole job ends within seconds."""
    if comm.rank == 1:
        raise ValueError("boom on purpose")
    comm.allreduce(torch.ones(10))


def mismatch(comm: distrib.Communicator) -> None:
    """Rank-dependent shapes in the first collective: every rank gets a clear CollectiveError."""
    try:
        comm.allreduce(torch.ones(3 + comm.rank))
    except distrib.CollectiveError as error:
        print(f"rank {comm.rank} caught: {error}", flush=True)


def dtype_mismatch(comm: distrib.Communicator) -> None:
    try:
        comm.allgather(torch.ones(4, dtype=torch.float32 if comm.rank == 0 else torch.float64))
    except distrib.CollectiveError as error:
        print(f"rank {comm.rank} caught: {error}", flush=True)


class _TwoHeads(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)

    def forward(self, x: torch.Tensor, use_b: bool) -> torch.Tensor:
        return self.a(x) + (self.b(x) if use_b else 0)


def ddp_unused_on_one_rank(comm: distrib.Communicator) -> None:
    """Rank 1 leaves a parameter out of its loss: its next forward raises torch's error and the job goes down; the
    other ranks, waiting for that parameter's bucket, do not wait out their timeout."""
    model = distrib.DistributedDataParallel(_TwoHeads())
    for _ in range(2):
        model(torch.ones(1, 2), comm.rank != 1).sum().backward()


if __name__ == "__main__":
    name, backend = sys.argv[1], (sys.argv[2] if len(sys.argv) > 2 else None)
    communicator = distrib.init(backend, timeout=float(sys.argv[3]) if len(sys.argv) > 3 else 60)
    globals()[name](communicator)
