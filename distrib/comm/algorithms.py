"""The collective algorithms, and ONE table that chooses them by name.

naive (here), ring (ring.py) and halving-doubling (halving.py) are written once over any transport's
point-to-point calls; hierarchical (hierarchy.py) composes them over sub-communicators of hosts; native is the
transport library's own collectives; shm the shared-memory ones of ranks on one host. Every entry works in place
on a flat contiguous tensor and takes op "sum", "max" or "min" (averaging is the caller's division). The Python
algorithms work on `comm._array(flat)` (see arrays.py). "auto" is not an entry: each call resolves it to one
(auto.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from distrib.comm import hierarchy
from distrib.comm.arrays import chunks, combine_, empty
from distrib.comm.contract import Array, split
from distrib.comm.halving import doubling_allgather_, halving_doubling_allreduce_, halving_reduce_scatter_
from distrib.comm.ring import ring_allgather_, ring_allreduce_, ring_reduce_scatter_
from distrib.comm.transport import Transport


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
    "halving_doubling": _python(halving_doubling_allreduce_, halving_reduce_scatter_, doubling_allgather_),
    "hierarchical": Algorithm(hierarchy.allreduce_, hierarchy.reduce_scatter_, hierarchy.allgather_),
}
ALGORITHMS = (*TABLE, "auto")  # what a call may name
