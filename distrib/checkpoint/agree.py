"""Ranks that agree on a checkpoint's problems: each rank's error becomes a line to share, and all raise or none."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from distrib.checkpoint import atomic
from distrib.comm import Communicator


class CheckpointError(ValueError):
    """A checkpoint that cannot be written or used; the message names it, the problem and the fix."""


def attempt(action: Callable[[], Any]) -> tuple[Any, str | None]:
    """Run `action`; an OSError or CheckpointError becomes a problem to share with the other ranks."""
    try:
        return action(), None
    except (CheckpointError, atomic.DamagedFile) as error:
        return None, str(error)
    except OSError as error:
        return None, f"{error.filename or ''}: {error.strerror or error}".lstrip(": ")
    except (KeyError, ValueError) as error:
        return None, f"its manifest is malformed ({type(error).__name__}: {error})"


def on_rank0(comm: Communicator, action: Callable[[], Any]) -> str | None:
    """Rank 0 runs `action`; its problem (None on the other ranks)."""
    return attempt(action)[1] if comm.rank == 0 else None


def fail_together(comm: Communicator, problem: str | None, prefix: str = "") -> None:
    """Raise CheckpointError on every rank if rank 0 saw a problem."""
    raise_first([comm.broadcast_object(problem)], prefix)


def raise_first(problems: list[str | None], prefix: str = "") -> None:
    """Raise the first problem; called on every rank with the same list, so all raise or none does."""
    problem = next((p for p in problems if p), None)
    if problem:
        raise CheckpointError(prefix + problem)
