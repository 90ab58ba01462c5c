"""`distrib.init()` and `init_process_group()`, and everything distrib keeps process-wide, in one place.

Process-wide, because a process is one rank of one job:
- `STATE.comm`: the Communicator `init()` built; later calls return it.
- `STATE.torch_group`: the torch.distributed default group `init_process_group` starts next to an "mpi" or
  "local" communicator, so a script's own `dist.*` calls work.
- `STATE.recorder`: the trace being recorded (distrib.tracing), if any.
- `sys.excepthook`: an unhandled exception on any rank is reported once, naming the rank, and takes the whole job
  down (MPI_Abort under an MPI launcher; under torchrun the exit status makes its agent stop the other workers).
  torch.distributed wraps the hook when it starts a group, so ours is installed after it, each time.
- malloc: freed host memory is kept for the next tensors (memory.py), unless DISTRIB_KEEP_MEMORY=0.
- Environment: GLOO_SOCKET_IFNAME, when unset and gloo spans hosts, names the interface that reaches rank 0.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
import traceback
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch

from distrib.comm import CollectiveError, Communicator
from distrib.comm.contract import check_timeout, env_timeout
from distrib.device import choose
from distrib.env import LaunchError, World, read_world
from distrib.memory import keep_freed_memory

BACKENDS = ("mpi", "gloo", "nccl", "local")
CULPRIT_FIRST = 1.0  # seconds before ending a stuck rank, and after: torchrun looks every 0.1 s
TORCH_PORT = 29500  # torch's default MASTER_PORT (and torchrun's --master-port), when the launcher sets none


@dataclass
class _State:
    comm: Communicator | None = None
    torch_group: Communicator | None = None
    recorder: Any = None  # a distrib.tracing.Recorder while a trace records


STATE = _State()


def default_backend(world: World, device: torch.device | None = None) -> str:
    """The backend that follows the device: mpi under mpirun (CUDA tensors staged through pinned host memory
    unless MPI is CUDA-aware); under torchrun nccl when the model is on a GPU, else gloo; local for one process.

    device: where this rank computes; None: --device auto's choice (a GPU per rank on this host, else the CPU).
    """
    if world.is_mpi:
        return "mpi"
    if world.launcher == "none":
        return "local"
    device = device if device is not None else choose("auto", world)
    return "nccl" if device.type == "cuda" else "gloo"


def init(backend: str | None = None, *, timeout: float | None = None, algorithm: str = "native") -> Communicator:
    """The Communicator for this job; the first call builds it, later calls return the same one.

    backend: one of BACKENDS, or None: torch.distributed's default group if the script started one, else chosen
    from the launcher (see `default_backend`).
    timeout: seconds any collective may wait for a peer (DISTRIB_TIMEOUT, else 300).
    algorithm: the algorithm used when a call names none, one of distrib.ALGORITHMS.
    """
    if timeout is not None:  # before anything starts: a NaN must not reach torch ("cannot convert float NaN")
        timeout = check_timeout(timeout, "distrib.init(timeout={!r})")
    if STATE.comm is not None:
        if backend not in (None, STATE.comm.backend):
            raise RuntimeError(
                f"distrib is already initialised with backend {STATE.comm.backend!r}, not {backend!r}; "
                "call distrib.init() once per process"
            )
        return STATE.comm
    timeout = env_timeout() if timeout is None else timeout
    keep_freed_memory()  # a training step's tensors reuse the last step's pages (memory.py)
    if backend is None:  # a script that started torch.distributed itself: distrib goes over the group it made
        from distrib.comm.torch_dist import started_group

        STATE.comm = started_group(timeout, algorithm)
        if STATE.comm is not None:
            return STATE.comm
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
    STATE.comm = comm
    _take_job_down_on_failure(world)
    return comm


def _mpi(world: World, timeout: float | None, algorithm: str) -> Communicator:
    if not world.is_mpi and world.size > 1:
        raise LaunchError(
            f"backend 'mpi' needs an MPI launcher, but this job was started by {world.launcher}; "
            "launch with `mpirun -n N ...` or choose backend 'gloo'"
        )
    from distrib.comm.mpi import MPICommunicator

    return MPICommunicator(timeout=timeout, algorithm=algorithm)


def _torch(backend: str, world: World, timeout: float | None, algorithm: str) -> Communicator:
    from distrib.comm.torch_dist import TorchCommunicator, rendezvous

    if backend == "nccl" and not torch.cuda.is_available():
        raise LaunchError("backend 'nccl' needs a CUDA GPU on every rank; none is visible here, use 'gloo'")
    store, master = None, None
    if world.is_mpi:  # find each other through MPI: no MASTER_ADDR for the user to set
        from distrib.comm.mpi import MPICommunicator

        bootstrap = MPICommunicator(timeout=timeout)
        _take_job_down_on_failure(world)
        store = rendezvous(bootstrap)
        bootstrap.close()
    elif world.size > 1 and world.master_addr is None:
        raise LaunchError(
            f"{world.launcher} started {world.size} ranks but MASTER_ADDR is not set; export MASTER_ADDR "
            "(the first host) and MASTER_PORT, or launch with torchrun or mpirun"
        )
    elif world.size > 1:
        master = (world.master_addr, world.master_port or TORCH_PORT)
    return TorchCommunicator(
        backend, world.rank, world.size, store=store, master=master, local_rank=world.local_rank, timeout=timeout,
        algorithm=algorithm,
    )  # fmt: skip


def _take_job_down_on_failure(world: World) -> None:
    """Report an unhandled exception once, naming this rank, then end the whole job (see the module docstring).

    When it is a failed collective whose report names the ranks at fault, the first line names them, so that neither the
    reader nor the launcher blames a healthy rank; under torchrun those that are stuck on this host are ended
    first, a moment before this rank, so that torchrun's "root cause" is theirs (it names the first to fail).
    """

    def hook(kind, value, tb) -> None:
        err = sys.__stderr__  # the real stream: wrappers (torch.distributed's) may buffer sys.stderr
        culprits = value.culprits if isinstance(value, CollectiveError) else ()
        if culprits:
            header = (
                f"distrib: rank(s) {list(culprits)} of {world.size} stopped the job: rank {world.rank} gave up "
                "waiting for them (the report below says where each rank is); the job is going down\n"
            )
        else:
            header = f"distrib: rank {world.rank} of {world.size} failed; the job is going down\n"
        # One write: line by line, the launcher could kill the job after forwarding the first line only.
        err.write(header + "".join(traceback.format_exception(kind, value, tb)))
        err.flush()
        if world.is_mpi:
            from distrib.comm.mpi import abort_job

            abort_job()
        elif world.launcher == "torchrun" and culprits:
            _end_first(value.stuck_pids)

    sys.excepthook = hook


def _end_first(pids: tuple[int, ...]) -> None:
    """SIGKILL the stuck ranks of this host, then give torchrun time to see them go before this rank does.

    A pause first, for the other survivors to write their reports while the stuck ranks are as they were."""
    if pids:
        time.sleep(CULPRIT_FIRST)
    for pid in pids:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    if pids:
        time.sleep(CULPRIT_FIRST)


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
    if seconds is not None:
        seconds = check_timeout(seconds, "init_process_group(timeout={!r})")  # a timedelta: its seconds
    comm = init(backend, timeout=seconds, algorithm=algorithm)
    if comm.backend in ("mpi", "local") and STATE.torch_group is None:
        from distrib.comm.torch_dist import TorchCommunicator, rendezvous

        STATE.torch_group = TorchCommunicator("gloo", comm.rank, comm.size, store=rendezvous(comm),
                                              timeout=comm.timeout, private=False)  # fmt: skip
        STATE.torch_group.barrier()  # a rank may finish connecting before its peers; leaving at once breaks theirs
        comm.process_group = STATE.torch_group.process_group  # torch's Join and comm hooks take it
        _take_job_down_on_failure(world)
    return comm
