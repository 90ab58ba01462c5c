"""Failures on purpose, one per run: `python scenarios.py NAME [backend [timeout [ARGS...]]]` under a launcher.

timeout "env" leaves the deadline to DISTRIB_TIMEOUT; ARGS go to the scenario.

Checked from outside by tests/test_failures.py: the job must end (never hang) with a message naming the problem.
"""

from __future__ import annotations

import os
import signal
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


def late_mismatch(comm: distrib.Communicator, algorithm: str) -> None:
    """After 8 good calls, ranks disagree: 1000 elements against 1001 (caught; the next calls still work), then
    float32 against int32, the same bytes (not caught: the job must fail). No rank may return from either."""
    for _ in range(8):
        comm.allreduce(torch.ones(4), algorithm=algorithm)
    for t in (torch.ones(1000 + comm.rank), torch.ones(1000, dtype=torch.float32 if comm.rank == 0 else torch.int32)):
        try:
            comm.allreduce(t, algorithm=algorithm)
        except distrib.CollectiveError as error:
            print(f"rank {comm.rank} caught: {error}", flush=True)
            if t.dtype != torch.float32:
                raise
        else:
            print(f"rank {comm.rank} returned {t[-3:].tolist()}", flush=True)


def started_mismatch(comm: distrib.Communicator, algorithm: str) -> None:
    """Rank 0 enters each call first, alone, so that it starts it (gloo does not wait: verify.start_early); the others
    come 0.3 s later with other calls: 1000 elements against 1000 + rank, an allgather against allreduces, an empty
    tensor against 5 elements. No rank may return from any, and the call after each must still sum right."""
    bad = [
        lambda: comm.allreduce(torch.ones(1000 + comm.rank), algorithm=algorithm),
        lambda: (
            comm.allgather(torch.ones(6), algorithm=algorithm)
            if comm.rank == 0
            else comm.allreduce(torch.ones(12), algorithm=algorithm)
        ),
        lambda: comm.allreduce(torch.ones(0 if comm.rank == 0 else 5), algorithm=algorithm),  # nothing to start
    ]
    for call in bad:
        if comm.rank:
            time.sleep(0.3)
        try:
            call()
        except distrib.CollectiveError as error:
            print(f"rank {comm.rank} caught: {error}", flush=True)
        else:
            print(f"rank {comm.rank} returned", flush=True)
        t = torch.ones(3)
        comm.allreduce(t, algorithm=algorithm)
        print(f"rank {comm.rank} next: {t.tolist()}", flush=True)


def stopped(comm: distrib.Communicator, algorithm: str) -> None:
    """The last rank enters its 6th call (an async allreduce labelled bucket 3) first and stops itself there
    (SIGSTOP); the others join it and wait until their deadline. Their reports must name the stopped rank and its
    call, never each other."""
    for step in range(5):
        comm.allreduce(torch.ones(1000), algorithm=algorithm, label={"step": step + 1})
    last = comm.rank == comm.size - 1
    if not last:
        time.sleep(1)  # the last rank is in the call, stopped, by the time the others come
    handle = comm.allreduce(torch.ones(1000), algorithm=algorithm, async_op=True, label={"bucket": 3})
    if last:
        time.sleep(0.3)  # its engine thread is in the call, waiting for the others
        os.kill(os.getpid(), signal.SIGSTOP)
    handle.wait()


def uneven(comm: distrib.Communicator, algorithm: str) -> None:
    """Rank 0 takes 13 steps, the others 10, then exit: rank 0's 11th call must say that they finished."""
    for step in range(13 if comm.rank == 0 else 10):
        comm.allreduce(torch.ones(100), algorithm=algorithm, label={"step": step + 1})


if __name__ == "__main__":
    name, backend = sys.argv[1], (sys.argv[2] if len(sys.argv) > 2 else None)
    seconds = sys.argv[3] if len(sys.argv) > 3 else "60"
    communicator = distrib.init(backend, timeout=None if seconds == "env" else float(seconds))
    globals()[name](communicator, *sys.argv[4:])
