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
from distrib.checkpoint.agree import CheckpointError, attempt, raise_first
from distrib.checkpoint.mismatch import mismatch
from distrib.checkpoint.state import TrainingState
from distrib.comm import Communicator

_NAME = re.compile(r"step-\d{9}")
POSITION = ("epoch", "step", "total", "skipped")  # the fields of Progress a checkpoint holds
log = logging.getLogger("distrib")


class NoCheckpoint(CheckpointError):
    """A directory that holds no checkpoint that verifies: --resume auto starts afresh there."""


def find(path: Path, comm: Communicator) -> Path:
    """The checkpoint `path` names, or the newest that verifies in `path` (a run or checkpoints directory)."""
    chosen, problem, none = None, None, False
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
            none = True
            problem = f"no checkpoint that verifies in {path}" + (f" ({'; '.join(skipped)})" if skipped else "")
            problem += "; give the run directory that holds checkpoints/, or start afresh without --resume"
    chosen, problem, none = comm.broadcast_object((chosen, problem, none))
    if none:
        raise NoCheckpoint(problem)
    raise_first([problem])
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

    _, problem = attempt(read)
    if problem is None:
        unfit, problem = attempt(lambda: mismatch(state, manifest, shared, comm.size))
        problem = problem or unfit
    raise_first(comm.allgather_object(problem), f"checkpoint {checkpoint}: ")
    for phase, model in state.models.items():
        model.load_state_dict(shared["models"][phase])
    for phase, optimizer in state.optimizers.items():
        optimizer.load_state_dict((mine if phase in manifest["sharded"] else shared)["optimizers"][phase])
    for phase, scheduler in state.schedulers.items():
        scheduler.load_state_dict(shared["schedulers"][phase])
    if shared.get("task") is not None:
        state.task.load_state_dict(shared["task"])
    for key in POSITION:
        setattr(state.progress, key, manifest["progress"][key])
    sums = shared["loss_sums"]  # global sums: rank 0 carries them, the others start from zero
    state.progress.loss_sums = None if sums is None else sums if comm.rank == 0 else torch.zeros_like(sums)
    if mine is not None:  # a rank the writing run did not have keeps its own RNG streams
        rng.set_state(mine["rng"])


# Layout.


def fresh_dir(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)  # a .partial left by a run that died while writing
    path.mkdir(parents=True)


def commit(partial: Path, final: Path, manifest: dict[str, Any], keep: int, writing: Path | None = None) -> None:
    """Manifest last, then the directory renamed into place (replacing a same-step one), then old ones pruned,
    with the leftovers of runs that died while writing, but not `writing` (the next one, begun already)."""
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
        if leftover.suffix in (".partial", ".old") and leftover != writing:
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
