"""Every rank must make the same collective call: a check, on every call, before any of its data moves.

Ranks that disagree on a call's size or dtype would otherwise get garbage (native MPI returns a rank's tail
unreduced), an MPI truncation error, or gloo's abort. DISTRIB_VERIFY chooses the check:
- "fingerprint" (the default): each call's fingerprint, a CRC of what it is (collective, op, algorithm, dtype,
  shape), and its number go on the flight recorder's board (flight.py) as the call starts; a rank waits there
  until every rank has entered the call and compares. When every rank shares a host, this is a few memory reads,
  no message; across hosts a 16-byte native allreduce of (fp, -fp) carries it. Where waiting for the peers costs
  more than the check (gloo: a 64 KiB allreduce whose ranks start together takes ~10% longer than one whose
  first rank starts at once), a tensor collective starts early instead (`start_early`).
- "all": each call's description, compared by messages through rank 0 (slower; what the first calls of a
  communicator used to get).
- "off": no check; for measuring what the check costs.
A mismatch raises CollectiveError on every rank, naming each rank's call and its number.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch

from distrib.comm import auto
from distrib.comm.algorithms import ALGORITHMS, TABLE, naive_allgather_
from distrib.comm.contract import DTYPES, OPS, CollectiveError, CollectiveTimeout, describe, fingerprint, poll, real
from distrib.comm.flight import CODE_AT, DECIDED_AT, MASK, RING_AT, Board
from distrib.comm.stuck import departed, report

MODES = ("fingerprint", "all", "off")
EARLY = ("allreduce", "reduce_scatter", "allgather")  # the collectives that complete only once every rank is in
STARTED, REFUSED = 2, 1  # decisions, on the board's DECIDED_AT words


def mode_from_env() -> str:
    mode = os.environ.get("DISTRIB_VERIFY") or MODES[0]
    if mode not in MODES:
        raise ValueError(f"DISTRIB_VERIFY={mode!r} is not a check: use one of {', '.join(MODES)}")
    return mode


def run(comm: Any, kind: Any, t: torch.Tensor | None, job: Callable[[], Any]) -> Any:
    """`job`, a call of `kind` (kinds.Kind) on `t`, as collective number comm._seq + 1 (counted when it starts): on
    the board (flight.py) as it starts and ends, and checked first. Runs on every call, so where nothing is wrong
    it costs a few stores and reads."""
    board, mode = comm._board, comm.verify
    seq = comm._seq = comm._seq + 1
    if board is None:  # no board here: the check goes by messages
        word = fingerprint(describe(kind.name, t, kind.op, kind.algorithm, kind.label)[0]) << 32 | seq & MASK
    else:
        word = board.enter(seq, kind, t, comm._vote(kind, t))
    early = comm.starts_early and kind.code and board is not None and board.whole and board.wakes
    try:
        if early and mode == "fingerprint":
            result = start_early(comm, board, seq, word, job, kind.name)
        else:
            if mode == "fingerprint" and (board is None or not board.agreed(seq, word)):
                agree(comm, seq, word >> 32, kind.name, (kind.name, t, kind.op, kind.algorithm, kind.label))
            elif mode == "all":
                compare_all(comm, seq, describe(kind.name, t, kind.op, kind.algorithm, kind.label)[0])
            result = job()
    except CollectiveError as error:
        if board is not None:  # peers that time out later must not take this rank's exit for "finished"
            board.give_up(seq)
        if isinstance(error, CollectiveTimeout):
            comm._spoil(kind.name)
        raise
    if board is not None:
        board.done(seq)
    return result


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
    # Where the library's threads need the cores (gloo), sleep until a peer's word changes instead of spinning.
    pause, crowded = (None, board.crowded) if comm.spins else (lambda: board.doze(seq), True)
    if not poll(lambda: board.arrived(seq), comm.timeout, crowded, _gone(comm, seq, what), pause):
        raise comm._timeout(what, _not_in(board, seq))
    if any(board.fingerprint(r, seq) != fp for r in board.peers):  # all arrived: compare (the fast path could not)
        if comm.starts_early:
            refuse(comm, board, seq, what)
        _differ(comm, _calls(board, seq))


def start_early(comm: Any, board: Board, seq: int, word: int, job: Callable[[], Any], what: str) -> Any:
    """Run `job`, collective `seq`, without waiting for the ranks not yet in it: start unless a peer already in it
    makes another call. Of any two ranks, the later to write its word sees the other's (board.enter's wake orders
    each rank's word before its look), so the ranks that start all make the same call; a rank that refuses takes
    part in that call before it raises (`refuse`). Once the call is complete every rank has entered it, and each
    compares again: one that started a call another rank refused raises too."""
    if board.differs(seq, word):
        refuse(comm, board, seq, what)
    board.post(DECIDED_AT, seq, STARTED << 32 | seq & MASK)
    try:
        result = job()
    except CollectiveError as error:
        _gone(comm, seq, what, error)()  # a peer that finished or died before the call: say so, not "lost a peer"
        if isinstance(error, CollectiveTimeout) and (absent := _not_in(board, seq)):
            raise comm._timeout(what, absent) from error  # never came: the report of the call, as a check's wait
        raise
    if board.differs(seq, word):
        _differ(comm, _calls(board, seq))
    return result


def refuse(comm: Any, board: Board, seq: int, what: str) -> None:
    """Raise the CollectiveError for call `seq`, which ranks make differently, once every rank has decided whether
    to start it; where some rank started it (start_early), first make that call's data movement on zeros, so that
    the ranks that started complete it and the next calls still pair up."""
    board.post(DECIDED_AT, seq, REFUSED << 32 | seq & MASK)
    if not poll(lambda: not _not_in(board, seq, DECIDED_AT), comm.timeout, True, _gone(comm, seq, what)):
        raise comm._timeout(what, _not_in(board, seq, DECIDED_AT))
    started = [r for r in board.peers if board.read(r, DECIDED_AT, seq) >> 32 == STARTED]
    if started:
        stand_in(comm, board.read(started[0], CODE_AT, seq))
    _differ(comm, _calls(board, seq))


def code(name: str, t: torch.Tensor, op: str, algorithm: str) -> int:
    """A tensor collective in one int64 word (what `stand_in` needs of it): its element count from bit 16, the
    algorithm's, dtype's, op's (allgather's: none, read as sum) and collective's indices below."""
    parts = ALGORITHMS.index(algorithm) << 8 | DTYPES.index(t.dtype) << 4 | OPS.index(op or "sum") << 2
    return t.numel() << 16 | parts | EARLY.index(name)


