"""A background thread that runs queued collectives in order and hands back handles.

Python-level algorithms (naive, ring) have no asynchronous form of their own; running them on this thread lets
them overlap with backward just as a library's native non-blocking collectives do. One thread per
communicator keeps every rank's collectives in the same order, which is what makes them match up.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from typing import Any

import torch


class Handle:
    """The result of an asynchronous collective: `wait()` returns it (or raises its error)."""

    def __init__(self, engine: Engine | None = None) -> None:
        self._engine = engine
        self._done = threading.Event()
        self._result: Any = None
        self._error: BaseException | None = None
        self._future: torch.futures.Future | None = None
        self._lock = threading.Lock()

    def is_completed(self) -> bool:
        return self._done.is_set()

    def wait(self) -> Any:
        # No deadline here: the collective itself carries one and fails the handle when it passes.
        if not self._done.is_set() and self._engine is not None:
            start = time.perf_counter_ns()
            self._done.wait()
            self._engine.blocked_ns += time.perf_counter_ns() - start  # communication the caller did not hide
        self._done.wait()
        if self._error is not None:
            raise self._error
        return self._result

    def get_future(self) -> torch.futures.Future:
        """A torch Future that completes with the result (or the error), as torch's Work.get_future() gives."""
        with self._lock:
            if self._future is None:
                self._future = torch.futures.Future()
                if self._done.is_set():
                    self._settle()
        return self._future

    def _finish(self, result: Any = None, error: BaseException | None = None) -> None:
        with self._lock:
            self._result, self._error = result, error
            self._done.set()
            if self._future is not None:
                self._settle()

    def _settle(self) -> None:
        if self._error is not None:
            self._future.set_exception(self._error)
        else:
            self._future.set_result(self._result)


class Engine:
    """Runs submitted callables one at a time, in submission order, on a daemon thread."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._queue: queue.SimpleQueue[tuple[Callable[[], Any], Handle]] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._pending = 0
        self._lock = threading.Lock()
        self._failed: BaseException | None = None
        self.blocked_ns = 0  # time callers spent waiting on collectives, on their own thread

    @property
    def idle(self) -> bool:
        """True when nothing is queued or running, so a caller may run a collective inline."""
        return self._pending == 0

    def on_its_thread(self) -> bool:
        return threading.current_thread() is self._thread

    def run_here(self, job: Callable[[], Any], async_op: bool) -> Any:
        """Run `job` on the engine's own thread at once, from a callback of the job that just finished: queued, it
        would wait behind the callback that waits for it."""
        if not async_op:
            return job()
        handle = Handle()
        try:
            handle._finish(result=job())
        except BaseException as error:  # noqa: BLE001 -- handed to whoever waits on the handle
            handle._finish(error=error)
        return handle

    def submit(self, job: Callable[[], Any]) -> Handle:
        handle = Handle(self)
        with self._lock:
            self._pending += 1
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()
        self._queue.put((job, handle))
        return handle

    def _run(self) -> None:
        while True:
            job, handle = self._queue.get()
            if self._failed is not None:
                # Collectives after a failed one would only hang or mismatch; fail them with the first error.
                handle._finish(error=self._failed)
            else:
                try:
                    handle._finish(result=job())
                except BaseException as error:  # noqa: BLE001 -- handed to whoever waits on the handle
                    self._failed = error
                    handle._finish(error=error)
            job = handle = None  # while waiting for the next, hold nothing of this one (its tensors may be freed)
            with self._lock:
                self._pending -= 1


def observed(
    job: Callable[[], Any], observer: Callable[..., None], name: str, info: dict[str, Any]
) -> Callable[[], Any]:
    """`job`, reporting to `observer` when it was queued, started and finished."""
    queued = time.perf_counter_ns()

    def run() -> Any:
        started = time.perf_counter_ns()
        try:
            return job()
        finally:
            observer(name, queued, started, time.perf_counter_ns(), info)

    return run
