"""When a run checkpoints: every N optimizer steps, at each epoch's end, once more when stopped; and its resume."""

from __future__ import annotations

from pathlib import Path

from distrib.checkpoint.state import TrainingState
from distrib.checkpoint.store import find, load, save, step_name
from distrib.comm import Communicator


class Checkpointer:
    """A run's checkpoints: every `every` optimizer steps, at each epoch's end, once more when stopped."""

    def __init__(
        self, directory: Path, comm: Communicator, state: TrainingState, every: int | None = None, keep: int = 3
    ) -> None:
        if keep < 1 or (every is not None and every < 1):
            raise ValueError(f"keep ({keep}) and every ({every}) must be at least 1")
        self.directory, self.comm, self.state, self.every, self.keep = directory, comm, state, every, keep
        self._saved_at: int | None = None  # progress.total of the last checkpoint written

    def on_step(self) -> None:
        """A checkpoint every `every` steps; the last step of an epoch leaves it to on_epoch."""
        p = self.state.progress
        if self.every and p.total % self.every == 0 and p.step < p.steps:
            self.save()

    def on_epoch(self) -> None:
        self.save()

    def save(self) -> Path:
        """Write the state now, unless the newest checkpoint already holds this very step."""
        if self._saved_at != self.state.progress.total:
            save(self.state, self.directory, self.comm, self.keep)
            self._saved_at = self.state.progress.total
        return self.directory / step_name(self.state.progress.total)

    def resume(self, path: Path) -> Path:
        """Load the newest checkpoint under `path` that verifies (rank 0 reports those it skips)."""
        checkpoint = find(path, self.comm)
        load(self.state, checkpoint, self.comm)
        self._saved_at = self.state.progress.total
        return checkpoint
