"""The ring: reduce-scatter then allgather around the ranks in rank order, bandwidth-optimal at any world size.

2(n-1) steps, each sending 1/n of the tensor to the right neighbour while receiving 1/n from the left one, so
every link is busy at once and each rank sends 2(n-1)/n of the tensor in all; chunks are pipelined in segments
so that summing one overlaps the arrival of the next.
"""

from __future__ import annotations

from distrib.comm.arrays import combine_, empty, segments, views
from distrib.comm.contract import Array
from distrib.comm.transport import Transport

SEGMENT_BYTES = 1 << 20  # ring pipelining: sum segment k while segment k+1 arrives; ~L2-sized so sums hit cache


def send_and_combine(
    comm: Transport, outgoing: Array, incoming: Array, right: int, left: int, op: str, scratch: Array, what: str
) -> None:
    """Send `outgoing` to `right` while combining what `left` sends into `incoming`, segment by segment, so that
    combining one segment overlaps the arrival of the next. `scratch` holds two segments (or `incoming` whole)."""
    seg = max(1, SEGMENT_BYTES // outgoing.itemsize)
    sending, arriving = segments(outgoing, seg), segments(incoming, seg)
    width = len(scratch) // 2 if len(arriving) > 1 else len(scratch)
    if len(sending) <= 1 and len(arriving) <= 1:  # one segment each: one exchange, nothing to overlap
        landing = [scratch[: len(part)] for part in arriving]
        comm.wait_all(comm.post([(p, right) for p in sending], [(b, left) for b in landing]), what)
        for part, buffer in zip(arriving, landing):
            combine_(part, buffer, op)
        return
    landing = [scratch[(k % 2) * width : (k % 2) * width + len(part)] for k, part in enumerate(arriving[:2])]
    sends = comm.post(sends=[(part, right) for part in sending])
    inflight = [comm.post(recvs=[(buffer, left)]) for buffer in landing]
    for k, part in enumerate(arriving):
        comm.wait_all(inflight[k], what)
        combine_(part, landing[k % 2], op)
        if k + 2 < len(arriving):  # the buffer just combined takes the segment after next
            nxt = arriving[k + 2]
            landing[k % 2] = scratch[(k % 2) * width : (k % 2) * width + len(nxt)]
            inflight.append(comm.post(recvs=[(landing[k % 2], left)]))
    comm.wait_all(sends, what)


def scratch_for(flat: Array, longest: int) -> Array:
    """What send_and_combine needs for parts of at most `longest` elements: two segments, or one part."""
    seg = max(1, SEGMENT_BYTES // flat.itemsize)
    return empty(flat, 2 * seg if longest > seg else longest)


def ring_reduce_scatter_(comm: Transport, flat: Array, op: str, parts: list | None = None) -> Array:
    """Ring reduce-scatter: after size-1 steps chunk `rank` of `flat` holds the reduction over all ranks.

    At step s rank r sends chunk (r-s-1) to its right neighbour and combines chunk (r-s-2) from its left one
    into place. Returns the view of chunk `rank`; the other chunks are left partially reduced. `parts`:
    `views(flat, size)` if made already.
    """
    n, r = comm.size, comm.rank
    parts = parts or views(flat, n)
    right, left = (r + 1) % n, (r - 1) % n
    scratch = scratch_for(flat, len(parts[0]))  # chunk 0 is the longest
    for s in range(n - 1):
        outgoing, incoming = parts[(r - s - 1) % n], parts[(r - s - 2) % n]
        send_and_combine(
            comm, outgoing, incoming, right, left, op, scratch, f"ring reduce-scatter step {s + 1}/{n - 1}"
        )
    return parts[r]


def ring_allgather_(comm: Transport, flat: Array, parts: list | None = None) -> None:
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


def ring_allreduce_(comm: Transport, flat: Array, op: str) -> None:
    """Bandwidth-optimal allreduce: ring reduce-scatter then ring allgather, 2(n-1) steps of 1/n each."""
    parts = views(flat, comm.size)
    ring_reduce_scatter_(comm, flat, op, parts)
    ring_allgather_(comm, flat, parts)
