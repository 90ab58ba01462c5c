"""Ending a job on purpose or by accident: a signal asks every rank to stop after the current step, and a rank
that dies is named, by its own watcher under MPICH or by the survivors' failed collective elsewhere.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import sys
import time
from types import FrameType

from distrib.comm import Communicator
from distrib.env import LaunchError, read_world

_PR_SET_PDEATHSIG = 1  # linux/prctl.h


class StopSignals:
    """SIGINT and SIGTERM, caught: the loop polls `stop()` (the signal's number, 0 while none came) at each step.

    Later signals change nothing: launchers often deliver one signal twice (to the process group and through a
    watcher), and a second Ctrl-C must not cut the final checkpoint short. SIGKILL ends a process at once.
    """

    def __init__(self, signals: tuple[int, ...] = (signal.SIGINT, signal.SIGTERM)) -> None:
        self.signals, self.received, self._previous = signals, 0, {}

    def __enter__(self) -> StopSignals:
        self._previous = {s: signal.signal(s, self._handle) for s in self.signals}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def __call__(self) -> int:
        return self.received

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received = self.received or signum


class Peers:
    """Every rank's host and process id, gathered while all are alive, to name the ones that die later."""

    def __init__(self, comm: Communicator) -> None:
        self.rank = comm.rank
        self.table: list[tuple[str, int]] = comm.allgather_object((socket.gethostname(), os.getpid()))

    def lost(self, wait: float = 1.0) -> list[int]:
        """The ranks on this host whose process has ended (other hosts' cannot be seen from here).

        A peer's sockets close while it is still being torn down, so a failed collective may come first: look
        again for up to `wait` seconds.
        """
        host = self.table[self.rank][0]
        deadline = time.monotonic() + wait
        while True:
            lost = [r for r, (h, pid) in enumerate(self.table) if h == host and r != self.rank and not _alive(pid)]
            if lost or time.monotonic() > deadline:
                return lost
            time.sleep(0.05)

    def describe_lost(self) -> str:
        """'rank 1 (pid 123 on host) has died', or '' when no rank on this host has."""
        lost = self.lost()
        if not lost:
            return ""
        who = ", ".join(f"rank {r} (pid {self.table[r][1]} on {self.table[r][0]})" for r in lost)
        return f"{who} {'has' if len(lost) == 1 else 'have'} died"


def _alive(pid: int) -> bool:
    """Whether process `pid` runs; a zombie (dead, not yet reaped by its launcher) counts as dead."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except FileNotFoundError:
        return False
    except OSError:  # no /proc: ask the kernel whether the pid exists
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True


def watch_rank() -> None:
    """Under MPICH, fork: the child runs this rank on, the parent waits and names it if it dies by a signal.

    MPICH's hydra ends the whole job the moment a rank dies by a signal, before any survivor can time out, and
    its message gives the PID of rank 0 whichever rank died. The parent turns that death into a line naming
    the rank and an ordinary exit (128 + signal, as a shell reports it); hydra then stops the others. Call it
    first thing, before MPI or torch start threads.
    """
    try:
        world = read_world()
    except LaunchError:
        return  # distrib.init reports it
    if world.launcher != "mpich" or world.size == 1 or not sys.platform.startswith("linux"):
        return
    parent = os.getpid()
    child = os.fork()
    if child == 0:
        # If hydra kills the watcher, its rank goes with it: no orphan keeps computing.
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:
            os._exit(1)
        return
    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2):  # hydra signals us; the rank decides
        signal.signal(s, lambda signum, _: os.kill(child, signum))
    code = os.waitstatus_to_exitcode(os.waitpid(child, 0)[1])  # -N: killed by signal N
    if code < 0:
        sys.stderr.write(
            f"distrib: rank {world.rank} of {world.size} (pid {child} on {socket.gethostname()}) was killed by "
            f"signal {-code} ({signal.Signals(-code).name}); the job is going down\n"
        )
        sys.stderr.flush()
    os._exit(128 - code if code < 0 else code)
