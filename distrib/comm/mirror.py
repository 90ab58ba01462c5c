"""The flight recorder across hosts: each rank's record, copied by its recorder thread to a key-value store
(torch.distributed's: torchrun's agent holds it, or one met through MPI), so that ranks on other hosts can read it
without the rank's help. flight.py's board in shared memory reaches only the ranks of one host.

A record is the head of a rank's slot (numbers, times, heartbeat) and the descriptions of its last calls; a
reader lays it out as a slot again, so the board reads it like any other. Store calls can block (a store whose
server is stopped never answers), so readers wait for them a bounded time only.
"""

from __future__ import annotations

import threading
from typing import Any

WAIT = 2.0  # seconds a reader waits for the store


class Mirror:
    """Publish this rank's record and stack under `prefix` in `store`; read the other ranks'."""

    def __init__(self, store: Any, prefix: str) -> None:
        self._store, self._prefix = store, prefix

    def publish(self, rank: int, record: bytes) -> None:
        self._store.set(f"{self._prefix}/record/{rank}", record)

    def fetch(self, rank: int) -> bytes | None:
        """`rank`'s last record; None if it has published none or the store does not answer in time."""
        return self._get(f"{self._prefix}/record/{rank}")

    def ask(self, stamp: int) -> None:
        """Ask every rank's recorder thread for its stack (stamps only grow: the newest request wins)."""
        _bounded(lambda: self._store.set(f"{self._prefix}/ask", str(stamp)), WAIT)

    def asked(self) -> int:
        """The newest request for stacks (0: none); called by the recorder thread, so it may wait."""
        key = f"{self._prefix}/ask"
        return int(self._store.get(key)) if self._store.check([key]) else 0

    def answer(self, rank: int, stamp: int, stack: str) -> None:
        self._store.set(f"{self._prefix}/stack/{rank}", f"{stamp}\n{stack}")

    def stack(self, rank: int, stamp: int) -> str | None:
        """`rank`'s stack if it has answered the request `stamp`."""
        data = self._get(f"{self._prefix}/stack/{rank}")
        if data is None:
            return None
        served, _, text = data.decode(errors="replace").partition("\n")
        return text if int(served) >= stamp else None

    def _get(self, key: str) -> bytes | None:
        return _bounded(lambda: self._store.get(key) if self._store.check([key]) else None, WAIT)


def _bounded(call: Any, wait: float) -> Any:
    """`call()` on a daemon thread; its result, or None if it raised or did not return within `wait` seconds."""
    result: list[Any] = [None]

    def run() -> None:
        try:
            result[0] = call()
        except Exception:  # noqa: BLE001 -- an unreachable store is "not visible", not a second failure
            result[0] = None

    thread = threading.Thread(target=run, name="distrib-mirror-read", daemon=True)
    thread.start()
    thread.join(wait)
    return result[0]
