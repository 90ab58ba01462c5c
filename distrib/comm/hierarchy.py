"""Hierarchical collectives for several hosts of several ranks: inside each host first, then across hosts.

An allreduce reduce-scatters inside the host (shared memory where the transport is MPI, else a ring), so local
rank l holds its host's sum of chunk l; the ranks with the same local index then allreduce that chunk across hosts
by halving-doubling, L of them at once, so every host's link is busy with 1/L of the tensor per rank; an allgather
inside the host brings the whole back. Across hosts each rank sends 2(H-1)/H of its chunk, a host 2(H-1)/H of the
tensor, in 2 log2(H) messages instead of a flat ring's 2(n-1).

A reduce-scatter or allgather must end with rank r's chunk at place r. The ranks are taken in local-major order
(local index, then host), in which local rank l's chunk of the host stage holds exactly the chunks of the ranks
with local index l; when the placement is not already in that order, the tensor is permuted into it (one copy).
Hosts must hold the same number of ranks; otherwise every rank raises the same one-line error.
"""

from __future__ import annotations

import torch

from distrib.comm.arrays import chunks
from distrib.comm.halving import doubling_allgather_, halving_doubling_allreduce_, halving_reduce_scatter_
from distrib.comm.ring import ring_allgather_, ring_reduce_scatter_
from distrib.comm.transport import Transport


def _splits(comm) -> tuple[Transport, Transport, list[int]]:
    """This rank's host and its cross-host peers (same local index) as communicators, made once per topology, and
    every rank in local-major order."""
    topo = comm._hosts()
    if not topo.even:
        raise ValueError(
            f"algorithm 'hierarchical' needs as many ranks on every host, but this job has {topo.describe()}; "
            "use 'ring' or 'halving_doubling'"
        )
    found = comm._groups.get(topo)
    if found is None:
        host_index = topo.host_of(comm.rank)
        host = comm.split(host_index, comm.rank)  # every rank makes both, in this order
        cross = comm.split(topo.local_index(comm.rank), host_index)
        found = comm._groups[topo] = (host, cross)
    order = [ranks[local] for local in range(topo.per_host) for ranks in topo.hosts]
    return *found, order


def _shared(host: Transport, flat: torch.Tensor) -> bool:
    """Whether the host stage can go through shared memory: an MPI host whose chunks are equal."""
    return host.backend == "mpi" and not host._shm_unavailable() and len(flat) % host.size == 0


def _reduce_scatter_in_host(host: Transport, flat: torch.Tensor, op: str) -> None:
    if _shared(host, flat):
        host._shm().reduce_scatter_(flat, op)
    else:
        ring_reduce_scatter_(host, host._array(flat), op)


def _allgather_in_host(host: Transport, flat: torch.Tensor) -> None:
    if _shared(host, flat):
        host._shm().allgather_(flat)
    else:
        ring_allgather_(host, host._array(flat))


def _chunk(flat: torch.Tensor, index: int, parts: int) -> torch.Tensor:
    return flat[slice(*chunks(len(flat), parts)[index])]


def allreduce_(comm: Transport, flat: torch.Tensor, op: str) -> None:
    host, cross, _ = _splits(comm)
    if host.size > 1:
        _reduce_scatter_in_host(host, flat, op)
    shard = _chunk(flat, host.rank, host.size)
    if cross.size > 1 and len(shard):
        halving_doubling_allreduce_(cross, cross._array(shard), op)
    if host.size > 1:
        _allgather_in_host(host, flat)


def reduce_scatter_(comm: Transport, flat: torch.Tensor, op: str) -> torch.Tensor:
    host, cross, order = _splits(comm)
    rows = flat.view(comm.size, -1)  # the caller's numel is a multiple of the world size
    work = flat if order == sorted(order) else rows.index_select(0, torch.tensor(order, device=flat.device)).view(-1)
    if host.size > 1:
        _reduce_scatter_in_host(host, work, op)
    part = _chunk(work, host.rank, host.size)  # the chunks of every rank with this local index
    if cross.size > 1:
        halving_reduce_scatter_(cross, cross._array(part), op)
    return _chunk(part, cross.rank, cross.size)


def allgather_(comm: Transport, flat: torch.Tensor) -> None:
    host, cross, order = _splits(comm)
    local_major = order == sorted(order)
    rows = flat.view(comm.size, -1)
    work = flat if local_major else torch.empty_like(flat)
    if not local_major:
        work.view(comm.size, -1)[order.index(comm.rank)].copy_(rows[comm.rank])
    if cross.size > 1:
        doubling_allgather_(cross, cross._array(_chunk(work, host.rank, host.size)))
    if host.size > 1:
        _allgather_in_host(host, work)
    if not local_major:
        rows.index_copy_(0, torch.tensor(order, device=flat.device), work.view(comm.size, -1))
