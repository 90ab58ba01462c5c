"""The flight recorder: where each rank is in the sequence of collectives, readable by the others without its help.

Every rank owns a slot (slots.py: a small file under /dev/shm that the other ranks of its host map): the number and
fingerprint of the collective it entered last, the number of the one it finished last, when, what they were (a
ring of descriptions, each written once), and a heartbeat from a thread of its own. Recording a call costs a few
memory stores and no message; reading a slot needs nothing from its owner, so a rank that stopped, hangs or died
is still seen where it was. The same thread answers a peer's request for its main thread's Python stack.
verify.py reads the fingerprints to check that ranks make the same call (and writes its decisions to start early);
stuck.py reads the rest when a wait times out. Longer than the 300-line budget because the slot's layout and every
reader and writer of it stay in one place.
"""

from __future__ import annotations

import atexit
import mmap
import os
import secrets
import sys
import threading
import time
import traceback
import weakref
from dataclasses import dataclass
from typing import Any

from distrib.comm import slots as slots_
from distrib.comm.contract import describe, fingerprint
from distrib.comm.mirror import Mirror

# Slot layout: HEADER int64 words, then NAMES descriptions of NAME_BYTES, then the stack text.
HEADER = 64
MAGIC, PID, DONE, T_ENTERED, T_DONE, HEARTBEAT, CLOSED, ASK, SERVED, STACK_LEN, GAVE_UP = range(11)
RING_AT, RING = 16, 8  # words 16..23: fp << 32 | seq & MASK of the last RING calls entered, by seq % RING
NAMED_AT = RING_AT + RING  # words 24..31: the description id of each of those calls
CODE_AT = NAMED_AT + RING  # words 32..39: each of those calls as verify.code() has it (written before its word)
DECIDED_AT = CODE_AT + RING  # words 40..47: verify.py's decision on each, started or refused, << 32 | seq & MASK
VOTE_AT = DECIDED_AT + RING  # words 48..55: the transport's vote on each (Transport._vote) << 32 | seq & MASK
MASK = 0xFFFFFFFF
NAMES, NAME_BYTES = 256, 128  # a description: its id (8 bytes), its length (2), its text
NAMES_AT = HEADER * 8
STACK_AT = NAMES_AT + NAMES * NAME_BYTES
STACK_BYTES, STACK_FRAMES = 16384, 16
SLOT_BYTES = STACK_AT + STACK_BYTES
TRIES = 64  # looks for peers already in a call before the check's slower wait (about 5-10 us)
DOZE = 1e-3  # seconds a sleeping wait sleeps at most before it looks again
TICK = 0.2  # seconds between heartbeats, looks for a peer's request for our stack, and the clock read for calls
_OPEN: weakref.WeakSet[Board] = weakref.WeakSet()  # closed at exit, so peers read "finished", not "silent"


@dataclass(frozen=True)
class Seen:
    """One rank's slot as read at one moment; times in seconds since the epoch (0: never)."""

    rank: int
    pid: int
    entered: int  # number of the last collective entered (0: none yet)
    done: int  # number of the last one finished
    entered_at: float
    done_at: float
    heartbeat: float
    closed: float
    current: str  # the description of call `entered`
    local: bool  # on this host (its pid means something here), else read through the mirror
    gave_up: int  # number of the call that failed on it (verify.run marks it), 0: none


