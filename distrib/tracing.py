"""A per-rank timeline of compute and communication, in the Chrome trace format (Perfetto, chrome://tracing).

    with distrib.trace("run.json", comm):
        ...  # the loop's stages and every collective become spans, one track per rank and per thread

When no trace is active, `span()` costs two lookups and returns a shared no-op context. The active recorder is
process-wide state, kept with the rest of it in distrib.process.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from distrib.comm import Communicator
from distrib.process import STATE

_OFF = contextlib.nullcontext()


class Recorder:
    """Collects this rank's events; timestamps count from a barrier all ranks passed together."""

    def __init__(self, comm: Communicator) -> None:
        self.comm = comm
        comm.barrier()
        self._origin = time.perf_counter_ns()
        self._events: list[dict[str, Any]] = []
        self._lock = threading.Lock()  # the engine thread records too

    def now(self) -> int:
        return time.perf_counter_ns()

    def add(self, name: str, cat: str, start_ns: int, end_ns: int, track: str | None = None, **args: Any) -> None:
        """One complete span ("X" event) on the calling thread's track, or on `track` (a GPU copy stream's)."""
        event = {
            "name": name,
            "cat": cat,
            "ph": "X",
            "ts": (start_ns - self._origin) / 1000,
            "dur": (end_ns - start_ns) / 1000,
            "pid": self.comm.rank,
            "tid": track or threading.current_thread().name,
            "args": args,
        }
        with self._lock:
            self._events.append(event)

    @contextlib.contextmanager
    def span(self, name: str, cat: str, **args: Any) -> Iterator[None]:
        start = self.now()
        try:
            yield
        finally:
            self.add(name, cat, start, self.now(), **args)

    def collective(self, name: str, queued_ns: int, started_ns: int, finished_ns: int, info: dict[str, Any]) -> None:
        """A Communicator observer: one span per collective, on the thread that ran it (the engine's, if async)."""
        self.add(name, "comm", started_ns, finished_ns, queued_us=(started_ns - queued_ns) / 1000, **info)

    def merged(self) -> dict[str, Any] | None:
        """Every rank's events in one trace (on rank 0; None elsewhere), a process per rank, named tracks."""
        everyone = self.comm.allgather_object(self._events)
        if self.comm.rank != 0:
            return None
        events: list[dict[str, Any]] = []
        for rank, rank_events in enumerate(everyone):
            events.append({"name": "process_name", "ph": "M", "pid": rank, "args": {"name": f"rank {rank}"}})
            events.append({"name": "process_sort_index", "ph": "M", "pid": rank, "args": {"sort_index": rank}})
            events.extend(rank_events)
        return {"traceEvents": events, "displayTimeUnit": "ms"}


def recorder() -> Recorder | None:
    """The trace being recorded in this process, if any: for spans timed elsewhere (CUDA events) to add."""
    return STATE.recorder


def span(name: str, cat: str = "loop", **args: Any) -> contextlib.AbstractContextManager:
    """A span on the active trace, or a shared no-op when no trace is being recorded."""
    recorder = STATE.recorder
    return _OFF if recorder is None else recorder.span(name, cat, **args)


@contextlib.contextmanager
def trace(path: str | Path, comm: Communicator) -> Iterator[Recorder]:
    """Record spans on every rank while inside; on exit rank 0 writes the merged trace to `path`."""
    if STATE.recorder is not None:
        raise RuntimeError("a trace is already being recorded in this process; traces do not nest")
    recorder = STATE.recorder = Recorder(comm)
    comm.observer = recorder.collective
    try:
        yield recorder
    finally:
        comm.observer = None
        STATE.recorder = None
        merged = recorder.merged()
        if merged is not None:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_text(json.dumps(merged))
