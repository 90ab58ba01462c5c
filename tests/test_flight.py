"""The flight recorder's board and the report of a failed wait, in one process: two ranks' boards over the same two
slots, a peer's pid swapped for a stopped, dead or live process. The multi-rank runs are in test_failures.py."""

from __future__ import annotations

import mmap
import os
import signal
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import pytest
import torch

from distrib.comm import flight, stuck
from distrib.comm.contract import CollectiveError, CollectiveTimeout
from distrib.comm.flight import Board
from distrib.comm.kinds import Kind


@pytest.fixture
def boards():
    """Rank 0's and rank 1's boards over the same two slots, as two processes on one host would have them."""
    slots = [mmap.mmap(-1, flight.SLOT_BYTES) for _ in range(2)]
    pair = [Board(r, slots, whole=True) for r in range(2)]
    for board in pair:
        board._me[flight.PID] = os.getpid()
    yield pair
    for board in pair:
        board.close()


def call(board: Board, seq: int, numel: int, label: dict | None = None) -> None:
    board.enter(seq, Kind("allreduce", "sum", "ring", label), torch.ones(numel))


def comm_of(board: Board, seq: int) -> SimpleNamespace:
    return SimpleNamespace(rank=board.rank, size=2, timeout=2.0, _board=board, _seq=seq)


def test_calls_are_numbered_fingerprinted_and_described(boards):
    zero, one = boards
    for seq in (1, 2):
        call(zero, seq, 1000, {"bucket": seq})
        assert not zero.arrived(seq)
        call(one, seq, 1000 + (seq == 2), {"bucket": seq})
        assert zero.arrived(seq) and one.arrived(seq)
    assert zero.agreed(1, zero._me[flight.RING_AT + 1]) and not zero.agreed(2, zero._me[flight.RING_AT + 2])
    assert zero.call(1, 2) == "allreduce(op='sum', algorithm='ring') on float32 (1001,), bucket 2"
    assert zero.fingerprint(1, 2) != zero.fingerprint(0, 2) and zero.fingerprint(1, 3) is None
    one.done(2)
    seen = zero.seen(1)
    assert (seen.entered, seen.done, seen.pid) == (2, 2, os.getpid()) and seen.current.endswith("bucket 2")
    for seq in range(3, 3 + flight.RING):  # the ring forgets a call RING calls later
        call(zero, seq, 7)
    assert zero.call(0, 2) == "" and zero.call(0, 3).endswith("(7,)")


def test_descriptions_are_written_once_and_rewritten_when_overwritten(boards):
    zero, _ = boards
    for seq in range(1, flight.NAMES + 3):
        call(zero, seq, seq)  # a new shape each call: a new description each
    assert zero._named == flight.NAMES + 2
    call(zero, flight.NAMES + 3, 1)  # described long ago, overwritten since: described again
    assert zero._named == flight.NAMES + 3 and zero.call(0, flight.NAMES + 3).endswith("(1,)")


def child(stopped: bool) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    if stopped:
        os.kill(proc.pid, signal.SIGSTOP)
        while stuck.process_state(proc.pid) != "stopped":
            time.sleep(0.01)
    return proc


def test_a_stopped_peer_in_the_call_is_named_and_no_advice_to_wait(boards):
    zero, one = boards
    call(zero, 1, 10, {"bucket": 3})
    call(one, 1, 10, {"bucket": 3})
    proc = child(stopped=True)
    try:
        one._me[flight.PID] = proc.pid
        error = stuck.report(comm_of(zero, 1), "ring step 1/1", [1])
    finally:
        proc.kill()
        proc.wait()
    text = str(error)
    assert isinstance(error, CollectiveTimeout) and error.culprits == (1,) and error.stuck_pids == (proc.pid,)
    assert text.startswith(
        f"ring step 1/1 (call #1): rank 0 waited 2 s for rank(s) [1]: rank 1 is stopped (pid {proc.pid}"
    )
    assert "in call #1 allreduce(op='sum', algorithm='ring') on float32 (10,), bucket 3" in text
    assert "kill -CONT" in text and "DISTRIB_TIMEOUT" not in text


def test_a_dead_or_finished_peer_ends_the_wait_and_a_live_one_does_not(boards):
    zero, one = boards
    call(zero, 1, 10)
    call(one, 1, 10)
    one.done(1)
    call(zero, 2, 10)
    assert not stuck.departed(zero, 2)  # rank 1 is alive, between calls
    proc = child(stopped=False)
    proc.kill()
    proc.wait()
    one._me[flight.PID] = proc.pid
    assert stuck.departed(zero, 2)
    error = stuck.report(comm_of(zero, 2), "allreduce", [1], gone=True)
    assert type(error) is CollectiveError and error.culprits == (1,)
    assert (
        f"rank 0 stops waiting for rank(s) [1]: rank 1 died (pid {proc.pid} is gone) after call #1, before call #2"
        in str(error)
    )
    one._me[flight.PID] = os.getpid()
    one.close()
    assert stuck.departed(zero, 2) and "rank 1 finished: it closed its communicator after call #1" in str(
        stuck.report(comm_of(zero, 2), "allreduce", [1], gone=True)
    )


