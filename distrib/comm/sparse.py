"""The allreduce of a sparse COO tensor (an nn.Embedding's gradient with sparse=True), as torch's gloo does it.

Each rank's tensor is coalesced; the ranks gather each other's number of entries and shape, then the entries'
indices and values, padded to the longest rank's count; every rank adds them up in rank order, so all hold the
same coalesced sum, written into the tensor in place. Three allgathers, each a checked and recorded collective.
"""

from __future__ import annotations

from typing import Any

import torch


def allreduce(comm: Any, t: torch.Tensor, op: str, async_op: bool) -> Any:
    """Sum (op "sum") or average ("avg") the sparse tensor `t` over the ranks of `comm`, in place; returns `t` (or
    a handle whose wait() returns it)."""
    if op not in ("sum", "avg"):
        raise ValueError(f"the allreduce of a sparse tensor takes op 'sum' or 'avg', got {op!r}; call .to_dense()")
    if op == "avg" and not t.is_floating_point():
        raise ValueError(f"op='avg' needs a floating-point tensor, got {t.dtype}; use op='sum' and divide")
    return comm._compose(lambda: _reduce(comm, t, op), async_op)


def _reduce(comm: Any, t: torch.Tensor, op: str) -> torch.Tensor:
    mine = t.coalesce()
    indices, values = mine.indices(), mine.values()
    meta = torch.tensor([mine._nnz(), mine.sparse_dim(), *mine.shape], dtype=torch.int64)
    everyone = comm.allgather(meta, algorithm="native").view(comm.size, -1)
    shapes = {tuple(row[1:].tolist()) for row in everyone}
    if len(shapes) > 1:
        seen = ", ".join(f"rank {r}: {tuple(row[2:].tolist())}" for r, row in enumerate(everyone))
        raise ValueError(f"sparse allreduce: every rank's tensor needs the same shape and sparse dims, got {seen}")
    counts = everyone[:, 0].tolist()
    longest = max(counts)
    padded_indices = indices.new_zeros((longest, indices.shape[0]))
    padded_indices[: counts[comm.rank]] = indices.t()
    padded_values = values.new_zeros((longest, *values.shape[1:]))
    padded_values[: counts[comm.rank]] = values
    all_indices = comm.allgather(padded_indices, algorithm="native").view(comm.size, longest, indices.shape[0])
    all_values = comm.allgather(padded_values, algorithm="native").view(comm.size, longest, *values.shape[1:])
    total = torch.sparse_coo_tensor(
        torch.cat([all_indices[r, :n] for r, n in enumerate(counts)]).t(),
        torch.cat([all_values[r, :n] for r, n in enumerate(counts)]),
        t.shape,
        dtype=t.dtype,
        check_invariants=False,  # built from coalesced parts of the same shape
    ).coalesce()
    if op == "avg":
        total = total / comm.size
    return t.copy_(total)
