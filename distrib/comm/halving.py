"""Recursive halving-doubling (Rabenseifner): reduce-scatter by recursive halving, allgather by recursive doubling.

Over p = 2^k ranks, step s of the reduce-scatter pairs each rank with the one whose rank differs in bit k-1-s: the
two split the range they share, each sends the half it gives up and combines the half it keeps. After k steps
participant j holds range j reduced; the allgather walks the same pairs backwards, each step doubling what a rank
holds. 2 log2(p) messages on the critical path (a ring needs 2(p-1)), the same 2(p-1)/p of the tensor per rank;
each exchange is cut in the ring's segments, so combining one overlaps the arrival of the next.

Any other world size n is folded in first, as MPICH does: with p the largest power of two below n and rem = n - p,
ranks 2i and 2i+1 (i < rem) pair up, the even one handing its tensor to the odd one, which takes part for both;
the other ranks take part alone. Participant j thus stands for a contiguous run of ranks, so a reduce-scatter or
allgather over `chunks(n, size)` ends with rank r's chunk where it belongs. Every element is reduced by one rank
only and copied to the others, so every rank ends with the same bits.
"""

from __future__ import annotations

from distrib.comm.arrays import chunks, combine_, empty
from distrib.comm.contract import Array
from distrib.comm.ring import scratch_for, send_and_combine
from distrib.comm.transport import Transport


class _Fold:
    """Who takes part: p participants, participant j played by rank players[j]; `me` is this rank's index or -1."""

    def __init__(self, rank: int, size: int) -> None:
        self.p = 1 << (size.bit_length() - 1)
        self.rem = size - self.p
        self.players = [2 * j + 1 if j < self.rem else j + self.rem for j in range(self.p)]
        self.me = self.players.index(rank) if rank in self.players else -1
        self.partner = rank + 1 if rank < 2 * self.rem and rank % 2 == 0 else rank - 1  # in a folded pair
        self.folded = rank < 2 * self.rem

    def rank_edges(self, n: int, size: int) -> list[int]:
        """Participant j's range is the chunks of the ranks it stands for: [edges[j], edges[j + 1])."""
        bounds = chunks(n, size)
        return [bounds[2 * j if j < self.rem else j + self.rem][0] for j in range(self.p)] + [n]

    def even_edges(self, n: int) -> list[int]:
        """Equal ranges per participant: what an allreduce uses, as no chunk has to end up anywhere."""
        return [start for start, _ in chunks(n, self.p)] + [n]


def _exchange(comm: Transport, send: Array, recv: Array, peer: int, what: str) -> None:
    """Send and receive at once; an empty side sends nothing (both ranks know the lengths)."""
    sends = [(send, peer)] if len(send) else []
    recvs = [(recv, peer)] if len(recv) else []
    comm.wait_all(comm.post(sends=sends, recvs=recvs), what)


def _halve(comm: Transport, flat: Array, op: str, fold: _Fold, edges: list[int], what: str) -> None:
    """Recursive halving: afterwards participant j's range flat[edges[j]:edges[j + 1]] is reduced over all ranks."""
    j, lo, hi, d = fold.me, 0, fold.p, fold.p // 2
    steps, scratch = fold.p.bit_length() - 1, None
    while d:
        mid = lo + d
        (klo, khi), (slo, shi) = ((lo, mid), (mid, hi)) if j < mid else ((mid, hi), (lo, mid))
        keep, give = flat[edges[klo] : edges[khi]], flat[edges[slo] : edges[shi]]
        if scratch is None:  # the first step's ranges hold every later one's
            scratch = scratch_for(flat, max(len(keep), len(give)))
        peer, step = fold.players[j ^ d], steps - d.bit_length() + 1
        send_and_combine(comm, give, keep, peer, peer, op, scratch, f"{what} step {step}/{steps}")
        lo, hi, d = klo, khi, d // 2


def _double(comm: Transport, flat: Array, fold: _Fold, edges: list[int], what: str) -> None:
    """Recursive doubling: participant j holds its range; afterwards it holds every participant's."""
    j, d, step, steps = fold.me, 1, 0, fold.p.bit_length() - 1
    while d < fold.p:
        step += 1
        lo = j & ~(d - 1)  # the block of d participants this rank holds so far
        other = lo ^ d
        send, recv = flat[edges[lo] : edges[lo + d]], flat[edges[other] : edges[other + d]]
        _exchange(comm, send, recv, fold.players[j ^ d], f"{what} step {step}/{steps}")
        d *= 2


def _fold_in(comm: Transport, flat: Array, op: str, fold: _Fold, what: str) -> None:
    """A folded pair's even rank hands its whole tensor to the odd one, which combines it into its own."""
    if not len(flat):
        return
    if fold.me < 0:
        comm.wait_all(comm.post(sends=[(flat, fold.partner)]), f"{what} (fold in)")
    elif fold.folded:
        incoming = empty(flat, len(flat))
        comm.wait_all(comm.post(recvs=[(incoming, fold.partner)]), f"{what} (fold in)")
        combine_(flat, incoming, op)


def halving_doubling_allreduce_(comm: Transport, flat: Array, op: str) -> None:
    """Fold to a power of two, reduce-scatter by halving, allgather by doubling, hand the result to the folded."""
    what, fold = "halving-doubling allreduce", _Fold(comm.rank, comm.size)
    _fold_in(comm, flat, op, fold, what)
    if fold.me >= 0:
        edges = fold.even_edges(len(flat))
        _halve(comm, flat, op, fold, edges, what)
        _double(comm, flat, fold, edges, what)
    if fold.folded and len(flat):  # the odd rank of a pair sends the result back
        pair = [(flat, fold.partner)]
        comm.wait_all(comm.post(recvs=pair) if fold.me < 0 else comm.post(sends=pair), f"{what} (fold out)")


def halving_reduce_scatter_(comm: Transport, flat: Array, op: str) -> None:
    """Recursive halving over rank-ordered ranges; a folded pair's odd rank then hands the even one its chunk."""
    what, fold = "halving-doubling reduce-scatter", _Fold(comm.rank, comm.size)
    _fold_in(comm, flat, op, fold, what)
    if fold.me >= 0:
        _halve(comm, flat, op, fold, fold.rank_edges(len(flat), comm.size), what)
    if fold.folded:
        _swap_chunk(comm, flat, fold, fold.me < 0, f"{what} (fold out)")


def _swap_chunk(comm: Transport, flat: Array, fold: _Fold, receive: bool, what: str) -> None:
    """The even rank of a folded pair's chunk, from one of the pair to the other (`receive`: to this rank)."""
    start, stop = chunks(len(flat), comm.size)[min(comm.rank, fold.partner)]
    if stop > start:
        pair = [(flat[start:stop], fold.partner)]
        comm.wait_all(comm.post(recvs=pair) if receive else comm.post(sends=pair), what)


def doubling_allgather_(comm: Transport, flat: Array) -> None:
    """A folded pair's even rank hands its chunk to the odd one; recursive doubling; the odd one hands back all."""
    what, fold = "halving-doubling allgather", _Fold(comm.rank, comm.size)
    if fold.folded:
        _swap_chunk(comm, flat, fold, fold.me >= 0, f"{what} (fold in)")
    if fold.me >= 0:
        _double(comm, flat, fold, fold.rank_edges(len(flat), comm.size), what)
    if fold.folded and len(flat):
        pair = [(flat, fold.partner)]
        comm.wait_all(comm.post(recvs=pair) if fold.me < 0 else comm.post(sends=pair), f"{what} (fold out)")
