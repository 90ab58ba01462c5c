"""Allreduce algorithms written once over the point-to-point calls of any Communicator.

All functions work in place on a flat contiguous tensor and take op "sum", "max" or "min" (averaging is the
caller's division). Chunk c of a flat tensor of n elements over `size` ranks is `chunks(n, size)[c]`: the first
n % size chunks hold one element more, so any n works, including n < size.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from distrib.comm.base import Communicator

SEGMENT_BYTES = 1 << 20  # ring pipelining: sum segment k while segment k+1 arrives; ~L2-sized so sums hit cache


def chunks(n: int, parts: int) -> list[tuple[int, int]]:
    """(start, stop) of each of `parts` nearly equal contiguous chunks of range(n)."""
    base, extra = divmod(n, parts)
    bounds, start = [], 0
    for c in range(parts):
        stop = start + base + (c < extra)
        bounds.append((start, stop))
        start = stop
    return bounds


def combine_(dst: torch.Tensor, src: torch.Tensor, op: str) -> None:
    """dst = dst (op) src, in place."""
    if op == "sum":
        dst.add_(src)
    elif op == "max":
        torch.maximum(dst, src, out=dst)
    else:
        torch.minimum(dst, src, out=dst)


def naive_allreduce_(comm: Communicator, flat: torch.Tensor, op: str) -> None:
    """The textbook allreduce: everyone sends to rank 0, which combines in rank order and sends the result back."""
    peers = range(1, comm.size)
    if comm.rank == 0:
        incoming = torch.empty_like(flat)
        for src in peers:
            comm.wait_all(comm.post(recvs=[(incoming, src)]), "naive allreduce (gather)")
            combine_(flat, incoming, op)
        comm.wait_all(comm.post(sends=[(flat, dst) for dst in peers]), "naive allreduce (scatter)")
    else:
        comm.wait_all(comm.post(sends=[(flat, 0)]), "naive allreduce (gather)")
        comm.wait_all(comm.post(recvs=[(flat, 0)]), "naive allreduce (scatter)")


def naive_allgather_(comm: Communicator, flat: torch.Tensor, what: str = "naive allgather") -> None:
    """Allgather through rank 0: each rank's chunk goes to rank 0, which sends the whole back to everyone."""
    bounds = chunks(flat.numel(), comm.size)
    peers = range(1, comm.size)
    if comm.rank == 0:
        recvs = [(flat[slice(*bounds[src])], src) for src in peers if bounds[src][1] > bounds[src][0]]
        comm.wait_all(comm.post(recvs=recvs), f"{what} (gather)")
        comm.wait_all(comm.post(sends=[(flat, dst) for dst in peers]), f"{what} (scatter)")
    else:
        mine = flat[slice(*bounds[comm.rank])]
        comm.wait_all(comm.post(sends=[(mine, 0)] if mine.numel() else []), f"{what} (gather)")
        comm.wait_all(comm.post(recvs=[(flat, 0)]), f"{what} (scatter)")


def views(flat: torch.Tensor, parts: int) -> list[torch.Tensor]:
    """The `chunks` of a flat tensor as views, made once per collective (each slice costs a microsecond)."""
    return [flat[start:stop] for start, stop in chunks(flat.numel(), parts)]


def segments(t: torch.Tensor, seg: int) -> list[torch.Tensor]:
    """`t` cut into pieces of at most `seg` elements: none when empty, `t` itself when it fits in one."""
    n = t.numel()
    return [t] if 0 < n <= seg else [t[i : i + seg] for i in range(0, n, seg)]


def ring_reduce_scatter_(comm: Communicator, flat: torch.Tensor, op: str, parts: list | None = None) -> torch.Tensor:
    """Ring reduce-scatter: after size-1 steps chunk `rank` of `flat` holds the reduction over all ranks.

    At step s rank r sends chunk (r-s-1) to its right neighbour and combines chunk (r-s-2) from its left one
    into place, segment by segment, so combining a segment overlaps the arrival of the next. Returns the view
    of chunk `rank`; the other chunks are left partially reduced. `parts`: `views(flat, size)` if made already.
    """
    n, r = comm.size, comm.rank
    parts = parts or views(flat, n)
    right, left = (r + 1) % n, (r - 1) % n
    seg = max(1, SEGMENT_BYTES // flat.element_size())
    width = min(seg, parts[0].numel())  # chunk 0 is the longest
    scratch = torch.empty(2 * width, dtype=flat.dtype, device=flat.device)  # one segment summed, one arriving
    for s in range(n - 1):
        what = f"ring reduce-scatter step {s + 1}/{n - 1}"
        outgoing = segments(parts[(r - s - 1) % n], seg)
        incoming = segments(parts[(r - s - 2) % n], seg)
        landing = [scratch[(k % 2) * width : (k % 2) * width + part.numel()] for k, part in enumerate(incoming[:2])]
        sends = comm.post(sends=[(part, right) for part in outgoing])
        inflight = [comm.post(recvs=[(buffer, left)]) for buffer in landing]
        for k, part in enumerate(incoming):
            comm.wait_all(inflight[k], what)
            combine_(part, landing[k % 2], op)
            if k + 2 < len(incoming):  # the buffer just summed takes the segment after next
                nxt = incoming[k + 2]
                landing[k % 2] = scratch[(k % 2) * width : (k % 2) * width + nxt.numel()]
                inflight.append(comm.post(recvs=[(landing[k % 2], left)]))
        comm.wait_all(sends, what)
    return parts[r]


def ring_allgather_(comm: Communicator, flat: torch.Tensor, parts: list | None = None) -> None:
    """Ring allgather: chunk `rank` of `flat` is this rank's; after size-1 steps every chunk is everyone's.

    At step s rank r forwards chunk (r-s) to the right and receives chunk (r-s-1) from the left straight into
    place: no staging buffer, no copies. `parts`: `views(flat, size)` if made already.
    """
    n, r = comm.size, comm.rank
    parts = parts or views(flat, n)
    right, left = (r + 1) % n, (r - 1) % n
    for s in range(n - 1):
        send, recv = parts[(r - s) % n], parts[(r - s - 1) % n]
        sends = [(send, right)] if send.numel() else []
        recvs = [(recv, left)] if recv.numel() else []
        comm.wait_all(comm.post(sends=sends, recvs=recvs), f"ring allgather step {s + 1}/{n - 1}")


def ring_allreduce_(comm: Communicator, flat: torch.Tensor, op: str) -> None:
    """Bandwidth-optimal allreduce: ring reduce-scatter then ring allgather, 2(n-1) steps of 1/n each."""
    parts = views(flat, comm.size)
    ring_reduce_scatter_(comm, flat, op, parts)
    ring_allgather_(comm, flat, parts)