def stand_in(comm: Any, call: int) -> None:
    """The data movement of the tensor collective `call` (code()), on zeros: what that call's job would pass to
    its algorithm."""
    numel, name = call >> 16, EARLY[call & 3]
    dtype, op, algorithm = DTYPES[call >> 4 & 15], OPS[call >> 2 & 3], ALGORITHMS[call >> 8 & 15]
    flat = real(torch.zeros(numel * comm.size if name == "allgather" else numel, dtype=dtype, device=comm.device))
    chosen = TABLE[auto.choose(comm, algorithm, flat.numel() * flat.element_size())]
    if name == "allgather":
        chosen.allgather(comm, flat)
    else:
        getattr(chosen, name)(comm, flat, "sum" if op == "avg" else op)


def compare_all(comm: Any, seq: int, signature: str) -> None:
    """DISTRIB_VERIFY=all: every rank's fingerprint through rank 0, point to point; descriptions if they differ."""
    prints = torch.zeros(comm.size, dtype=torch.int64, device=comm.device)
    prints[comm.rank] = fingerprint(signature)
    # Through rank 0, point to point: a rank that never arrives is named in the timeout.
    naive_allgather_(comm, comm._array(prints), f"{signature.split('(')[0]}: cross-rank check")
    if not bool((prints == prints[0]).all()):
        _differ(comm, comm._allgather_object(f"call #{seq} {signature}"))


def _not_in(board: Board, seq: int, at: int = RING_AT) -> list[int]:
    """The peers whose word for call `seq` in the ring at `at` is not there yet (RING_AT: they have not entered it;
    DECIDED_AT: not decided on it)."""
    return [r for r in board.peers if board.read(r, at, seq) & MASK != seq & MASK]


def _gone(comm: Any, seq: int, what: str, cause: Exception | None = None) -> Callable[[], None]:
    """A look for a wait in call `seq`: raise the report of peers that finished or died before entering it."""

    def look() -> None:
        if departed(comm._board, seq):
            raise report(comm, what, _not_in(comm._board, seq), gone=True) from cause

    return look


def _calls(board: Board, seq: int) -> list[str]:
    return [f"call #{seq} {board.call(r, seq)}" for r in board.visible]


def _differ(comm: Any, calls: list[str]) -> None:
    lines = "; ".join(f"rank {r}: {call}" for r, call in enumerate(calls))
    raise CollectiveError(f"collective calls differ across ranks ({lines}); every rank must call the same")
