"""What a kind of collective call is, resolved once per communicator: its arguments checked, the algorithm it
names, and what the flight recorder, the check and an observer need of it.

A small call is mostly Python around the library (a 4 KiB MPI allreduce takes ~4 us), so a call looks its kind up
by (collective, dtype, shape, op, algorithm, label) and every check and string is made on its first call only;
an allreduce's kind also says whether its repeats restart a saved request (reduce_), so they skip the general path.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from distrib.comm import auto
from distrib.comm.algorithms import TABLE
from distrib.comm.contract import check_tensor
from distrib.comm.verify import EARLY, code

REDUCING = ("allreduce", "reduce_scatter")  # the collectives whose op is a reduction (broadcast's names its root)
MAX_KINDS = 4096  # kinds a communicator remembers (a program of ever new shapes starts over now and then)


@dataclass(eq=False, slots=True)  # eq=False: hashed by identity
class Kind:
    """One kind of call. `code` packs it into one int64 word (verify.code) for the tensor collectives that may
    start before every rank is in them, else 0. `named` is the flight recorder's (fingerprint, description id)
    for it, set by its board on the first call."""

    name: str
    op: str = ""
    algorithm: str = ""
    label: Mapping[str, Any] | None = None
    nbytes: int = 0  # the bytes it reduces or moves (allgather: every rank's part)
    code: int = 0
    info: dict[str, Any] = field(default_factory=dict)  # what an observer is told: op, algorithm, bytes, the label
    named: tuple[int, int] | None = None
    chosen: str = ""  # the algorithm it runs ("auto" resolved), once its first call has run (algorithm_of)
    sparse: bool = False  # a sparse COO tensor's allreduce (sparse.py)
    complex: bool = False  # a complex tensor, moved as pairs of floats (contract.real)
    restarts: bool = False  # an allreduce the transport has restarted a saved request for (reduce_)


def kind_of(
    comm: Any, name: str, t: Any = None, op: str = "", algorithm: str = "", label: Mapping[str, Any] | None = None,
    info: Mapping[str, Any] | None = None,
) -> Kind:  # fmt: skip
    """The Kind of a call of `name` on tensor `t` (None: an object collective or a barrier), with `info` for the
    observer; raises a clear error, before anything moves, for a tensor or op the collectives do not take and an
    algorithm `comm` cannot run."""
    if t is None:
        key: Any = name
    elif isinstance(t, torch.Tensor):
        key = (name, t.dtype, t.shape, t.layout, op, algorithm, tuple(label.items()) if label else None)
    else:
        raise TypeError(f"collectives take a torch.Tensor, got {type(t).__name__}")
    kind = comm._kinds.get(key)
    return kind if kind is not None else _made(comm, key, name, t, op, algorithm, label, info)


def _made(
    comm: Any, key: Any, name: str, t: Any, op: str, algorithm: str, label: Mapping[str, Any] | None,
    info: Mapping[str, Any] | None,
) -> Kind:  # fmt: skip
    """A kind's first call: its checks, and what every later call of it reads."""
    kinds = comm._kinds
    sparse = t is not None and t.is_sparse and name == "allreduce"  # its own checks, in sparse.allreduce
    if t is not None:
        if not sparse:
            check_tensor(t, op if name in REDUCING else "sum")
        if algorithm:
            comm.check_algorithm(algorithm)
    nbytes = 0 if t is None else t.numel() * t.element_size() * (comm.size if name == "allgather" else 1)
    early = code(name, t, op, algorithm) if name in EARLY and t.numel() > 0 and not sparse else 0
    told = {k: v for k, v in (("op", op), ("algorithm", algorithm)) if v} | dict(info or {})
    told |= {"bytes": nbytes} if t is not None else {}
    if len(kinds) >= MAX_KINDS:
        kinds.clear()
    told |= label or {}
    complex_ = t is not None and t.is_complex()
    kind = kinds[key] = Kind(name, op, algorithm, label, nbytes, early, told, sparse=sparse, complex=complex_)
    return kind


def algorithm_of(comm: Any, kind: Kind) -> str:
    """The algorithm a call of `kind` runs (auto.choose), found on its first call: inside the call, since "auto"
    may first find the hosts (a collective)."""
    if not kind.chosen:
        kind.chosen = auto.choose(comm, kind.algorithm, kind.nbytes)
    return kind.chosen


def reduce_(comm: Any, kind: Kind, flat: torch.Tensor, op: str) -> torch.Tensor:
    """The allreduce of `flat` (in place; op sum, max or min) by the algorithm `kind` chose, or by restarting the
    transport's saved request for `kind` where every rank's tensor lets it. Once one has restarted, a repeat of an
    in-place call on the CPU comes here straight from Communicator.allreduce (kind.restarts): at 4 KiB the general
    path's staging and dispatch were a fifth of the call."""
    if kind.chosen != "native" or not comm._restart(kind, flat, op):
        TABLE[kind.chosen].allreduce(comm, flat if flat.dim() == 1 else flat.view(-1), op)
    elif op == kind.op and not kind.complex:
        kind.restarts = True
    return flat
