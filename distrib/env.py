"""Who am I: rank, world size, local rank and the master address, read from the launcher's environment.

Reads environment variables only (no MPI, no torch.distributed), so any launcher works: MPICH and Open MPI's
mpirun, torchrun, Slurm's srun, or a plain `python` (rank 0 of 1).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass


class LaunchError(RuntimeError):
    """The launcher's environment is missing a variable, or its values contradict each other."""


@dataclass(frozen=True)
class World:
    """This process's place in the job, as the launcher described it."""

    rank: int
    size: int
    local_rank: int
    local_size: int | None
    launcher: str  # "none", "mpich", "openmpi", "torchrun" or "slurm"
    master_addr: str | None = None
    master_port: int | None = None

    def __post_init__(self) -> None:
        if self.size < 1:
            raise LaunchError(f"{self.launcher}: world size must be at least 1, got {self.size}")
        if not 0 <= self.rank < self.size:
            raise LaunchError(f"{self.launcher}: rank {self.rank} is outside a world of size {self.size}")
        if self.local_rank < 0 or (self.local_size is not None and self.local_rank >= self.local_size):
            raise LaunchError(
                f"{self.launcher}: local rank {self.local_rank} is outside {self.local_size} local processes"
            )

    @property
    def is_mpi(self) -> bool:
        """True when an MPI launcher started this process, so MPI can be initialised."""
        return self.launcher in ("mpich", "openmpi")


# Each launcher's variables: (rank, size, local rank, local size).
_SOURCES = {
    "torchrun": ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"),
    "mpich": ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS"),
    "openmpi": (
        "OMPI_COMM_WORLD_RANK",
        "OMPI_COMM_WORLD_SIZE",
        "OMPI_COMM_WORLD_LOCAL_RANK",
        "OMPI_COMM_WORLD_LOCAL_SIZE",
    ),
    "slurm": ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_NTASKS_PER_NODE"),
}


def _int(env: Mapping[str, str], name: str, launcher: str) -> int:
    value = env[name]
    try:
        return int(value)
    except ValueError:
        raise LaunchError(f"{launcher}: {name}={value!r} is not an integer") from None


def _read(env: Mapping[str, str], launcher: str) -> World | None:
    rank_var, size_var, local_var, local_size_var = _SOURCES[launcher]
    if rank_var not in env and size_var not in env:
        return None
    for var in (rank_var, size_var):
        if var not in env:
            other = size_var if var == rank_var else rank_var
            raise LaunchError(f"{launcher}: {other} is set but {var} is not; set both or neither")
    local_size = None
    if local_size_var in env:
        # Slurm writes per-node counts like "2(x3)"; the first number is this layout's local size.
        match = re.match(r"\d+", env[local_size_var])
        local_size = int(match.group()) if match else None
    local_rank = _int(env, local_var, launcher) if local_var in env else 0
    port = env.get("MASTER_PORT")
    return World(
        rank=_int(env, rank_var, launcher),
        size=_int(env, size_var, launcher),
        local_rank=local_rank,
        local_size=local_size,
        launcher=launcher,
        master_addr=env.get("MASTER_ADDR") or None,
        master_port=int(port) if port and port.isdigit() else None,
    )


def read_world(env: Mapping[str, str] | None = None) -> World:
    """This process's World from the environment (os.environ by default).

    torchrun's variables win over MPI's (torchrun may itself be started by mpirun, one per host), MPI's over
    Slurm's (mpirun inside an sbatch script sees SLURM_PROCID=0 everywhere). Values that contradict each other
    at the same world size, such as RANK set by hand to something other than PMI_RANK, are an error.
    """
    env = os.environ if env is None else env
    found = {name: world for name in _SOURCES if (world := _read(env, name)) is not None}
    mpi = [found[n] for n in ("mpich", "openmpi") if n in found]
    if len(mpi) == 2 and (mpi[0].rank, mpi[0].size) != (mpi[1].rank, mpi[1].size):
        raise LaunchError(
            f"MPICH says rank {mpi[0].rank} of {mpi[0].size} but Open MPI says rank {mpi[1].rank} of "
            f"{mpi[1].size}; unset the variables of the MPI that did not launch this job"
        )
    if "torchrun" in found and mpi:
        t, m = found["torchrun"], mpi[0]
        if t.size == m.size and t.rank != m.rank:
            raise LaunchError(
                f"RANK={t.rank} contradicts {m.launcher}'s rank {m.rank} in a world of {t.size}; "
                "do not set RANK by hand under mpirun"
            )
    for name in ("torchrun", "mpich", "openmpi", "slurm"):
        if name in found:
            return found[name]
    return World(rank=0, size=1, local_rank=0, local_size=1, launcher="none")
