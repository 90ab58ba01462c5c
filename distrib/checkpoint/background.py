"""Checkpoints written by a thread while training goes on (as torch.distributed.checkpoint's async_save).

The state is copied at the step (tensors to the CPU, into the last checkpoint's copy where shapes match) on
the training thread, which also does every
collective part, in the same order on every rank; the thread does file I/O only. At most one is in flight: the
next checkpoint first waits for it, and all ranks agree that its files are whole (the manifest's records); the
next thread then renames it into place (rank 0) before writing its own files, so the fsyncs of publishing do
not pause training either. A write or rename that failed on any rank raises CheckpointError on every rank at the
next checkpoint, or at `finish()`, which publishes the last one itself. Until published, a checkpoint is a
`.partial` directory that a resume never takes.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from distrib.checkpoint.agree import attempt, fail_together, on_rank0
from distrib.checkpoint.state import TrainingState
from distrib.checkpoint.store import commit
from distrib.checkpoint.writing import Pending, agree, begin, prefix
from distrib.comm import Communicator


class BackgroundWriter:
    """One checkpoint at a time written by a thread; `submit` and `finish` are collective (call them on every rank)."""

    def __init__(self, comm: Communicator, keep: int) -> None:
        self.comm, self.keep = comm, keep
        self._inflight: tuple[Pending, threading.Thread] | None = None
        self._staging: dict | None = None  # the contents of the last checkpoint written: the next copy goes there

    def submit(self, state: TrainingState, directory: Path) -> None:
        """Agree on the checkpoint in flight (waiting for its files), copy `state`, and start a thread that
        publishes the previous one and writes this one."""
        previous = self._agree()
        pending = begin(state, directory, self.comm, copy_state=True, staging=self._staging)

        def work() -> None:
            if previous is not None and self.comm.rank == 0:
                done, manifest = previous
                problem = attempt(lambda: commit(done.partial, done.final, manifest, self.keep, pending.partial))[1]
                if problem:
                    pending.problem = prefix(done.final) + problem
                    return
            pending.write()

        thread = threading.Thread(target=work, name="distrib-checkpoint", daemon=True)
        thread.start()
        self._inflight = (pending, thread)

    def finish(self) -> Path | None:
        """Wait for the checkpoint in flight and publish it now; None if there was none."""
        agreed = self._agree()
        if agreed is None:
            return None
        pending, manifest = agreed
        problem = on_rank0(self.comm, lambda: commit(pending.partial, pending.final, manifest, self.keep))
        fail_together(self.comm, problem, prefix(pending.final))
        return pending.final

    def _agree(self) -> tuple[Pending, dict[str, Any]] | None:
        """Wait (at most the collective timeout) for the thread in flight; every rank raises the first problem,
        or has the checkpoint's manifest."""
        if self._inflight is None:
            return None
        pending, thread = self._inflight
        self._inflight = None
        thread.join(self.comm.timeout)
        if thread.is_alive():  # a disk this slow would also time out a synchronous write's collectives
            late = f"rank {self.comm.rank}'s files took more than {self.comm.timeout:g} s to write"
            pending.problem = prefix(pending.final) + late
        else:
            self._staging = pending.contents  # written: its tensors can take the next copy
        return pending, agree(pending, self.comm)
