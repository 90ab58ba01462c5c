"""The collective algorithms, and ONE table that chooses them by name.

naive and ring are written once here over any transport's point-to-point calls; native is the transport library's
own collectives; shm the shared-memory ones of ranks on one host. Every entry works in place on a flat contiguous
tensor and takes op "sum", "max" or "min" (averaging is the caller's division). The Python algorithms work on
`comm._array(flat)`: a numpy view of a CPU tensor where the transport takes numpy (MPI), since slicing and summing
a numpy array costs a fraction of a microsecond, a tensor's a microsecond or more, and small collectives are made
of little else. Chunk c of a flat array of n elements over `size` ranks is `chunks(n, size)[c]` (contract.split's
rule), so any n works, including n < size.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from distrib.comm.contract import Array, split
from distrib.comm.transport import Transport

SEGMENT_BYTES = 1 << 20  # ring pipelining: sum segment k while segment k+1 arrives; ~L2-sized so sums hit cache


def chunks(n: int, parts: int) -> list[tuple[int, int]]:
    """(start, stop) of each of `parts` nearly equal contiguous chunks of range(n)."""
    return [split(n, c, parts) for c in range(parts)]


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


def _reduce_to_root(comm: Transport, flat: Array, op: str, what: str) -> None:
    """Every rank sends `flat` to rank 0, which combines them in rank order into its own."""
    if comm.rank == 0:
        incoming = empty(flat, len(flat))
        for src in range(1, comm.size):
            comm.wait_all(comm.post(recvs=[(incoming, src)]), f"{what} (gather)")
            combine_(flat, incoming, op)
    else:
        comm.wait_all(comm.post(sends=[(flat, 0)]), f"{what} (gather)")


def naive_allreduce_(comm: Transport, flat: Array, op: str) -> None:
    """The textbook allreduce: everyone sends to rank 0, which combines in rank order and sends the result back."""
    _reduce_to_root(comm, flat, op, "naive allreduce")
    if comm.rank == 0:
        comm.wait_all(comm.post(sends=[(flat, dst) for dst in range(1, comm.size)]), "naive allreduce (scatter)")
    else:
        comm.wait_all(comm.post(recvs=[(flat, 0)]), "naive allreduce (scatter)")


def naive_reduce_scatter_(comm: Transport, flat: Array, op: str) -> None:
    """Everyone sends to rank 0, which combines in rank order and sends each rank its own chunk only."""
    _reduce_to_root(comm, flat, op, "naive reduce-scatter")
    bounds = chunks(len(flat), comm.size)
    if comm.rank == 0:
        sends = [(flat[slice(*bounds[dst])], dst) for dst in range(1, comm.size) if bounds[dst][1] > bounds[dst][0]]
        comm.wait_all(comm.post(sends=sends), "naive reduce-scatter (scatter)")
    else:
        mine = flat[slice(*bounds[comm.rank])]
        comm.wait_all(comm.post(recvs=[(mine, 0)] if len(mine) else []), "naive reduce-scatter (scatter)")


def naive_allgather_(comm: Transport, flat: Array, what: str = "naive allgather") -> None:
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


def ring_reduce_scatter_(comm: Transport, flat: Array, op: str, parts: list | None = None) -> Array:
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


# The table: each algorithm's three collectives on a flat contiguous tensor of the transport's device.


@dataclass(frozen=True)
class Algorithm:
    """One algorithm's collectives: allreduce in place; reduce_scatter returns this rank's chunk reduced (a view of
    the input, or a new tensor), leaving the rest of the input unspecified; allgather fills every chunk from the
    rank that owns it, this rank's own being in place already."""

    allreduce: Callable[[Transport, torch.Tensor, str], None]
    reduce_scatter: Callable[[Transport, torch.Tensor, str], torch.Tensor]
    allgather: Callable[[Transport, torch.Tensor], None]


def _own(comm: Transport, flat: torch.Tensor) -> torch.Tensor:
    return flat[slice(*split(flat.numel(), comm.rank, comm.size))]


def _python(allreduce, reduce_scatter, allgather) -> Algorithm:
    """An Algorithm of functions over `comm._array(flat)`, the Python algorithms' view of the tensor."""

    def reduce_scatter_(comm: Transport, flat: torch.Tensor, op: str) -> torch.Tensor:
        reduce_scatter(comm, comm._array(flat), op)
        return _own(comm, flat)

    return Algorithm(
        allreduce=lambda comm, flat, op: allreduce(comm, comm._array(flat), op),
        reduce_scatter=reduce_scatter_,
        allgather=lambda comm, flat: allgather(comm, comm._array(flat)),
    )


def _native_reduce_scatter(comm: Transport, flat: torch.Tensor, op: str) -> torch.Tensor:
    shard = flat.new_empty(flat.numel() // comm.size)
    if shard.numel():
        comm._native_reduce_scatter(flat, shard, op)
    return shard


TABLE: dict[str, Algorithm] = {
    "naive": _python(naive_allreduce_, naive_reduce_scatter_, naive_allgather_),
    "ring": _python(ring_allreduce_, ring_reduce_scatter_, ring_allgather_),
    "native": Algorithm(
        allreduce=lambda comm, flat, op: comm._native_allreduce(flat, op),
        reduce_scatter=_native_reduce_scatter,
        allgather=lambda comm, flat: comm._native_allgather(_own(comm, flat), flat),
    ),
    "shm": Algorithm(
        allreduce=lambda comm, flat, op: comm._shm().allreduce_(flat, op),
        reduce_scatter=lambda comm, flat, op: comm._shm().reduce_scatter_(flat, op),
        allgather=lambda comm, flat: comm._shm().allgather_(flat),
    ),
}
ALGORITHMS = tuple(TABLE)
