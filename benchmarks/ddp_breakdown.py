"""Where a distrib DDP step's time goes: timers around the reducer's parts and an observer on the communicator.

Per step (milliseconds, this rank):
  hooks         inside the per-parameter hooks (the gradient into its bucket, a bucket's launch)
  hooks_off_cpu of that, the hook's thread not running: waiting for the GIL, or for the core
  copy_in       gradients into buckets (part of hooks)
  queued        buckets waiting on the engine thread behind earlier ones, summed
  collective    the engine running the buckets' allreduces, summed (overlaps backward)
  end_wait      the end of backward waiting for allreduces still running: communication not hidden
  hand_out      the averages into .grad at the end of backward
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable
from contextlib import contextmanager
from typing import Any

from distrib.ddp import buckets, reducer, wrapper

FIELDS = ("hooks", "hooks_off_cpu", "copy_in", "queued", "collective", "end_wait", "hand_out")


class Breakdown:
    """Accumulates the parts of the work run inside `measuring()`; `take()` returns the sums since the last take."""

    def __init__(self) -> None:
        self.current: dict[str, float] = defaultdict(float)

    def add(self, name: str, seconds: float) -> None:
        self.current[name] += seconds * 1e3

    def take(self) -> dict[str, float]:
        taken, self.current = {name: self.current.get(name, 0.0) for name in FIELDS}, defaultdict(float)
        return taken

    def observer(self, name: str, queued_ns: int, started_ns: int, finished_ns: int, info: dict[str, Any]) -> None:
        if "bucket" in info:
            self.add("queued", (started_ns - queued_ns) / 1e9)
            self.add("collective", (finished_ns - started_ns) / 1e9)

    def _timed(self, name: str, fn: Callable, cpu_name: str | None = None) -> Callable:
        def run(*args: Any, **kwargs: Any) -> Any:
            wall, cpu = time.perf_counter(), time.thread_time()
            try:
                return fn(*args, **kwargs)
            finally:
                spent = time.perf_counter() - wall
                self.add(name, spent)
                if cpu_name:
                    self.add(cpu_name, max(spent - (time.thread_time() - cpu), 0.0))

        return run

    @contextmanager
    def measuring(self, *comms: Any):
        """Timers on distrib's DDP classes (wrappers built inside) and these communicators' observers, while inside."""
        patches = [
            (wrapper, "_hook", self._timed("hooks", wrapper._hook, "hooks_off_cpu")),
            (reducer.Reducer, "_copy_in", self._timed("copy_in", reducer.Reducer._copy_in)),
            (reducer.Reducer, "_result", self._timed("end_wait", reducer.Reducer._result)),
            (buckets.Bucket, "hand_out", self._timed("hand_out", buckets.Bucket.hand_out)),
        ]
        saved = [(owner, name, getattr(owner, name)) for owner, name, _ in patches]
        try:
            for owner, name, patched in patches:
                setattr(owner, name, patched)
            for comm in comms:
                comm.observer = self.observer
            yield self
        finally:
            for owner, name, original in saved:
                setattr(owner, name, original)
            for comm in comms:
                comm.observer = None
