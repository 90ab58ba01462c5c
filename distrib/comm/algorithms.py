"""Allreduce algorithms written once over the point-to-point calls of any Communicator.

All functions work in place on a flat contiguous array and take op "sum", "max" or "min" (averaging is the
caller's division). The array is a torch tensor, or a numpy view of a CPU tensor where the backend takes numpy
(MPI): slicing and summing a numpy array costs a fraction of a microsecond, a tensor's a microsecond or more,
and small collectives are made of little else. Chunk c of a flat array of n elements over `size` ranks is
`chunks(n, size)[c]`: the first n % size chunks hold one element more, so any n works, including n < size.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from distrib.comm.base import Communicator

Array = torch.Tensor | np.ndarray  # what the algorithms work on

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


def combine_(dst: Array, src: Array, op: str) -> None:
    """dst = dst (op) src, in place."""
    if isinstance(dst, np.ndarray):
        with np.errstate(all="ignore"):  # overflow to inf is silent, as in torch
            {"sum": np.add, "max": np.maximum, "min": np.minimum}[op](dst, src, out=dst)
    elif op == "sum":
        dst.add_(src)
    elif op == "max":
        torch.maximum(dst, src, out=dst)
    else:
        torch.minimum(dst, src, out=dst)


def empty(like: Array, n: int) -> Array:
    """An uninitialised 1-D array of n elements, of `like`'s kind, dtype and device."""
    if isinstance(like, np.ndarray):
        return np.empty(n, like.dtype)
    return like.new_empty(n)


def naive_allreduce_(comm: Communicator, flat: Array, op: str) -> None:
    """The textbook allreduce: everyone sends to rank 0, which combines in rank order and sends the result back."""
    peers = range(1, comm.size)
    if comm.rank == 0:
        incoming = empty(flat, len(flat))
        for src in peers:
            comm.wait_all(comm.post(recvs=[(incoming, src)]), "naive allreduce (gather)")
            combine_(flat, incoming, op)
        comm.wait_all(comm.post(sends=[(flat, dst) for dst in peers]), "naive allreduce (scatter)")
    else:
        comm.wait_all(comm.post(sends=[(flat, 0)]), "naive allreduce (gather)")
        comm.wait_all(comm.post(recvs=[(flat, 0)]), "naive allreduce (scatter)")


def naive_allgather_(comm: Communicator, flat: Array, what: str = "naive allgather") -> None:
    """Allgather through rank 0: each rank's chunk goes to rank 0, which sends the whole back to everyone."""
    bounds = chunks(len(flat), comm.size)
    peers = range(1, comm.size)
    if comm.rank == 0:
        recvs = [(flat[slice(*bounds[src])], src) for src in peers if bounds[src][1] > bounds[src][0]]
        comm.wait_all(comm.post(recvs=recvs), f"{what} (gather)")
        comm.wait_all(comm.post(sends=[(flat, dst) for dst in peers]), f"{what} (scatter)")
    else:
        mine = flat[slice(*bounds[comm.rank])]
        comm.wait_all(comm.post(sends=[(mine, 0)] if len(mine) else []), f"{what} (gather)")
        comm.wait_all(comm.post(recvs=[(flat, 0)]), f"{what} (scatter)")


def views(flat: Array, parts: int) -> list[Array]:
    """The `chunks` of a flat array as views, made once per collective."""
    return [flat[start:stop] for start, stop in chunks(len(flat), parts)]


def segments(t: Array, seg: int) -> list[Array]:
    """`t` cut into pieces of at most `seg` elements: none when empty, `t` itself when it fits in one."""
    n = len(t)
    return [t] if 0 < n <= seg else [t[i : i + seg] for i in range(0, n, seg)]


def ring_reduce_scatter_(comm: Communicator, flat: Array, op: str, parts: list | None = None) -> Array:
    """Ring reduce-scatter: after size-1 steps chunk `rank` of `flat` holds the reduction over all ranks.

    At step s rank r sends chunk (r-s-1) to its right neighbour and combines chunk (r-s-2) from its left one
    into place, segment by segment, so combining a segment overlaps the arrival of the next. Returns the view
    of chunk `rank`; the other chunks are left partially reduced. `parts`: `views(flat, size)` if made already.
    """
    n, r = comm.size, comm.rank
    parts = parts or views(flat, n)
    right, left = (r + 1) % n, (r - 1) % n
    seg = max(1, SEGMENT_BYTES // flat.itemsize)
    width = min(seg, len(parts[0]))  # chunk 0 is the longest
    scratch = empty(flat, 2 * width)  # one segment summed, one arriving
    for s in range(n - 1):
        what = f"ring reduce-scatter step {s + 1}/{n - 1}"
        outgoing = segments(parts[(r - s - 1) % n], seg)
        incoming = segments(parts[(r - s - 2) % n], seg)
        if len(outgoing) <= 1 and len(incoming) <= 1:  # a chunk in one segment: one exchange, nothing to overlap
            landing = [scratch[: len(part)] for part in incoming]
            comm.wait_all(comm.post([(p, right) for p in outgoing], [(b, left) for b in landing]), what)
            for part, buffer in zip(incoming, landing):
                combine_(part, buffer, op)
            continue
        landing = [scratch[(k % 2) * width : (k % 2) * width + len(part)] for k, part in enumerate(incoming[:2])]
        sends = comm.post(sends=[(part, right) for part in outgoing])
        inflight = [comm.post(recvs=[(buffer, left)]) for buffer in landing]
        for k, part in enumerate(incoming):
            comm.wait_all(inflight[k], what)
            combine_(part, landing[k % 2], op)
            if k + 2 < len(incoming):  # the buffer just summed takes the segment after next
                nxt = incoming[k + 2]
                landing[k % 2] = scratch[(k % 2) * width : (k % 2) * width + len(nxt)]
                inflight.append(comm.post(recvs=[(landing[k % 2], left)]))
        comm.wait_all(sends, what)
    return parts[r]


def ring_allgather_(comm: Communicator, flat: Array, parts: list | None = None) -> None:
    """Ring allgather: chunk `rank` of `flat` is this rank's; after size-1 steps every chunk is everyone's.

    At step s rank r forwards chunk (r-s) to the right and receives chunk (r-s-1) from the left straight into
    place: no staging buffer, no copies. `parts`: `views(flat, size)` if made already.
    """
    n, r = comm.size, comm.rank
    parts = parts or views(flat, n)
    right, left = (r + 1) % n, (r - 1) % n
    for s in range(n - 1):
        send, recv = parts[(r - s) % n], parts[(r - s - 1) % n]
        sends = [(send, right)] if len(send) else []
        recvs = [(recv, left)] if len(recv) else []
        comm.wait_all(comm.post(sends=sends, recvs=recvs), f"ring allgather step {s + 1}/{n - 1}")


def ring_allreduce_(comm: Communicator, flat: Array, op: str) -> None:
    """Bandwidth-optimal allreduce: ring reduce-scatter then ring allgather, 2(n-1) steps of 1/n each."""
    parts = views(flat, comm.size)
    ring_reduce_scatter_(comm, flat, op, parts)
    ring_allgather_(comm, flat, parts)
