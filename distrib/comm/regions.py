"""Tensors in memory every rank of one host maps: made collectively, then reduced where they lie.

A gradient bucket that lives here needs no staging copy for algorithm "shm": every rank's gradients are already
where its peers can read them, so an allreduce is one pass over memory (rank r sums chunk r of every rank's
region and writes the sum back into each), not a copy into a shared window and a combine out of it.

Each region is a file in memory-backed storage (slots.FOLDER) that its owner makes and its peers map read-write;
the owner removes the file once all have mapped it, so a job that dies leaves nothing behind. A tensor over a
region keeps its mapping alive (torch.frombuffer holds the buffer), whatever becomes of the communicator, so a
`.grad` over a bucket stays valid after the DDP that made it is gone; the peers' mappings go when the region's
own tensor does.
"""

from __future__ import annotations

import itertools
import os
import secrets
import weakref
from typing import Any

import torch

from distrib.comm import slots

HEADER = 64  # the owner's nonce, then padding: the data starts on a cache line
_count = itertools.count()


class Regions:
    """The regions of one communicator's host ranks, by the address of this rank's own tensor."""

    def __init__(self) -> None:
        self._peers: dict[tuple[int, int, torch.dtype], dict[int, torch.Tensor]] = {}  # not our own: it must die

    def make(self, comm: Any, numel: int, dtype: torch.dtype) -> torch.Tensor | None:
        """A zeroed tensor of `numel` elements that every rank of `comm` (all on one host) can read and write; every
        rank calls it, in the same order. None on every rank where any rank's storage cannot take it."""
        nbytes = HEADER + max(numel, 1) * dtype.itemsize
        nonce = secrets.randbits(62)
        name = f"distrib-region-{os.getpid()}-{next(_count)}"
        mine = slots.make(os.path.join(slots.FOLDER, name), nbytes, nonce)
        regions, seen = slots.share(comm, name, nbytes, nonce, mine, writable=True)
        if not all(all(row) for row in seen):  # every rank maps every region, or none uses them
            for m in regions:
                if m is not None:
                    m.close()
            return None
        tensors = [torch.frombuffer(m, dtype=dtype, offset=HEADER, count=numel) for m in regions]
        own = tensors[comm.rank]
        key = (own.data_ptr(), numel, dtype)
        self._peers[key] = {k: t for k, t in enumerate(tensors) if k != comm.rank}
        weakref.finalize(own, self._peers.pop, key, None)
        return own

    def of(self, t: torch.Tensor) -> list[torch.Tensor] | None:
        """Every rank's region, in rank order, if `t` is exactly this rank's own (by address, size and dtype)."""
        peers = self._peers.get((t.data_ptr(), t.numel(), t.dtype))
        if peers is None:
            return None
        return [peers.get(k, t) for k in range(len(peers) + 1)]

    def __len__(self) -> int:
        return len(self._peers)
