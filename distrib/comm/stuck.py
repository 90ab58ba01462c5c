"""What a rank says when a wait for its peers fails: one report, from the flight recorder's board (flight.py),
naming the ranks at fault, what each rank is doing (its collective and that collective's number), when each was
last seen, and the Python stack of a rank that is alive but busy elsewhere.

Every survivor reads the same board, so they name the same culprits and never each other. The advice to raise
DISTRIB_TIMEOUT is given only where the board shows nothing but slowness: no rank that finished, died, stopped or
called another collective.
"""

from __future__ import annotations

import time
from typing import Any

from distrib.comm.contract import CollectiveError, CollectiveTimeout
from distrib.comm.flight import TICK, Board, Seen
from distrib.comm.transport import Transport

SILENT = 5 * TICK  # seconds without a heartbeat after which a rank counts as not answering
STACK_WAIT = 3 * TICK  # seconds to wait for a busy rank's stack
SLOW = ("busy", "behind", "waiting")  # the kinds of laggard a longer deadline would help
ADVICE = {
    "finished": "every rank must make the same collective calls, in the same order: one finished early",
    "other": "every rank must make the same collective calls, in the same order: these differ",
    "died": "a rank died: its own output says why",
    "stopped": "a stopped rank (kill -STOP, a debugger, a suspended job) never answers: resume it (kill -CONT) or end "
    "the job",
    "silent": "a rank that does not answer is stuck outside Python (a C call holding the GIL) or lost with its host",
    "gave up": "a rank that gave up in an earlier call is ending: its own report names the rank(s) it waited for",
    **dict.fromkeys(SLOW, "raise DISTRIB_TIMEOUT if it is only slow"),
}


def report(comm: Any, what: str, missing: list[int], gone: bool = False) -> CollectiveError:
    """The error for a wait in collective `what` that failed: a timeout, or (`gone`) peers that finished or died.

    `missing`: the ranks the transport waited for (-1: some rank of a native collective).
    """
    board: Board | None = comm._board
    plain = Transport._timeout(comm, what, missing)
    if board is None:
        return plain
    board.give_up(comm._seq)  # first: a peer this rank's exit cuts off then reads a fellow waiter, not a culprit
    if board.mirror is not None:
        board.refresh()  # the ranks of other hosts, as they last published themselves
    me, seq, now = comm.rank, comm._seq, time.time()
    mine = board.fingerprint(me, seq)
    verdicts = {}
    for r in board.others():
        seen = board.seen(r)
        verdicts[r] = _verdict(seen, seq, board.fingerprint(r, seq), mine, board.call(r, seq), now)
    culprits = sorted(r for r, (kind, _) in verdicts.items() if kind not in ("waiting", "ahead"))
    stamp = board.ask_stacks() if any(verdicts[r][0] == "busy" for r in culprits) else 0
    waited = "stops waiting" if gone else f"waited {comm.timeout:g} s"
    if culprits:
        head = f"{what} (call #{seq}): rank {me} {waited} for rank(s) {culprits}: "
        head += "; ".join(f"rank {r} {verdicts[r][1]}" for r in culprits)
    else:
        head = f"{str(plain).split(';')[0]} (call #{seq}); every rank this one can see is in that call and answers"
    kinds = {verdicts[r][0] for r in culprits} or {"waiting"}
    shown = [k for k in ADVICE if k in kinds and (k not in SLOW or kinds <= set(SLOW))]
    advice = "; ".join(dict.fromkeys(ADVICE[k] for k in shown))
    shown = sorted([me, *board.others()])
    lines = [head, *(f"  {_where(board.seen(r), now)}" for r in shown)]
    lines += [f"  rank {r}: on another host, not visible from here" for r in range(comm.size) if r not in shown]
    lines.append(f"  {advice}")
    if stamp:
        lines += _stacks(board, [r for r in culprits if verdicts[r][0] == "busy"], stamp)
    seen = {r: board.seen(r) for r in culprits}
    stuck = tuple(seen[r].pid for r in culprits if verdicts[r][0] in ("stopped", "silent", "busy") and seen[r].local)
    return (CollectiveError if gone else CollectiveTimeout)("\n".join(lines), tuple(culprits), stuck)


def departed(board: Board, seq: int) -> bool:
    """Whether a rank on this host that has not entered collective `seq` closed its communicator or died: then
    waiting longer is pointless."""
    for r in board.peers:
        if board.fingerprint(r, seq) is None:
            seen = board.seen(r)
            if (seen.closed and seen.done < seq) or process_state(seen.pid) == "dead":
                return True
    return False


