"""Every rank must make the same collective call: a check, on every call, before any of its data moves.

Ranks that disagree on a call's size or dtype would otherwise get garbage (native MPI returns a rank's tail
unreduced), an MPI truncation error, or gloo's abort. DISTRIB_VERIFY chooses the check:
- "fingerprint" (the default): each call's fingerprint, a CRC of what it is (collective, op, algorithm, dtype,
  shape), and its number go on the flight recorder's board (flight.py) as the call starts; a rank waits there
  until every rank has entered the call and compares. When every rank shares a host, this is a few memory reads,
  no message; across hosts a 16-byte native allreduce of (fp, -fp) carries it.
- "all": each call's description, compared by messages through rank 0 (slower; what the first calls of a
  communicator used to get).
- "off": no check; for measuring what the check costs.
A mismatch raises CollectiveError on every rank, naming each rank's call and its number.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

import torch

from distrib.comm.algorithms import naive_allgather_
from distrib.comm.contract import CollectiveError, describe, fingerprint, poll
from distrib.comm.flight import MASK
from distrib.comm.stuck import departed, report

MODES = ("fingerprint", "all", "off")


def mode_from_env() -> str:
    mode = os.environ.get("DISTRIB_VERIFY") or MODES[0]
    if mode not in MODES:
        raise ValueError(f"DISTRIB_VERIFY={mode!r} is not a check: use one of {', '.join(MODES)}")
    return mode


def checked(
    comm: Any, job: Callable[[], Any], name: str, label: Mapping[str, Any] | None, t: torch.Tensor | None, op: str,
    algorithm: str,
) -> Callable[[], Any]:  # fmt: skip
    """`job` as collective number comm._seq + 1 (counted when it starts): on the board (flight.py) as it starts and
    ends, and checked first. Runs on every call, so where nothing is wrong it costs a few stores and reads."""
    board = comm._board
    key = name if t is None else (name, op, algorithm, t.dtype, t.shape, tuple(label.items()) if label else None)

    def run() -> Any:
        seq = comm._seq = comm._seq + 1
        if board is None:  # no board here: the check goes by messages
            word = fingerprint(describe(name, t, op, algorithm, label)[0]) << 32 | seq & MASK
        else:
            word = board.enter(seq, key, name, t, op, algorithm, label)
        if comm.verify == "fingerprint":
            if board is None or not board.agreed(seq, word):
                agree(comm, seq, word >> 32, name, (name, t, op, algorithm, label))
        elif comm.verify == "all":
            compare_all(comm, seq, describe(name, t, op, algorithm, label)[0])
        result = job()
        if board is not None:
            board.done(seq)
        return result

    return run


def agree(comm: Any, seq: int, fp: int, what: str, call: tuple) -> None:
    """Return once every rank has entered collective `seq` with fingerprint `fp`, else raise on every rank.
    `call`: flight.describe's arguments, for the messages of the check across hosts."""
    board = comm._board
    if board is None or not board.whole:
        pair = torch.tensor([fp, -fp], dtype=torch.int64, device=comm.device)
        comm._native_allreduce(pair, "max")
        if int(pair[0]) != -int(pair[1]):
            _differ(comm, comm._allgather_object(f"call #{seq} {describe(*call)[0]}"))
        return
    peers = board.peers

    def gone() -> None:
        if departed(board, seq):
            raise report(comm, what, [r for r in peers if board.fingerprint(r, seq) is None], gone=True)

    # Where the library's threads need the cores (gloo), sleep until a peer's word changes instead of spinning.
    pause = None if comm.spins else lambda: board.doze(seq)
    if not poll(lambda: board.arrived(seq), comm.timeout, board.crowded or not comm.spins, gone, pause):
        raise comm._timeout(what, [r for r in peers if board.fingerprint(r, seq) is None])
    if any(board.fingerprint(r, seq) != fp for r in peers):  # all arrived: compare (the fast path could not)
        calls = [f"call #{seq} {board.call(r, seq)}" for r in range(comm.size)]
        _differ(comm, calls)


def compare_all(comm: Any, seq: int, signature: str) -> None:
    """DISTRIB_VERIFY=all: every rank's fingerprint through rank 0, point to point; descriptions if they differ."""
    prints = torch.zeros(comm.size, dtype=torch.int64, device=comm.device)
    prints[comm.rank] = fingerprint(signature)
    # Through rank 0, point to point: a rank that never arrives is named in the timeout.
    naive_allgather_(comm, comm._array(prints), f"{signature.split('(')[0]}: cross-rank check")
    if not bool((prints == prints[0]).all()):
        _differ(comm, comm._allgather_object(f"call #{seq} {signature}"))


def _differ(comm: Any, calls: list[str]) -> None:
    lines = "; ".join(f"rank {r}: {call}" for r, call in enumerate(calls))
    raise CollectiveError(f"collective calls differ across ranks ({lines}); every rank must call the same")
