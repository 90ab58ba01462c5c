"""Collectives through memory the ranks of one host share (MPI-3 shared windows): copies instead of messages.

Every rank owns a slot of BUFFERS piece-sized buffers in a window all of them map. A collective walks its tensor
in pieces small enough to stay in cache: each rank copies the parts of its piece the others need into its slot,
combines its own part with theirs, and copies their results out; main memory sees each byte of the tensor read
once and written once. A rank says how far it has got in a flag at the head of its slot; waiting on the others'
flags has the deadline every wait has and names the ranks that did not arrive. Pieces take the buffers in turn,
so a rank fills the next piece while slower ranks still read the last ones.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from mpi4py import MPI

from distrib.comm.arrays import chunks, combine_
from distrib.comm.regions import Regions

# Per buffer: more than a core's L2 (1-2 MiB on the VMs measured), so the lines a peer read have left its cache before
# they are written again (1 MiB pieces: every write waited on invalidating the peer's copy, about 2.5 GB/s from 16 MiB
# up; 1.4x ring's busbw at 64 MiB when the machine was quiet, 0.75x when it was not).
PIECE_BYTES = 4 << 20
BUFFERS = 3  # piece i+3 reuses piece i's buffers, when every rank has passed two more waits
SMALL_BYTES = 64 << 10  # up to this size (any size at 2 ranks) every rank combines every slot: fewer steps
SHORT = 3 * 64  # views of the buffers' first elements kept, per (dtype, length, buffer): _next
HEADER = 128  # the flag, then padding so the data starts on a cache line of its own

# until(done, what, missing): poll done() to the deadline, else raise naming what and missing()'s ranks.
Until = Callable[[Callable[[], bool], str, Callable[[], list[int]]], None]


class SharedMemory:
    """Allreduce, reduce-scatter and allgather for ranks that all run on one host; built collectively."""

    def __init__(self, host: MPI.Comm, until: Until, piece_bytes: int = PIECE_BYTES) -> None:
        self.rank, self.size = host.Get_rank(), host.Get_size()
        self._until, self._piece = until, piece_bytes
        self._peers = [k for k in range(self.size) if k != self.rank]
        info = MPI.Info.Create()
        info.Set("alloc_shared_noncontig", "true")  # each slot in its owner's NUMA node
        self._win = MPI.Win.Allocate_shared(HEADER + 64 + BUFFERS * piece_bytes, 1, info, comm=host)
        info.Free()
        self._win.Lock_all(MPI.MODE_NOCHECK)  # a passive epoch, in which Sync() is a memory barrier
        memory = [self._win.Shared_query(k)[0] for k in range(self.size)]
        self._flags = [memoryview(m)[:8].cast("q") for m in memory]
        self._peer_flags = [self._flags[k] for k in self._peers]
        self._buffers = []  # [rank] -> BUFFERS * piece bytes, 64-byte aligned
        for m in memory:
            offset = HEADER - MPI.Get_address(m) % 64
            self._buffers.append(torch.frombuffer(m, dtype=torch.uint8, offset=offset, count=BUFFERS * piece_bytes))
        self._typed: dict[torch.dtype, list[list[torch.Tensor]]] = {}
        self._short: dict[tuple[torch.dtype, int, int], list[torch.Tensor]] = {}  # _next's views of a length
        self.regions = Regions()  # tensors every rank maps, reduced where they lie (allreduce_regions_)
        self._flags[self.rank][0] = self._arrivals = self._pieces = 0
        host.Barrier()  # every flag is zero before anyone waits on one

    def allreduce_(self, flat: torch.Tensor, op: str) -> None:
        """Reduce `flat` over the ranks in place: piece by piece, rank r combines part r of every rank's piece.

        One wait per piece: after the wait for piece i, every rank's inputs of piece i and results of piece
        i-1 are in place; every rank has read piece i's buffers before it waits for piece i+2.
        """
        if (regions := self.regions.of(flat)) is not None:
            return self.allreduce_regions_(regions, op)
        if self.size == 2 or flat.numel() * flat.itemsize <= SMALL_BYTES:
            return self._allreduce_whole_(flat, op)
        cap = self._piece // flat.itemsize
        previous = None
        for start in range(0, flat.numel(), cap):
            piece = flat[start : start + cap]
            slots, parts = self._next(flat.dtype), chunks(piece.numel(), self.size)
            lo, hi = parts[self.rank]
            slots[self.rank][:lo].copy_(piece[:lo])  # the parts the others combine; part r never leaves
            slots[self.rank][hi : piece.numel()].copy_(piece[hi:])
            self._arrive("shm allreduce")
            if previous is not None:
                self._gather_results(*previous)
            if hi > lo:
                mine = piece[lo:hi]
                for k in self._peers:
                    combine_(mine, slots[k][lo:hi], op)
                slots[self.rank][lo:hi].copy_(mine)
            previous = piece, slots, parts
        if previous is not None:
            self._arrive("shm allreduce (results)")
            self._gather_results(*previous)

    def allreduce_regions_(self, regions: list[torch.Tensor], op: str) -> None:
        """Reduce, in place, tensors that live in memory every rank maps (regions.py): rank r sums chunk r of every
        rank's region, piece by piece, and writes the sum into each. No staging: each byte is read once and written
        once, by one rank, which also makes the result the same bits everywhere."""
        mine = regions[self.rank]
        self._arrive("shm allreduce")  # every rank's inputs are in its region
        lo, hi = chunks(mine.numel(), self.size)[self.rank]
        cap = self._piece // mine.itemsize
        for start in range(lo, hi, cap):
            piece = slice(start, min(start + cap, hi))
            total = mine[piece]
            for k in self._peers:
                combine_(total, regions[k][piece], op)
            for k in self._peers:
                regions[k][piece].copy_(total)
        self._arrive("shm allreduce (results)")  # every rank's sums are in every region

    def _allreduce_whole_(self, flat: torch.Tensor, op: str) -> None:
        """Each rank publishes its pieces whole and combines every slot: at 2 ranks as little copying as
        splitting the work, and for small tensors, half the waits."""
        r, n, cap = self.rank, flat.numel(), self._piece // flat.itemsize
        for start in range(0, n, cap):
            piece = flat if n <= cap else flat[start : start + cap]  # a slice costs ~0.5 us: none for one piece
            m = piece.numel()
            slots = self._next(flat.dtype, m)
            slots[r].copy_(piece)
            self._arrive("shm allreduce")
            if self.size == 2:  # a + b == b + a exactly, so both ranks end with the same bits
                combine_(piece, slots[1 - r], op)
                continue
            if r:  # rank order on every rank: the same bits everywhere
                piece.copy_(slots[0])
            for k in range(1, self.size):
                combine_(piece, slots[k], op)

    def _gather_results(self, piece: torch.Tensor, slots: list[torch.Tensor], parts: list[tuple[int, int]]) -> None:
        """Copy every other rank's combined part of `piece` out of its slot."""
        for k in self._peers:
            lo, hi = parts[k]
            if hi > lo:
                piece[lo:hi].copy_(slots[k][lo:hi])

    def reduce_scatter_(self, flat: torch.Tensor, op: str) -> torch.Tensor:
        """Chunk `rank` of `flat` (numel divisible by size) reduced over the ranks, in place; returns its view."""
        n, r = self.size, self.rank
        rows = flat.view(n, flat.numel() // n)  # chunk k is row k
        width = max(1, self._piece // flat.itemsize // n)
        for start in range(0, rows.shape[1], width):
            block = rows[:, start : start + width]
            w = block.shape[1]
            slots = self._next(flat.dtype)
            staged = slots[r][: n * w].view(n, w)
            staged[:r].copy_(block[:r])  # the rows the others combine; row r never leaves this rank
            staged[r + 1 :].copy_(block[r + 1 :])
            self._arrive("shm reduce-scatter")
            mine = block[r]  # still this rank's own contribution: add the others'
            for k in self._peers:
                combine_(mine, slots[k][r * w : (r + 1) * w], op)
        return rows[r]

    def allgather_(self, flat: torch.Tensor) -> None:
        """Fill every chunk of `flat` (numel divisible by size) from the rank whose chunk it is."""
        n, r = self.size, self.rank
        rows = flat.view(n, flat.numel() // n)
        width = self._piece // flat.itemsize
        for start in range(0, rows.shape[1], width):
            block = rows[:, start : start + width]
            w = block.shape[1]
            slots = self._next(flat.dtype)
            slots[r][:w].copy_(block[r])
            self._arrive("shm allgather")
            for k in self._peers:
                block[k].copy_(slots[k][:w])

    def close(self) -> None:
        """Unmap the window; views of it must not outlive this."""
        self._typed.clear()
        self._short.clear()
        self._buffers.clear()
        for flag in self._flags:
            flag.release()
        self._win.Unlock_all()
        self._win.Free()

    def _next(self, dtype: torch.dtype, numel: int | None = None) -> list[torch.Tensor]:
        """Every rank's buffer for the next piece, as `dtype` elements (the first `numel` of them: views kept for
        up to SHORT lengths, since slicing costs more than a small piece's copy); pieces take the buffers in turn."""
        self._pieces += 1
        index = self._pieces % BUFFERS
        if numel is not None and (views := self._short.get((dtype, numel, index))) is not None:
            return views
        typed = self._typed.get(dtype)
        if typed is None:
            rows = [b.view(BUFFERS, -1) for b in self._buffers]
            typed = self._typed[dtype] = [[row[i].view(dtype) for row in rows] for i in range(BUFFERS)]
        views = typed[index]
        if numel is not None:
            views = [v[:numel] for v in views]
            if len(self._short) < SHORT:
                self._short[dtype, numel, index] = views
        return views

    def _arrive(self, what: str) -> None:
        """Publish that this rank's writes so far are done, and wait until every rank has said the same."""
        self._arrivals += 1
        step, flags, peers = self._arrivals, self._flags, self._peer_flags
        self._win.Sync()  # our data before our flag
        flags[self.rank][0] = step

        def arrived() -> bool:
            for flag in peers:
                if flag[0] < step:
                    return False
            return True

        self._until(arrived, what, lambda: [k for k, flag in enumerate(flags) if flag[0] < step])
        self._win.Sync()  # their data after their flags