class Board:
    """This rank's slot, written by its collectives, and read-only views of the slots of the ranks on its host."""

    def __init__(self, rank: int, slots: list[mmap.mmap | None], whole: bool, token: str = "") -> None:
        self.rank, self.whole, self.token = rank, whole, token
        self._slots: list[Any] = slots
        self._words = [memoryview(s)[: HEADER * 8].cast("q") if s is not None else None for s in slots]
        self._me = self._words[rank]
        self.visible = [r for r, w in enumerate(self._words) if w is not None]  # this host's ranks
        self.mirror: Mirror | None = None  # where ranks on other hosts are read (and this one published)
        self.peers = [r for r in self.visible if r != rank]
        self._peer_words = [self._words[r] for r in self.peers]
        self._at = {r: slots_.address(slots[r]) for r in self.visible}  # for futex waits on a word
        self.wakes = False  # whether entering a call wakes peers sleeping on it (doze), set where waits sleep
        self.crowded = len(self.visible) > len(_cores())
        # Looks the fast path takes: none unless every rank is here (else the check is a collective, and a rank must
        # not skip it), one when waiting ranks would take the cores (the Communicator says if its library needs them).
        self.tries = 0 if not whole else 1 if self.crowded else TRIES
        self._named = 0
        self._owner = os.getpid()
        self._stop = threading.Event()
        self._me[HEARTBEAT] = time.time_ns()
        threading.Thread(target=self._beat, name=f"distrib-flight-rank{rank}", daemon=True).start()
        _OPEN.add(self)

    # Writing this rank's slot: each collective's start and end.

    def enter(self, seq: int, kind: Any, t: Any, vote: int = 0) -> int:
        """Record that this rank entered collective `seq`, a call of `kind` (kinds.Kind) on `t`, with the transport's
        `vote` on it; returns the word its peers must have written for it (fp << 32 | seq) if they make the same
        call. The call is described
        (`describe`) on its kind's first call only: every call costs these few stores. Where peers may sleep on the
        word (`wakes`), the wake also orders the word before this rank's next looks at theirs (a full barrier)."""
        known = kind.named
        if known is None or self._named - known[1] > NAMES:  # never seen, or its description overwritten since
            known = kind.named = self._name(*describe(kind.name, t, kind.op, kind.algorithm, kind.label))
        word = known[0] << 32 | seq & MASK
        me, at = self._me, seq % RING
        me[NAMED_AT + at] = known[1]  # before the word: a peer that sees the word sees its description
        me[CODE_AT + at] = kind.code
        me[VOTE_AT + at] = vote << 32 | seq & MASK
        me[RING_AT + at] = word
        if self.wakes:
            slots_.wake(self._at[self.rank] + (RING_AT + at) * 8)
        return word

    def give_up(self, seq: int) -> None:
        """Say this rank's call `seq` failed here (it will end): peers count it a fellow waiter, not a culprit."""
        self._me[GAVE_UP] = seq

    def done(self, seq: int) -> None:
        self._me[DONE] = seq  # when: the recorder thread notes it (to a tick), so calls need not read the clock

    def arrived(self, seq: int) -> bool:
        """Whether every rank has entered call `seq`."""
        at, low = RING_AT + seq % RING, seq & MASK
        for words in self._peer_words:
            if words[at] & MASK != low:
                return False
        return True

    def differs(self, seq: int, word: int) -> bool:
        """Whether a peer has entered call `seq` with another fingerprint (peers not yet in it do not count)."""
        at, low = RING_AT + seq % RING, seq & MASK
        for words in self._peer_words:
            theirs = words[at]  # read once: the peer may be writing it
            if theirs != word and theirs & MASK == low:
                return True
        return False

    def least_vote(self, seq: int) -> int:
        """The least of every rank's vote on call `seq`, or -1 while a peer has not entered it."""
        at, low = VOTE_AT + seq % RING, seq & MASK
        least = self._me[at] >> 32
        for words in self._peer_words:
            word = words[at]  # read once: the peer may be writing it
            if word & MASK != low:
                return -1
            if word >> 32 < least:
                least = word >> 32
        return least

    def post(self, at: int, seq: int, value: int) -> None:
        """Write `value` into this rank's word for call `seq` in the ring at `at` (DECIDED_AT)."""
        self._me[at + seq % RING] = value

    def read(self, rank: int, at: int, seq: int) -> int:
        """`rank`'s word for call `seq` in the ring at `at` (CODE_AT, DECIDED_AT), whatever call wrote it."""
        return self._words[rank][at + seq % RING]

    @property
    def tries(self) -> int:
        return len(self._tries)

    @tries.setter
    def tries(self, n: int) -> None:
        self._tries = range(n)

    def doze(self, seq: int) -> None:
        """Sleep (up to DOZE seconds) until the first rank not yet in call `seq` writes its word for it."""
        at, low = RING_AT + seq % RING, seq & MASK
        for r, words in zip(self.peers, self._peer_words):
            if (value := words[at] & MASK) != low:
                slots_.sleep_while(self._at[r] + at * 8, value, DOZE)
                return

    def agreed(self, seq: int, word: int) -> bool:
        """Whether every rank has entered call `seq` with the same fingerprint, looking up to `tries` times: the
        check's fast path, for peers that arrive within microseconds."""
        at, peers = RING_AT + seq % RING, self._peer_words
        for _ in self._tries:
            for words in peers:
                if words[at] != word:
                    break
            else:
                return True
        return False

    def _name(self, signature: str, label: str) -> tuple[int, int]:
        text = f"{signature}, {label}" if label else signature
        data = text.encode()[: NAME_BYTES - 10]
        at = NAMES_AT + (self._named % NAMES) * NAME_BYTES
        slot = self._slots[self.rank]
        slot[at : at + 10 + len(data)] = self._named.to_bytes(8, "little") + len(data).to_bytes(2, "little") + data
        self._named += 1
        return fingerprint(signature), self._named - 1

    def close(self) -> None:
        """Say this rank is done with the communicator; peers then read "finished" where they would wait."""
        if os.getpid() == self._owner and not self._stop.is_set():  # not a forked child's exit
            self._me[CLOSED] = time.time_ns()
            self._stop.set()

    # Reading any visible slot.

    def fingerprint(self, rank: int, seq: int) -> int | None:
        """The fingerprint `rank` entered collective `seq` with; None while it has not (yet)."""
        word = self._words[rank][RING_AT + seq % RING]
        return word >> 32 if word & MASK == seq & MASK else None

    def seen(self, rank: int) -> Seen | None:
        """`rank`'s slot now; None for a rank on another host."""
        w = self._words[rank]
        if w is None:
            return None
        ring = [w[RING_AT + i] & MASK for i in range(RING)]
        at = max(range(RING), key=ring.__getitem__)
        current = self.description(rank, w[NAMED_AT + at]) if ring[at] else ""
        times = [w[i] / 1e9 for i in (T_ENTERED, T_DONE, HEARTBEAT, CLOSED)]
        return Seen(rank, w[PID], ring[at], w[DONE], *times, current, rank in self.visible, w[GAVE_UP])

    def others(self) -> list[int]:
        """The other ranks whose slots can be read: this host's, and those the mirror brought."""
        return [r for r, w in enumerate(self._words) if w is not None and r != self.rank]

    def refresh(self) -> None:
        """Read the slots of the ranks on other hosts from the mirror, as they last published them."""
        for r in range(len(self._slots)):
            if r not in self.visible and self.mirror is not None and (record := self.mirror.fetch(r)) is not None:
                slot = bytearray(SLOT_BYTES)
                slot[: HEADER * 8] = record[: HEADER * 8]
                for at in range(NAMES_AT, len(record) - HEADER * 8 + NAMES_AT, NAME_BYTES):
                    entry = record[HEADER * 8 + at - NAMES_AT : HEADER * 8 + at - NAMES_AT + NAME_BYTES]
                    where = NAMES_AT + (int.from_bytes(entry[:8], "little") % NAMES) * NAME_BYTES
                    slot[where : where + NAME_BYTES] = entry
                self._slots[r], self._words[r] = slot, memoryview(slot)[: HEADER * 8].cast("q")

    def _record(self) -> bytes:
        """This rank's slot head and the descriptions of its last RING calls: what the mirror carries."""
        slot, me = self._slots[self.rank], self._me
        entries = [NAMES_AT + (me[NAMED_AT + i] % NAMES) * NAME_BYTES for i in range(RING)]
        return bytes(slot[: HEADER * 8]) + b"".join(slot[at : at + NAME_BYTES] for at in entries)

    def call(self, rank: int, seq: int) -> str:
        """What `rank` entered as collective `seq` ("" if it has not, or that is too long ago to tell)."""
        w, at = self._words[rank], seq % RING
        return self.description(rank, w[NAMED_AT + at]) if w[RING_AT + at] & MASK == seq & MASK else ""

    def description(self, rank: int, name: int) -> str:
        at = NAMES_AT + (name % NAMES) * NAME_BYTES
        entry = self._slots[rank][at : at + NAME_BYTES]
        if int.from_bytes(entry[:8], "little") != name:
            return "(its description is overwritten)"
        return entry[10 : 10 + int.from_bytes(entry[8:10], "little")].decode(errors="replace")

    def ask_stacks(self) -> int:
        """Ask every rank's recorder thread for its main thread's stack; returns the request's stamp."""
        self._me[ASK] = stamp = time.time_ns()
        if self.mirror is not None:
            self.mirror.ask(stamp)
        return stamp

    def stack(self, rank: int, stamp: int) -> str | None:
        """`rank`'s stack, if it has answered the request `stamp`."""
        if rank not in self.visible:
            return self.mirror.stack(rank, stamp) if self.mirror is not None else None
        w = self._words[rank]
        if w[SERVED] < stamp:
            return None
        return self._slots[rank][STACK_AT : STACK_AT + w[STACK_LEN]].decode(errors="replace")

    # The recorder thread: a heartbeat, and this rank's stack for whoever asks.

    def _beat(self) -> None:
        me, main, seen = self._me, threading.main_thread(), (0, 0)
        while not self._stop.wait(TICK):
            now = me[HEARTBEAT] = time.time_ns()
            entered, done = max(me[RING_AT + i] & MASK for i in range(RING)), me[DONE]
            if entered != seen[0]:
                me[T_ENTERED] = now  # the call's start, to within a tick
            if done != seen[1]:
                me[T_DONE] = now
            seen = entered, done
            mirror = self.mirror
            asked = max((self._words[r][ASK] for r in self.peers), default=0)
            try:
                if mirror is not None:
                    mirror.publish(self.rank, self._record())
                    asked = max(asked, mirror.asked())
                if asked > me[SERVED]:
                    frame = sys._current_frames().get(main.ident)
                    text = "".join(traceback.format_stack(frame)[-STACK_FRAMES:]) if frame else "(no main thread)\n"
                    data = text.encode()[-STACK_BYTES:]
                    self._slots[self.rank][STACK_AT : STACK_AT + len(data)] = data
                    me[STACK_LEN] = len(data)
                    me[SERVED] = asked
                    if mirror is not None:
                        mirror.answer(self.rank, asked, text)
            except Exception:  # noqa: BLE001 -- a store gone at the job's end: the recorder just stops
                return


