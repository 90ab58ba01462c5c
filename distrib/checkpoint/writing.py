"""Writing a checkpoint in three parts, so that a thread can do the middle one while training goes on:
begin (every rank, collective: the directory agreed, the epoch's loss sums, the state copied), the files (each
rank its own, file I/O only), publish (every rank, collective: the problems shared, the manifest, the rename).
store.py has the layout; `save` runs the three parts at once.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from distrib.checkpoint import atomic, rng
from distrib.checkpoint.agree import attempt, fail_together, on_rank0, raise_first
from distrib.checkpoint.state import FORMAT, TrainingState
from distrib.checkpoint.store import POSITION, commit, fresh_dir, step_name
from distrib.comm import Communicator


@dataclass
class Pending:
    """A checkpoint begun: what each file holds, and once written, the files' records or the problem."""

    final: Path
    rank: int
    contents: dict[str, Any]  # file name -> the object it holds
    manifest: dict[str, Any]  # without "files" until published
    written: dict[str, atomic.Record] = field(default_factory=dict)
    problem: str | None = None

    @property
    def partial(self) -> Path:
        return self.final.with_name(self.final.name + ".partial")

    def write(self) -> None:
        """This rank's files, atomically; file I/O only (no collective), so a thread may run it."""

        def write_all() -> dict[str, atomic.Record]:
            return {name: atomic.write(self.partial / name, obj) for name, obj in self.contents.items()}

        written, problem = attempt(write_all)
        self.written, self.problem = written or {}, problem and prefix(self.final) + problem


def save(state: TrainingState, directory: Path, comm: Communicator, keep: int) -> Path:
    """Write a checkpoint of `state` into `directory` on every rank at once; keep the newest `keep`."""
    pending = begin(state, directory, comm, copy_state=False)
    pending.write()
    return publish(pending, comm, keep)


def begin(
    state: TrainingState, directory: Path, comm: Communicator, copy_state: bool, staging: dict | None = None
) -> Pending:
    """Every rank at once: rank 0 makes the `.partial` directory, the epoch's loss sums are summed over ranks, and
    this rank's files' contents are taken. `copy_state` copies every tensor to the CPU, so training may go on,
    into the tensors of `staging` (an earlier checkpoint's contents, written already) where they fit."""
    final = directory / step_name(state.progress.total)
    fail_together(comm, on_rank0(comm, lambda: fresh_dir(final.with_name(final.name + ".partial"))), prefix(final))
    sums = state.progress.loss_sums
    sums = comm.allreduce(sums.clone()) if sums is not None else None  # world-size free: the epoch's global sums
    take = _as_is if copy_state else _compact  # a copy is made of all of it below
    sharded = sorted(phase for phase, o in state.optimizers.items() if _is_sharded(o))
    contents = {
        f"rank-{comm.rank:05d}.pt": {
            "rng": rng.state(),
            "optimizers": {p: take(state.optimizers[p].state_dict()) for p in sharded},
        }
    }
    if comm.rank == 0:
        contents["shared.pt"] = {
            "models": {phase: take(m.state_dict()) for phase, m in state.models.items()},
            "optimizers": {p: take(o.state_dict()) for p, o in state.optimizers.items() if p not in sharded},
            "schedulers": {phase: snapshot(s.state_dict()) for phase, s in state.schedulers.items()},
            "loss_sums": sums,
            "task": take(state.task.state_dict()) if hasattr(state.task, "state_dict") else None,
        }
    if copy_state:
        contents = snapshot(contents, staging)
    manifest = {
        "format": FORMAT,
        "world_size": comm.size,
        "progress": {k: getattr(state.progress, k) for k in POSITION},
        "settings": dict(state.settings),
        "optimizers": {phase: type(o).__name__ for phase, o in state.optimizers.items()},
        "sharded": sharded,
    }
    return Pending(final, comm.rank, contents, manifest)


def publish(pending: Pending, comm: Communicator, keep: int) -> Path:
    """Every rank at once: any rank's problem raises CheckpointError on all; else rank 0 writes the manifest,
    renames the checkpoint into place and prunes to the newest `keep`."""
    manifest = agree(pending, comm)
    fail_together(comm, on_rank0(comm, lambda: commit(pending.partial, pending.final, manifest, keep)),
                  prefix(pending.final))  # fmt: skip
    return pending.final


def agree(pending: Pending, comm: Communicator) -> dict[str, Any]:
    """Every rank at once: the first rank's problem raised on all, or the manifest (every rank's file records)."""
    everyone = comm.allgather_object((pending.written, pending.problem))
    raise_first([p for _, p in everyone])
    return pending.manifest | {"files": {name: rec for files, _ in everyone for name, rec in files.items()}}


def prefix(final: Path) -> str:
    """How a problem with the checkpoint `final` begins."""
    return f"cannot write checkpoint {final}: "


def _is_sharded(optimizer: torch.optim.Optimizer) -> bool:
    """A sharded optimizer's state_dict() is this rank's part; it offers consolidated_state_dict() for the whole.
    One with `state_per_rank` (local SGD) keeps a state of its own on every rank."""
    return callable(getattr(optimizer, "consolidated_state_dict", None)) or getattr(optimizer, "state_per_rank", False)


def _compact(obj: Any) -> Any:
    """Tensors that view a larger buffer (a flat bucket, a shard) copied out, so only their own bytes are saved."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone() if obj.untyped_storage().nbytes() > obj.nbytes else obj.detach()
    if isinstance(obj, dict):
        return {k: _compact(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_compact(v) for v in obj)
    return obj


def _as_is(obj: Any) -> Any:
    return obj


def snapshot(obj: Any, reuse: Any = None) -> Any:
    """A copy of a state_dict that training cannot change: every tensor copied to the CPU (its own bytes only),
    into the same-shaped tensor at the same place in `reuse` when there is one (a fresh allocation costs page
    faults: ten times the copy, measured on 126 MB), arrays copied, containers rebuilt, the rest deep-copied."""
    if isinstance(obj, torch.Tensor):
        fits = isinstance(reuse, torch.Tensor) and reuse.device.type == "cpu" and reuse is not obj
        if fits and reuse.shape == obj.shape and reuse.dtype == obj.dtype:
            return reuse.copy_(obj.detach())
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, np.ndarray):
        return obj.copy()
    if isinstance(obj, dict):
        reuse = reuse if isinstance(reuse, dict) else {}
        return {k: snapshot(v, reuse.get(k)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        reuse = reuse if isinstance(reuse, (list, tuple)) and len(reuse) == len(obj) else [None] * len(obj)
        return type(obj)(snapshot(v, r) for v, r in zip(obj, reuse))
    return copy.deepcopy(obj)
