"""A checkpoint on disk: per-rank files with checksums, written atomically, found, verified and loaded exactly.

A checkpoint is a directory DIR/step-000000120 (named by the optimizer steps done) holding
  shared.pt       from rank 0: the models, the unsharded optimizers, the schedulers, the epoch's loss sums
  rank-00003.pt   from rank 3: its RNG states, and its shard of each sharded optimizer (one that offers
                  consolidated_state_dict(), like ZeroOffloadOptimizer, keeps only its rank's part; LocalSGD's
                  state, its weights between syncs included, is each rank's own)
  manifest.json   last: the position, the settings a resume must match, and each file's size and sha256
Each file goes to a temporary name, is flushed, fsynced and renamed; the directory is put together under a
`.partial` name and renamed into place once every rank's file is in, so a checkpoint is whole or absent. Loading
verifies the checksums first and reads with torch.load(weights_only=True): a checkpoint is data, never code.
All ranks must see DIR (one host, or a shared file system).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from distrib.checkpoint import atomic, rng
from distrib.checkpoint.mismatch import mismatch
from distrib.checkpoint.state import FORMAT, TrainingState
from distrib.comm import Communicator

_NAME = re.compile(r"step-\d{9}")
_POSITION = ("epoch", "step", "total", "skipped")
log = logging.getLogger("distrib")


class CheckpointError(ValueError):
    """A checkpoint that cannot be written or used; the message names it, the problem and the fix."""


def save(state: TrainingState, directory: Path, comm: Communicator, keep: int) -> Path:
    """Write a checkpoint of `state` into `directory` on every rank at once; keep the newest `keep`."""
    name = step_name(state.progress.total)
    final, partial = directory / name, directory / f"{name}.partial"
    fail = f"cannot write checkpoint {final}: "
    _fail_together(comm, _on_rank0(comm, lambda: _fresh_dir(partial)), fail)
    sums = state.progress.loss_sums
    sums = comm.allreduce(sums.clone()) if sums is not None else None  # world-size free: the epoch's global sums
    sharded = sorted(phase for phase, o in state.optimizers.items() if _is_sharded(o))
    shared = {
        "models": {phase: _compact(m.state_dict()) for phase, m in state.models.items()},
        "optimizers": {p: _compact(o.state_dict()) for p, o in state.optimizers.items() if p not in sharded},
        "schedulers": {phase: s.state_dict() for phase, s in state.schedulers.items()},
        "loss_sums": sums,
        "task": state.task.state_dict() if hasattr(state.task, "state_dict") else None,
    }
    mine = {"rng": rng.state(), "optimizers": {p: _compact(state.optimizers[p].state_dict()) for p in sharded}}

    def write_files() -> dict[str, dict[str, Any]]:
        files = {f"rank-{comm.rank:05d}.pt": atomic.write(partial / f"rank-{comm.rank:05d}.pt", mine)}
        if comm.rank == 0:
            files["shared.pt"] = atomic.write(partial / "shared.pt", shared)
        return files

    written, problem = _attempt(write_files)
    everyone = comm.allgather_object((written, problem))
    _raise_first([p for _, p in everyone], fail)
    manifest = {
        "format": FORMAT,
        "world_size": comm.size,
        "progress": {k: getattr(state.progress, k) for k in _POSITION},
        "settings": state.settings,
        "optimizers": {phase: type(o).__name__ for phase, o in state.optimizers.items()},
        "sharded": sharded,
        "files": {name: entry for files, _ in everyone for name, entry in files.items()},
    }
    _fail_together(comm, _on_rank0(comm, lambda: _commit(partial, final, manifest, keep)), fail)
    return final


def find(path: Path, comm: Communicator) -> Path:
    """The checkpoint `path` names, or the newest that verifies in `path` (a run or checkpoints directory)."""
    chosen, problem = None, None
    if comm.rank == 0:
        candidates = [path] if (path / "manifest.json").exists() else _checkpoints(path)
        skipped = []
        for candidate in candidates:
            trouble = verify(candidate)
            if trouble is None:
                chosen = candidate
                break
            skipped.append(f"{candidate.name}: {trouble}")
            log.warning("distrib: skipping checkpoint %s: %s", candidate, trouble)
        if chosen is None and candidates == [path]:
            problem = f"checkpoint {path} is damaged ({trouble}); resume from the run directory to take an older one"
        elif chosen is None:
            problem = f"no checkpoint that verifies in {path}" + (f" ({'; '.join(skipped)})" if skipped else "")
            problem += "; give the run directory that holds checkpoints/, or start afresh without --resume"
    chosen, problem = comm.broadcast_object((chosen, problem))
    _raise_first([problem])
    return chosen


def verify(checkpoint: Path) -> str | None:
    """What is wrong with `checkpoint` (missing, truncated or altered files), or None if it is whole."""
    try:
        manifest = json.loads((checkpoint / "manifest.json").read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        return f"its manifest.json is unreadable ({error})"
    for name, entry in sorted(files.items()):
        trouble = atomic.check(checkpoint / name, entry)
        if trouble:
            return trouble
    return None


def load(state: TrainingState, checkpoint: Path, comm: Communicator) -> None:
    """Load `checkpoint` into `state` on every rank; any mismatch raises on all ranks before anything changes."""
    shared = mine = manifest = None

    def read() -> None:
        nonlocal shared, mine, manifest
        manifest = json.loads((checkpoint / "manifest.json").read_text())
        shared = atomic.read(checkpoint / "shared.pt", manifest["files"]["shared.pt"])
        name = f"rank-{comm.rank:05d}.pt"
        mine = atomic.read(checkpoint / name, manifest["files"][name]) if name in manifest["files"] else None

    _, problem = _attempt(read)
    if problem is None:
        unfit, problem = _attempt(lambda: mismatch(state, manifest, shared, comm.size))
        problem = problem or unfit
    _raise_first(comm.allgather_object(problem), f"checkpoint {checkpoint}: ")
    for phase, model in state.models.items():
        model.load_state_dict(shared["models"][phase])
    for phase, optimizer in state.optimizers.items():
        optimizer.load_state_dict((mine if phase in manifest["sharded"] else shared)["optimizers"][phase])
    for phase, scheduler in state.schedulers.items():
        scheduler.load_state_dict(shared["schedulers"][phase])
    if shared.get("task") is not None:
        state.task.load_state_dict(shared["task"])
    for key in _POSITION:
        setattr(state.progress, key, manifest["progress"][key])
    sums = shared["loss_sums"]  # global sums: rank 0 carries them, the others start from zero
    state.progress.loss_sums = None if sums is None else sums if comm.rank == 0 else torch.zeros_like(sums)
    if mine is not None:  # a rank the writing run did not have keeps its own RNG streams
        rng.set_state(mine["rng"])


# Layout.


def _fresh_dir(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)  # a .partial left by a run that died while writing
    path.mkdir(parents=True)


def _commit(partial: Path, final: Path, manifest: dict[str, Any], keep: int) -> None:
    """Manifest last, then the directory renamed into place (replacing a same-step one), then old ones pruned."""
    atomic.write_text(partial / "manifest.json", json.dumps(manifest, indent=1))
    if final.exists():  # the same step saved again (e.g. at an epoch's end after a resume)
        old = final.with_name(final.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(partial, final)
    atomic.fsync_dir(final.parent)
    for stale in _checkpoints(final.parent)[keep:]:
        shutil.rmtree(stale, ignore_errors=True)
    for leftover in final.parent.glob("step-*.*"):
        if leftover.suffix in (".partial", ".old") and leftover != partial:
            shutil.rmtree(leftover, ignore_errors=True)


def _checkpoints(directory: Path) -> list[Path]:
    """Finished checkpoints in `directory` (or its checkpoints/), newest first."""
    if (directory / "checkpoints").is_dir():
        directory = directory / "checkpoints"
    found = (
        [p for p in directory.glob("step-*") if _NAME.fullmatch(p.name) and p.is_dir()] if directory.is_dir() else []
    )
    return sorted(found, reverse=True)


def step_name(total: int) -> str:
    """The directory name of the checkpoint taken after `total` optimizer steps."""
    return f"step-{total:09d}"


# Checks and agreement.


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


def _attempt(action) -> tuple[Any, str | None]:
    """Run `action`; an OSError or CheckpointError becomes a problem to share with the other ranks."""
    try:
        return action(), None
    except (CheckpointError, atomic.DamagedFile) as error:
        return None, str(error)
    except OSError as error:
        return None, f"{error.filename or ''}: {error.strerror or error}".lstrip(": ")
    except (KeyError, ValueError) as error:
        return None, f"its manifest is malformed ({type(error).__name__}: {error})"


def _on_rank0(comm: Communicator, action) -> str | None:
    return _attempt(action)[1] if comm.rank == 0 else None


def _fail_together(comm: Communicator, problem: str | None, prefix: str = "") -> None:
    """Raise CheckpointError on every rank if rank 0 saw a problem."""
    _raise_first([comm.broadcast_object(problem)], prefix)


def _raise_first(problems: list[str | None], prefix: str = "") -> None:
    """Raise the first problem; called on every rank with the same list, so all raise or none does."""
    problem = next((p for p in problems if p), None)
    if problem:
        raise CheckpointError(prefix + problem)