def open_board(comm: Any) -> Board | None:
    """Collective over `comm` (its object collectives): each rank makes its slot and maps the slots it can reach.

    None where this rank's slot cannot be made. `whole` when every rank sees every slot (one host). A slot's file
    is removed once every rank has mapped it, so a job that dies leaves nothing in /dev/shm.
    """
    token = comm.broadcast_object(secrets.token_hex(8) if comm.rank == 0 else None)
    name = f"distrib-{token}-{comm.rank}"
    nonce = secrets.randbits(62)
    mine = slots_.make(os.path.join(slots_.FOLDER, name), SLOT_BYTES, nonce)
    if mine is not None:
        words = memoryview(mine)[: HEADER * 8].cast("q")
        words[PID] = os.getpid()
        words.release()
    slots, seen = slots_.share(comm, name, SLOT_BYTES, nonce, mine)
    if mine is None:
        return None
    return Board(comm.rank, slots, all(all(row) for row in seen), token)


def _cores() -> set[int]:
    affinity = getattr(os, "sched_getaffinity", None)
    return set(affinity(0)) if affinity else set(range(os.cpu_count() or 1))


def _close_all() -> None:
    for board in list(_OPEN):
        board.close()


atexit.register(_close_all)  # Python's exit handlers run before MPI_Finalize (mpi4py's is a C-level one)
