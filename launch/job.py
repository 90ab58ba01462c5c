"""What the user asked for: N ranks of a command, on this machine or on named hosts; and what can be wrong."""

from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass


class UsageError(ValueError):
    """A bad option or a missing launcher; the message names the option (or program) and the fix."""


@dataclass(frozen=True)
class Host:
    """One machine and the number of ranks (slots) it runs."""

    name: str
    slots: int


@dataclass(frozen=True)
class Job:
    """N ranks of `command`; `hosts` empty means all on this machine. `hostfile` is where hosts came from."""

    nprocs: int
    command: tuple[str, ...]
    hosts: tuple[Host, ...] = ()
    hostfile: str | None = None
    node_rank: int | None = None
    rdzv_endpoint: str | None = None

    def __post_init__(self) -> None:
        if self.nprocs < 1:
            raise UsageError(f"-n must be at least 1, got {self.nprocs}")
        if not self.command:
            raise UsageError("no command after --; e.g. python -m launch -n 2 -- python train.py")
        total = sum(host.slots for host in self.hosts)
        if self.hosts and total != self.nprocs:
            source = f"--hostfile {self.hostfile}" if self.hostfile else "--hosts"
            raise UsageError(
                f"{source} gives {total} slots ({self.layout}) but -n is {self.nprocs}; make the slots add up to -n"
            )
        if self.node_rank is not None and not self.hosts:
            raise UsageError("--node-rank needs --hosts or --hostfile: it says which of those hosts this one is")
        if self.node_rank is not None and not 0 <= self.node_rank < len(self.hosts):
            raise UsageError(
                f"--node-rank {self.node_rank} is not the index of a host in --hosts/--hostfile "
                f"({len(self.hosts)} hosts, so 0..{len(self.hosts) - 1})"
            )

    @property
    def layout(self) -> str:
        """The hosts as `a:2,b:2`, the form MPICH's -hosts and Open MPI's --host both take."""
        return ",".join(f"{host.name}:{host.slots}" for host in self.hosts)


def find_program(*names: str) -> str | None:
    """The first of `names` next to this interpreter, then on PATH.

    Next to the interpreter first: pip puts console scripts in the environment's bin (the mpich wheel's
    mpiexec, torch's torchrun), and that environment need not be on PATH.
    """
    here = os.path.dirname(sys.executable)
    for name in names:
        path = os.path.join(here, name)
        if os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    for name in names:
        if found := shutil.which(name):
            return found
    return None
