"""When a run checkpoints: every N optimizer steps, at each epoch's end, once more when stopped; and its resume."""

from __future__ import annotations

from pathlib import Path

from distrib.checkpoint.background import BackgroundWriter
from distrib.checkpoint.state import TrainingState
from distrib.checkpoint.store import NoCheckpoint, find, load, step_name
from distrib.checkpoint.writing import save
from distrib.comm import Communicator


class Checkpointer:
    """A run's checkpoints: every `every` optimizer steps, at each epoch's end, once more when stopped.

    background=True writes them in a thread while training goes on (see background.py); call `finish()` at the
    end, which publishes the last one and raises the CheckpointError of any write that failed.
    """

    def __init__(
        self,
        directory: Path,
        comm: Communicator,
        state: TrainingState,
        every: int | None = None,
        keep: int = 3,
        background: bool = False,
    ) -> None:
        if keep < 1 or (every is not None and every < 1):
            raise ValueError(f"keep ({keep}) and every ({every}) must be at least 1")
        self.directory, self.comm, self.state, self.every, self.keep = directory, comm, state, every, keep
        self.background = BackgroundWriter(comm, keep) if background else None
        self._saved_at: int | None = None  # progress.total of the last checkpoint written

    def on_step(self) -> None:
        """A checkpoint every `every` steps; the last step of an epoch leaves it to on_epoch."""
        p = self.state.progress
        if self.every and p.total % self.every == 0 and p.step < p.steps:
            self.save()

    def on_epoch(self) -> None:
        self.save()

    def save(self) -> Path:
        """Write the state now (or start writing it), unless the newest checkpoint already holds this very step."""
        if self._saved_at != self.state.progress.total:
            if self.background is not None:
                self.background.submit(self.state, self.directory)
            else:
                save(self.state, self.directory, self.comm, self.keep)
            self._saved_at = self.state.progress.total
        return self.directory / step_name(self.state.progress.total)

    def finish(self) -> None:
        """Publish the checkpoint a thread is writing, if any: every checkpoint asked for is then on disk."""
        if self.background is not None:
            self.background.finish()

    def resume(self, path: Path, fresh_if_none: bool = False) -> Path | None:
        """Load the newest checkpoint under `path` that verifies (rank 0 reports those it skips); with
        `fresh_if_none`, None (the state untouched) where `path` holds none."""
        try:
            checkpoint = find(path, self.comm)
        except NoCheckpoint:
            if fresh_if_none:
                return None
            raise
        load(self.state, checkpoint, self.comm)
        self._saved_at = self.state.progress.total
        return checkpoint