def gave_up(board: Board, seq: int) -> bool:
    """Whether a rank on this host gave up in collective `seq`: its own wait failed, and it is ending."""
    return any((seen := board.seen(r)) is not None and seen.gave_up == seq for r in board.peers)


def _verdict(s: Seen, seq: int, fp: int | None, mine: int | None, theirs: str, now: float) -> tuple[str, str]:
    """(kind, what to say) about a peer, as seen by a rank waiting in collective `seq`."""
    after = f"after call #{s.done}" if s.done else "before its first call"
    if s.gave_up == seq:  # it was in this call too, and its wait failed first
        return "waiting", f"gave up in call #{seq} too"
    state = process_state(s.pid) if s.local else "unknown"  # a pid of another host means nothing here
    if s.closed and s.done < seq:
        return "finished", f"finished: it closed its communicator {after}, {now - s.closed:.1f} s ago"
    where = f"in call #{seq}" if s.entered == seq else f"{after}, before call #{seq}"
    if state == "dead":
        return "died", f"died (pid {s.pid} is gone) {where}"
    if state == "stopped":
        return "stopped", f"is stopped (pid {s.pid}, state T) {where}"
    silent = now - s.heartbeat > SILENT
    if s.entered < seq:
        if silent:
            return "silent", f"has not called it and has not answered for {now - s.heartbeat:.1f} s ({after})"
        if s.done < s.entered:  # still in a call this rank finished: held up in turn, or its own wait failed there
            if s.gave_up == s.entered:
                return "gave up", f"has not called it: it gave up in call #{s.entered}, which this rank finished"
            return (
                "behind",
                f"has not called it: it is still in call #{s.entered}{_since(s, now)}, which this rank finished",
            )
        return "busy", f"has not called it: it is alive, busy elsewhere {after} (its stack is below)"
    if s.entered > seq or s.done >= seq:
        return "ahead", f"is past it, in call #{s.entered}"
    if fp is not None and mine is not None and fp != mine:
        return "other", f"is in call #{seq} too, but that is {theirs}"
    if silent:
        return "silent", f"entered call #{seq} but has not answered for {now - s.heartbeat:.1f} s"
    return "waiting", f"is in call #{seq} too"


def _where(s: Seen, now: float) -> str:
    """One rank's line of the report: its call, and when it was last seen (times to within a recorder tick)."""
    line = f"rank {s.rank} (pid {s.pid}{'' if s.local else ', another host'}): "
    if s.entered > s.done:
        line += f"in call #{s.entered} {s.current}{_since(s, now)}"
    elif s.done:
        line += f"between calls: call #{s.done} {s.current} ended"
        line += f" {now - s.done_at:.1f} s ago" if s.done_at else ""
    else:
        line += "has made no collective call yet"
    if s.closed:
        return line + f"; closed its communicator {now - s.closed:.1f} s ago"
    return line + f"; heartbeat {now - s.heartbeat:.1f} s ago"


def _since(s: Seen, now: float) -> str:
    """How long a rank has been in its current call (to a recorder tick), where its recorder has noted it."""
    return f" for {now - s.entered_at:.1f} s" if s.entered_at else ""


def _stacks(board: Board, ranks: list[int], stamp: int) -> list[str]:
    deadline, found = time.monotonic() + STACK_WAIT, {}
    while len(found) < len(ranks) and time.monotonic() < deadline:
        time.sleep(TICK / 4)
        found |= {r: text for r in ranks if r not in found and (text := board.stack(r, stamp)) is not None}
    lines = []
    for r in ranks:
        text = found.get(r)
        lines.append(f"  rank {r}'s Python stack (main thread):" if text else f"  rank {r} did not send its stack")
        lines += [f"    {line}" for line in (text or "").rstrip("\n").splitlines()]
    return lines


def process_state(pid: int) -> str:
    """ "running", "stopped" (SIGSTOP, a tracer), "dead" (gone, or a zombie) or "unknown" for a pid of this host."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rpartition(")")[2].split()[0]
    except FileNotFoundError:
        return "dead"
    except (OSError, IndexError):
        return "unknown"
    return {"Z": "dead", "X": "dead", "T": "stopped", "t": "stopped"}.get(state, "running")