def test_a_busy_peer_sends_its_stack_and_the_advice_fits(boards):
    zero, one = boards
    call(zero, 1, 10)
    error = stuck.report(comm_of(zero, 1), "allreduce", [1])  # rank 1 never entered: busy, here in this test
    text = str(error)
    assert "rank 1 has not called it: it is alive, busy elsewhere before its first call" in text
    assert "rank 1's Python stack (main thread):" in text and "test_a_busy_peer_sends_its_stack" in text
    assert "raise DISTRIB_TIMEOUT if it is only slow" in text and error.stuck_pids == (os.getpid(),)


def test_a_peer_still_in_the_call_before_is_named_as_held_up_there_not_busy_elsewhere(boards):
    zero, one = boards
    call(zero, 1, 10)
    zero.done(1)
    call(one, 1, 10)  # rank 1 is still in call #1, which rank 0 finished: held up in turn, no stack to ask for
    call(zero, 2, 10)
    error = stuck.report(comm_of(zero, 2), "allreduce", [1])
    text = str(error)
    assert "rank 1 has not called it: it is still in call #1" in text and "which this rank finished" in text, text
    assert "busy elsewhere" not in text and "Python stack" not in text and "raise DISTRIB_TIMEOUT" in text, text
    one.give_up(1)  # its own wait in call #1 failed: it is ending, and its report names whom it waited for
    text = str(stuck.report(comm_of(zero, 2), "allreduce", [1]))
    assert "rank 1 has not called it: it gave up in call #1, which this rank finished" in text, text
    assert "its own report names the rank(s) it waited for" in text and "DISTRIB_TIMEOUT" not in text, text


def test_a_peer_that_does_not_answer_and_one_that_only_waits(boards):
    zero, one = boards
    call(zero, 1, 10)
    call(one, 1, 10)
    text = str(stuck.report(comm_of(zero, 1), "MPI allreduce", [-1]))
    assert "every rank this one can see is in that call and answers" in text and "raise DISTRIB_TIMEOUT" in text
    one._stop.set()  # its recorder thread stops: no heartbeat
    one._me[flight.HEARTBEAT] = time.time_ns() - int(10e9)
    text = str(stuck.report(comm_of(zero, 1), "MPI allreduce", [-1]))
    assert "rank 1 entered call #1 but has not answered for 10" in text and "stuck outside Python" in text


def test_a_rank_cut_off_by_a_fellow_waiters_exit_names_the_rank_both_waited_for():
    """Rank 1 loses its connection to rank 0, whose own wait for the stopped rank 2 failed first: it reports rank 2,
    not rank 0, also when rank 0 says so a moment after rank 1's own deadline (the two deadlines pass together);
    where no peer gave up (a peer that died, a cut link), it says which peer it lost after a bounded look."""
    from distrib.comm.torch_dist import _GAVE_UP_GRACE, TorchCommunicator

    slots = [mmap.mmap(-1, flight.SLOT_BYTES) for _ in range(3)]
    zero, one, two = (Board(r, slots, whole=True) for r in range(3))
    proc = child(stopped=True)
    try:
        for board, pid in ((zero, os.getpid()), (one, os.getpid()), (two, proc.pid)):
            board._me[flight.PID] = pid
            call(board, 1, 10, {"bucket": 3})

        class Closed:
            def wait(self, timeout):
                time.sleep(timeout.total_seconds())  # the connection closes as this rank's deadline passes
                raise RuntimeError("[pair.cc:553] Connection closed by peer [127.0.0.1]:7075")

            def is_completed(self):
                return False

        comm = SimpleNamespace(rank=1, size=3, timeout=0.2, backend="gloo", _board=one, _seq=1)
        start = time.monotonic()
        with pytest.raises(CollectiveError) as lost:
            TorchCommunicator.wait_all(comm, [(Closed(), 0)], "ring step 2/2")
        assert "ring step 2/2: rank 1 lost rank 0 (gloo: [pair.cc:553] Connection closed" in str(lost.value)
        assert lost.value.culprits == () and time.monotonic() - start < comm.timeout + _GAVE_UP_GRACE + 0.5
        later = threading.Timer(comm.timeout + 0.3, zero.give_up, (1,))  # after rank 1's deadline
        later.start()
        with pytest.raises(CollectiveError) as named:
            TorchCommunicator.wait_all(comm, [(Closed(), 0)], "ring step 2/2")
        later.join()
        text = str(named.value)
        assert named.value.culprits == (2,) and named.value.stuck_pids == (proc.pid,)
        assert f"(call #1): rank 1 stops waiting for rank(s) [2]: rank 2 is stopped (pid {proc.pid}" in text
        assert "rank 0 gave up" not in text.splitlines()[0] and "DISTRIB_TIMEOUT" not in text
    finally:
        proc.kill()
        proc.wait()
        for board in (zero, one, two):
            board.close()
