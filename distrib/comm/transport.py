"""What a transport implements: point-to-point calls for the Python algorithms, the library's own ("native")
collectives, and where tensors must live for it to touch them. The Communicator (base.py) builds every public
collective on these, once. A transport's `backend` is its name ("mpi", "gloo", "nccl", "local"), as
torch.distributed names its backends.
"""

from __future__ import annotations

import abc
import pickle
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from distrib.comm.contract import Array, CollectiveTimeout

Request = Any  # a transport's in-flight operation
Pending = list[tuple[Request, int]]  # in-flight operations, each with the peer it waits for (-1: any of them)


class Transport(abc.ABC):
    """The part of a Communicator that differs from one transport (MPI, gloo, NCCL, one process) to another."""

    backend = "abstract"  # the transport's name
    devices: tuple[str, ...] = ("cpu",)  # device types the transport reads and writes directly
    device: torch.device  # where it stages other tensors when it reads no CPU memory (NCCL's GPU)
    spins = False  # whether our own waits may spin: False where the library's threads need the cores (gloo)
    starts_early = False  # whether a tensor collective may start before every rank is in it (verify.start_early)
    rank: int
    size: int
    timeout: float  # seconds every wait may take

    # Point-to-point: all the Python algorithms need.

    @abc.abstractmethod
    def post(
        self, sends: Sequence[tuple[torch.Tensor, int]] = (), recvs: Sequence[tuple[torch.Tensor, int]] = ()
    ) -> Pending:
        """Start sends and receives of contiguous tensors together (NCCL needs them grouped)."""

    @abc.abstractmethod
    def wait_all(self, pending: Pending, what: str) -> None:
        """Wait until the deadline, else raise CollectiveTimeout naming `what` and the peers not heard from."""

    def _timeout(self, what: str, missing: Iterable[int]) -> CollectiveTimeout:
        """The error for peers that did not arrive in time (-1 stands for a native collective's 'someone')."""
        missing = sorted(set(missing))
        who = "the other ranks" if -1 in missing or not missing else f"rank(s) {missing}"
        return CollectiveTimeout(
            f"{what}: rank {self.rank} waited {self.timeout:g} s for {who}; a rank died, hangs, or called a "
            "different collective (raise DISTRIB_TIMEOUT if it is only slow)"
        )

    # The library's own collectives, on contiguous tensors of a supported device; op is sum, max or min.

    @abc.abstractmethod
    def _native_allreduce(self, flat: torch.Tensor, op: str) -> None: ...

    @abc.abstractmethod
    def _native_reduce_scatter(self, flat: torch.Tensor, out: torch.Tensor, op: str) -> None: ...

    @abc.abstractmethod
    def _native_allgather(self, shard: torch.Tensor, out: torch.Tensor) -> None: ...

    @abc.abstractmethod
    def _native_broadcast(self, t: torch.Tensor, root: int) -> None: ...

    @abc.abstractmethod
    def _native_barrier(self) -> None: ...

    def split(self, color: int, key: int) -> Transport:
        """The ranks that pass the same `color`, ranked by `key`, as a communicator of their own (MPI_Comm_split).

        Collective: every rank calls it, at the same point.
        """
        raise NotImplementedError(f"{type(self).__name__} cannot split")

    def close(self) -> None:  # noqa: B027 -- most transports hold nothing to release
        """Release the transport's resources; the communicator must not be used afterwards."""

    # Where tensors must be for the transport, and what it offers beyond the rest.

    def _array(self, flat: torch.Tensor) -> Array:
        """What the Python algorithms work on: the tensor itself, unless the transport takes a cheaper view."""
        return flat

    def _staged(self, t: torch.Tensor, copy_in: bool = True, host: bool = False) -> torch.Tensor:
        """`t` itself when the transport can use it, else a contiguous copy where it can: pinned host memory for a
        CUDA tensor (MPI without CUDA support, gloo), the GPU for a CPU tensor (NCCL). host: the algorithm works in
        host memory (shm), whatever the transport reads."""
        usable = "cpu" in self.devices if t.is_cpu else not host and t.device.type in self.devices
        if t.is_contiguous() and usable:
            return t
        if usable:
            device = t.device
        else:
            device = torch.device("cpu") if host or "cpu" in self.devices else self.device
        pin = device.type == "cpu" and t.device.type == "cuda"
        work = torch.empty(t.shape, dtype=t.dtype, device=device, pin_memory=pin)
        if copy_in:
            work.copy_(t)
        return work

    def _vote(self, kind: Any, t: torch.Tensor | None) -> int:
        """This rank's say, on the flight recorder's board as it enters a call of `kind` (kinds.Kind) on `t`, in a
        decision every rank must make alike (`_restart`); 0: no part in it."""
        return 0

    def _restart(self, kind: Any, flat: torch.Tensor, op: str) -> bool:
        """Make the allreduce of the call entered last (`flat`, a call of `kind`) by restarting what an earlier call
        of that kind saved, where every rank's vote lets it; False: not made, run the algorithm."""
        return False

    def shared_zeros(self, numel: int, dtype: torch.dtype) -> torch.Tensor | None:
        """Collective: a zeroed CPU tensor in memory every rank maps, which algorithm "shm" reduces where it lies
        (no staging copy); None where the transport has no such memory (then use any tensor)."""
        return None

    def _shm_unavailable(self) -> str:
        """Why this communicator cannot run algorithm "shm" ("" when it can)."""
        return f"needs the mpi backend (ranks sharing memory through MPI-3 windows), not {self.backend!r}"

    def _shm(self) -> Any:
        """The shared-memory collectives (distrib.comm.shm.SharedMemory) of a transport that has them."""
        raise NotImplementedError(f"{type(self).__name__} has no shared-memory collectives")

    def _allgather_object(self, obj: Any) -> list[Any]:
        """Every rank's picklable `obj`, by rank, over the native allgather: its length, then its bytes."""
        if self.size == 1:
            return [obj]
        data = pickle.dumps(obj)
        lengths = torch.zeros(self.size, dtype=torch.int64, device=self.device)
        self._native_allgather(torch.tensor([len(data)], device=self.device), lengths)
        width = int(lengths.max())
        mine = torch.zeros(width, dtype=torch.uint8)
        mine[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else mine[:0]
        everyone = torch.empty(width * self.size, dtype=torch.uint8, device=self.device)
        self._native_allgather(mine.to(self.device), everyone)
        everyone = everyone.cpu()
        parts = [everyone[r * width : r * width + int(n)] for r, n in enumerate(lengths.tolist())]
        return [pickle.loads(part.numpy().tobytes()) for part in parts]
