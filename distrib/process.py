"""`distrib.init()`: read who we are from the launcher and build the matching Communicator, once."""

from __future__ import annotations

import os
import sys
import traceback
from datetime import timedelta

import torch

from distrib.comm import Communicator
from distrib.env import LaunchError, World, read_world

BACKENDS = ("mpi", "gloo", "nccl", "local")

# The one communicator `init()` hands out, so repeated calls (and libraries calling it) share it.
_initialised: Communicator | None = None


def default_backend(world: World) -> str:
    """mpi under mpirun; nccl under torchrun when this rank has a GPU; gloo otherwise; local for one process."""
    if world.is_mpi:
        return "mpi"
    if world.launcher == "none":
        return "local"
    if torch.cuda.is_available() and torch.cuda.device_count() > world.local_rank:
        return "nccl"
    return "gloo"


def init(backend: str | None = None, *, timeout: float | None = None, algorithm: str = "native") -> Communicator:
    """The Communicator for this job; the first call builds it, later calls return the same one.

    backend: "mpi", "gloo", "nccl", "local" or None (chosen from the launcher, see `default_backend`).
    timeout: seconds any collective may wait for a peer (DISTRIB_TIMEOUT, else 300).
    algorithm: the allreduce used when a call names none: "native", "ring" or "naive".
    """
    global _initialised
    if _initialised is not None:
        if backend not in (None, _initialised.backend):
            raise RuntimeError(
                f"distrib is already initialised with backend {_initialised.backend!r}, not {backend!r}; "
                "call distrib.init() once per process"
            )
        return _initialised
    world = read_world()
    backend = backend or default_backend(world)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}; got {backend!r}")
    if backend == "local":
        if world.size != 1:
            raise LaunchError(f"backend 'local' is for one process, but {world.launcher} started {world.size}")
        from distrib.comm.local import LocalCommunicator

        comm: Communicator = LocalCommunicator(timeout=timeout, algorithm=algorithm)
    elif backend == "mpi":
        comm = _mpi(world, timeout, algorithm)
    else:
        comm = _torch(backend, world, timeout, algorithm)
    _initialised = comm
    return comm


def _mpi(world: World, timeout: float | None, algorithm: str) -> Communicator:
    if not world.is_mpi and world.size > 1:
        raise LaunchError(
            f"backend 'mpi' needs an MPI launcher, but this job was started by {world.launcher}; "
            "launch with `mpirun -n N ...` or choose backend 'gloo'"
        )
    from distrib.comm.mpi import MPICommunicator, abort_on_exception

    comm = MPICommunicator(timeout=timeout, algorithm=algorithm)
    abort_on_exception(comm.rank, comm.size)
    return comm


def _torch(backend: str, world: World, timeout: float | None, algorithm: str) -> Communicator:
    from distrib.comm.torch_dist import TorchCommunicator, rendezvous

    if backend == "nccl" and not torch.cuda.is_available():
        raise LaunchError("backend 'nccl' needs a CUDA GPU on every rank; none is visible here, use 'gloo'")
    if world.is_mpi:  # find each other through MPI: no MASTER_ADDR for the user to set
        from distrib.comm.mpi import MPICommunicator, abort_on_exception

        bootstrap = MPICommunicator(timeout=timeout)
        abort_on_exception(bootstrap.rank, bootstrap.size)
        store = rendezvous(bootstrap)
        bootstrap.close()
    elif world.size > 1 and world.master_addr is None:
        raise LaunchError(
            f"{world.launcher} started {world.size} ranks but MASTER_ADDR is not set; export MASTER_ADDR "
            "(the first host) and MASTER_PORT, or launch with torchrun or mpirun"
        )
    elif world.size > 1:
        os.environ.setdefault("MASTER_PORT", "29500")
        store = None  # torch reads MASTER_ADDR and MASTER_PORT
    else:
        from torch.distributed import HashStore

        store = HashStore()  # one process: nothing to meet
    comm = TorchCommunicator(
        backend,
        world.rank,
        world.size,
        store=store,
        local_rank=world.local_rank,
        timeout=timeout,
        algorithm=algorithm,
    )
    # torch.distributed has just wrapped sys.excepthook; ours goes outermost so the failing rank is named.
    if world.is_mpi:
        abort_on_exception(comm.rank, comm.size)
    else:
        _report_failures(world)
    return comm


def _report_failures(world: World) -> None:
    """Prefix an unhandled exception with the failing rank; torchrun then stops the other ranks."""
    previous = sys.excepthook
    if getattr(previous, "_distrib", False):
        return

    def hook(kind, value, tb) -> None:
        sys.stderr.write(f"distrib: rank {world.rank} of {world.size} failed\n")
        traceback.print_exception(kind, value, tb)
        sys.stderr.flush()

    hook._distrib = True  # type: ignore[attr-defined]
    sys.excepthook = hook


# The torch.distributed default group that init_process_group starts next to an "mpi" or "local" communicator.
_torch_group: Communicator | None = None


def init_process_group(
    backend: str | None = None,
    init_method: str | None = None,
    timeout: float | timedelta | None = None,
    world_size: int = -1,
    rank: int = -1,
    *,
    algorithm: str = "native",
) -> Communicator:
    """A drop-in for `torch.distributed.init_process_group`: builds distrib's Communicator (see `init`) and makes
    sure torch.distributed's default group exists, so a script's `dist.get_rank()`, `dist.barrier()` and
    DistributedSampler keep working under mpirun and torchrun alike.

    backend "gloo" or "nccl": that Communicator is the default group (under mpirun found through MPI, no
    MASTER_ADDR needed). "mpi": torch is rarely built with MPI, so distrib's collectives (and its DDP) go over
    mpi4py, and a gloo default group, found through MPI, serves the script's own dist.* calls. None: the
    launcher's default (`default_backend`), with a gloo default group next to "mpi" or "local" the same way.
    Returns the Communicator (torch's returns None).
    """
    global _torch_group
    world = read_world()
    if init_method not in (None, "env://"):
        raise ValueError(
            f"init_method={init_method!r} is not supported: distrib finds the other ranks through the launcher "
            "(torchrun's MASTER_ADDR/MASTER_PORT, or MPI); leave init_method None"
        )
    for name, given, actual in (("world_size", world_size, world.size), ("rank", rank, world.rank)):
        if given not in (-1, actual):
            raise ValueError(
                f"{name}={given}, but the launcher ({world.launcher}) made this process's {name} {actual}; omit it"
            )
    seconds = timeout.total_seconds() if isinstance(timeout, timedelta) else timeout
    comm = init(backend, timeout=seconds, algorithm=algorithm)
    if comm.backend in ("mpi", "local") and _torch_group is None:
        from distrib.comm.torch_dist import TorchCommunicator, rendezvous

        _torch_group = TorchCommunicator("gloo", comm.rank, comm.size, store=rendezvous(comm), timeout=comm.timeout)
        _torch_group.barrier()  # a rank may finish connecting before its peers; leaving at once would break theirs
        if comm.backend == "mpi":  # torch.distributed has just wrapped sys.excepthook; ours goes outermost
            from distrib.comm.mpi import abort_on_exception

            abort_on_exception(comm.rank, comm.size)
    return comm
