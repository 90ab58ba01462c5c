"""Checkpoints written by a thread while training goes on (as torch.distributed.checkpoint's async_save).

The state is copied at the step (tensors cloned to the CPU) on the training thread, which also does every
collective part, in the same order on every rank; the thread only writes this rank's files. At most one is in
flight: the next checkpoint, and the end of the run, first wait for it and publish it (the manifest agreed, the
directory renamed into place), so a write that failed on any rank raises CheckpointError on every rank then.
Until published, a checkpoint is a `.partial` directory that a resume never takes.
"""

from __future__ import annotations

import threading
from pathlib import Path

from distrib.checkpoint.state import TrainingState
from distrib.checkpoint.writing import Pending, begin, publish
from distrib.comm import Communicator


class BackgroundWriter:
    """One checkpoint at a time written by a thread; `submit` and `finish` are collective (call them on every rank)."""

    def __init__(self, comm: Communicator, keep: int) -> None:
        self.comm, self.keep = comm, keep
        self._inflight: tuple[Pending, threading.Thread] | None = None

    def submit(self, state: TrainingState, directory: Path) -> None:
        """Publish the previous checkpoint (waiting for its files), then copy `state` and start writing it."""
        self.finish()
        pending = begin(state, directory, self.comm, copy_state=True)
        thread = threading.Thread(target=pending.write, name="distrib-checkpoint", daemon=True)
        thread.start()
        self._inflight = (pending, thread)

    def finish(self) -> Path | None:
        """Wait for the checkpoint in flight (at most the collective timeout) and publish it; None if none was."""
        if self._inflight is None:
            return None
        pending, thread = self._inflight
        self._inflight = None
        thread.join(self.comm.timeout)
        if thread.is_alive():  # a disk this slow would also time out a synchronous write's collectives
            pending.problem = f"rank {self.comm.rank}'s files took more than {self.comm.timeout:g} s to write"
        return publish(pending, self.comm, self.keep)
