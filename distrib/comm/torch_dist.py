"""The torch.distributed backend: gloo (CPU) and NCCL (CUDA), beside the default process group.

distrib starts torch.distributed's default group (or takes the one a script started), so a torch script's own
`dist.get_rank()`, `dist.barrier()` and DistributedSampler keep working next to distrib; its own collectives go over
a group of their own over the same ranks. Collectives a script issues on the default group while distrib's are in
flight (a comm hook's, or an autograd function's in backward, from autograd's thread, while distrib's engine thread
issues the buckets') then cannot pair up with ours in a different order on different ranks. Under mpirun,
`rendezvous` finds the address through MPI, so the user sets no MASTER_ADDR or MASTER_PORT.
"""

from __future__ import annotations

import atexit
import fcntl
import os
import socket
import struct
import time
from collections.abc import Sequence
from datetime import timedelta
from functools import partial
from typing import Any

import torch
import torch.distributed as dist

from distrib.comm import stuck
from distrib.comm.base import Communicator
from distrib.comm.contract import CollectiveError, env_timeout, poll
from distrib.comm.transport import Pending, Request

_RELEASE_GRACE = 0.1  # seconds, at close: see TorchCommunicator.close
# Seconds a rank that lost a peer looks on the board for a fellow waiter that gave up first: counted from the loss,
# not capped by this rank's own deadline, which passes at about the moment the fellow's does and cuts it off.
_GAVE_UP_GRACE = 1.0
# Linux's ioctl(SIOCGIFADDR): a struct ifreq in, the name (at most IFNAMSIZ - 1 bytes) first; out, the address as
# a struct sockaddr_in at byte 16, whose IPv4 address sits 4 bytes in.
_SIOCGIFADDR, _IFNAMSIZ, _IFREQ_ADDRESS = 0x8915, 16, slice(20, 24)
_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
_TWINS: dict[int, tuple[dist.ProcessGroup, dist.ProcessGroup]] = {}  # a script's group -> distrib's twin of it


class TorchCommunicator(Communicator):
    """Collectives over torch.distributed's default process group (initialised here if it is not yet), or over a
    group the caller made (`TorchCommunicator.over`)."""

    def __init__(
        self,
        backend: str,
        rank: int,
        size: int,
        *,
        store: dist.Store | None = None,
        master: tuple[str, int] | None = None,
        local_rank: int = 0,
        timeout: float | None = None,
        algorithm: str = "native",
        group: dist.ProcessGroup | None = None,
        private: bool = True,
    ) -> None:
        """Meet the other ranks at `store`, or else at rank 0's `master` (host, port) as torch's tcp:// does
        (under torchrun, through its agent's store); a world of one needs neither. With `group`, use that group.
        `private`: distrib's collectives over a group of their own beside the default one (see the docstring)."""
        self.backend = backend
        super().__init__(rank, size, timeout=timeout, algorithm=algorithm)  # checks the timeout before torch sees it
        self._group = group  # None: the default group
        self._made_default = False
        # gloo is slower to start a collective on ranks that start together than to let the first start at once
        # (verify.start_early); NCCL's kernels would need the same stand-in on the GPU, untried.
        self.starts_early = backend == "gloo"
        if backend == "nccl":
            self.device = torch.device("cuda", local_rank if group is None else torch.cuda.current_device())
            self.devices = ("cuda",)
            torch.cuda.set_device(self.device)
        if group is not None:
            self.process_group = group
            self.open_flight()
            atexit.register(self.close)  # the grace below, also when the script ends its groups itself
            return
        self._made_default = not dist.is_initialized()
        if self._made_default:
            if store is None and size == 1:
                store = dist.HashStore()  # one process: nothing to meet
            if store is None and master is None:
                raise CollectiveError(f"{size} ranks need a store or rank 0's (host, port) to meet at")
            if backend == "gloo" and size > 1:
                _gloo_interface_toward(store.host if isinstance(store, dist.TCPStore) else master[0])
            init_method = None if store is not None else f"tcp://{_bracketed(master[0])}:{master[1]}"
            dist.init_process_group(
                backend, init_method, store=store, rank=rank, world_size=size, timeout=timedelta(seconds=self.timeout)
            )
            atexit.register(self.close)  # a gloo group left open at exit can abort the process
        elif (dist.get_rank(), dist.get_world_size()) != (rank, size):
            raise CollectiveError(
                f"torch.distributed is already initialised as rank {dist.get_rank()} of "
                f"{dist.get_world_size()}, but this process is rank {rank} of {size}"
            )
        self.process_group = dist.group.WORLD  # torch's utilities (Join) and a script's comm hooks take it
        self._group = _twin(dist.group.WORLD, self.timeout) if private and size > 1 else None  # None: the default
        self.open_flight()

    def _flight_store(self) -> dist.Store:
        return dist.distributed_c10d._get_default_store()  # under torchrun, its agent's: alive while ranks stop

    @classmethod
    def over(
        cls, group: Any, timeout: float | None = None, algorithm: str = "native", private: bool = True
    ) -> TorchCommunicator:
        """A communicator over the ranks of a torch.distributed group made elsewhere (dist.new_group, a DDP's
        process_group); `private`: its collectives over a twin of that group, made once, so that the script's own
        on the group (a comm hook's, its state that group) never pair up with ours (see the module docstring)."""
        if not isinstance(group, dist.ProcessGroup):
            raise TypeError(
                f"process_group must be a torch.distributed ProcessGroup or a distrib Communicator, got "
                f"{type(group).__name__}"
            )
        own = _twin(group, timeout or env_timeout()) if private and group.size() > 1 else group
        comm = cls(str(dist.get_backend(group)), group.rank(), group.size(), timeout=timeout, algorithm=algorithm,
                   group=own)  # fmt: skip
        comm.process_group = group  # torch's utilities and the script's hooks take the script's group
        return comm

    def post(
        self, sends: Sequence[tuple[torch.Tensor, int]] = (), recvs: Sequence[tuple[torch.Tensor, int]] = ()
    ) -> Pending:
        ops = [dist.P2POp(dist.irecv, t, group=self._group, group_peer=src) for t, src in recvs]
        ops += [dist.P2POp(dist.isend, t, group=self._group, group_peer=dst) for t, dst in sends]
        peers = [src for _, src in recvs] + [dst for _, dst in sends]
        return list(zip(dist.batch_isend_irecv(ops), peers)) if ops else []

    def wait_all(self, pending: Pending, what: str) -> None:
        deadline = time.monotonic() + self.timeout
        for work, peer in pending:
            left = max(deadline - time.monotonic(), 0.001)
            try:
                work.wait(timeout=timedelta(seconds=left))
            except RuntimeError as error:
                text = str(error).splitlines()[0] if str(error) else type(error).__name__
                if "timed out" in text.lower() or "timeout" in text.lower():
                    missing = [p for w, p in pending if not w.is_completed()] or [peer]
                    raise self._timeout(f"{what} ({self.backend}: {text})", missing) from error
                who = "another rank" if peer < 0 else f"rank {peer}"
                lost = f"{what}: rank {self.rank} lost {who} ({self.backend}: {text})"
                # A peer whose own wait failed first may have cut us off by ending; it can say so a moment after
                # the connection closes. Then the board names the ranks everyone waited for, not that fellow.
                board = self._board
                if board is not None and poll(partial(stuck.gave_up, board, self._seq), _GAVE_UP_GRACE, False):
                    found = stuck.report(self, lost, [peer], gone=True)
                    if found.culprits:
                        raise found from error
                raise CollectiveError(lost) from error

    def _wait(self, work: Request, what: str) -> None:
        self.wait_all([(work, -1)], f"{self.backend} {what}")

    def _native_allreduce(self, flat: torch.Tensor, op: str) -> None:
        self._wait(dist.all_reduce(flat, op=_OPS[op], group=self._group, async_op=True), "allreduce")

    def _native_reduce_scatter(self, flat: torch.Tensor, out: torch.Tensor, op: str) -> None:
        if self.backend == "gloo":  # gloo has no reduce_scatter: reduce everything, keep our part
            self._native_allreduce(flat, op)
            out.copy_(flat[self.rank * out.numel() : (self.rank + 1) * out.numel()])
            return
        self._wait(
            dist.reduce_scatter_tensor(out, flat, op=_OPS[op], group=self._group, async_op=True), "reduce_scatter"
        )

    def _native_allgather(self, shard: torch.Tensor, out: torch.Tensor) -> None:
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # renamed in torch 2.10+
        self._wait(gather(out, shard.clone(), group=self._group, async_op=True), "allgather")

    def _native_broadcast(self, t: torch.Tensor, root: int) -> None:
        self._wait(dist.broadcast(t, group=self._group, async_op=True, group_src=root), f"broadcast from rank {root}")

    def _native_barrier(self) -> None:
        token = torch.zeros(1, device=self.device)
        self._native_allreduce(token, "sum")  # an allreduce, because gloo's barrier ignores wait timeouts

    def split(self, color: int, key: int) -> TorchCommunicator:
        """The ranks of one color make their group among themselves (new_group with local synchronisation)."""
        everyone = self._allgather_object((color, key, self.rank))
        world = dist.get_process_group_ranks(self._group) if self._group is not None else list(range(self.size))
        ranks = [r for c, _, r in sorted(e for e in everyone if e[0] == color)]  # by key, then by rank
        if ranks != sorted(ranks):
            raise ValueError(
                f"split(color={color}, key={key}): torch.distributed numbers a group's ranks in world order, so keys "
                "that reorder the ranks cannot be kept over it; give keys in rank order (key=rank), or use MPI"
            )
        group = dist.new_group(
            [world[r] for r in ranks], timeout=timedelta(seconds=self.timeout), use_local_synchronization=True
        )
        return TorchCommunicator.over(group, self.timeout, private=False)  # ours alone: no twin needed

    def close(self) -> None:
        if not self._close_parts():
            return
        if self._made_default and dist.is_initialized():  # every group with it; one made elsewhere is its maker's
            dist.destroy_process_group()
        # gloo's worker threads let go of a finished collective's tensors a moment after wait() returns, and that
        # takes the GIL; a thread that asks for it once the interpreter is shutting down aborts the whole process
        # ("terminate called without an active exception": 2 in 8 resumed runs here). Let them finish first, also
        # when the script destroyed the group itself (then an abort in 2 of 4 runs of examples/zero_offload.py).
        time.sleep(_RELEASE_GRACE)


def _twin(group: dist.ProcessGroup, timeout: float) -> dist.ProcessGroup:
    """distrib's own group over the ranks of `group`, made once (collective over those ranks only)."""
    if id(group) not in _TWINS:  # the group itself kept too, so its id stays its own
        ranks = dist.get_process_group_ranks(group)
        twin = dist.new_group(ranks, timeout=timedelta(seconds=timeout), use_local_synchronization=True)
        _TWINS[id(group)] = (group, twin)
    return _TWINS[id(group)][1]


def started_group(timeout: float | None = None, algorithm: str = "native") -> TorchCommunicator | None:
    """A communicator beside torch.distributed's default group when the process started one itself, else None:
    over a twin of it (see the module docstring), the default one left to the script."""
    return TorchCommunicator.over(dist.group.WORLD, timeout, algorithm) if dist.is_initialized() else None


def rendezvous(comm: Communicator) -> dist.TCPStore:
    """A torch.distributed store, set up through an existing communicator (MPI) instead of MASTER_ADDR.

    Rank 0 opens the store on a free port of an address every rank can reach (loopback when all ranks share
    one network namespace) and tells the others through `comm`.
    """
    places = comm.allgather_object((socket.gethostname(), _netns()))
    same_host = all(place == places[0] for place in places)
    store = None
    if comm.rank == 0:
        host = os.environ.get("MASTER_ADDR") or ("127.0.0.1" if same_host else _routable_address())
        store = dist.TCPStore(
            host, 0, comm.size, is_master=True, timeout=timedelta(seconds=comm.timeout), wait_for_workers=False
        )
        address = (host, store.port)
    host, port = comm.broadcast_object(address if comm.rank == 0 else None)
    if store is None:
        store = dist.TCPStore(host, port, comm.size, is_master=False, timeout=timedelta(seconds=comm.timeout))
    return store


def _bracketed(host: str) -> str:
    """An address as a URL holds it: IPv6 in brackets."""
    return f"[{host}]" if ":" in host else host


def _netns() -> str:
    try:
        return os.readlink("/proc/self/ns/net")
    except OSError:
        return ""


def _routable_address() -> str:
    """The first non-loopback IPv4 address of this host's interfaces."""
    for _, address in _interfaces():
        if not address.startswith("127."):
            return address
    raise CollectiveError("no non-loopback IPv4 address found for rank 0; set MASTER_ADDR to one the ranks can reach")


def _interfaces() -> list[tuple[str, str]]:
    """(name, IPv4 address) of this host's interfaces that have one."""
    found = []
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        for _, name in socket.if_nameindex():
            try:
                request = struct.pack("256s", name[: _IFNAMSIZ - 1].encode())
                packed = fcntl.ioctl(probe.fileno(), _SIOCGIFADDR, request)
            except OSError:
                continue
            found.append((name, socket.inet_ntoa(packed[_IFREQ_ADDRESS])))
    finally:
        probe.close()
    return found


def _gloo_interface_toward(host: str | None) -> None:
    """Have gloo listen on the interface that reaches `host` (rank 0), unless GLOO_SOCKET_IFNAME is set.

    Left alone, gloo listens on the address this host's name resolves to, often 127.0.x.1, which other hosts
    cannot reach.
    """
    if not host or os.environ.get("GLOO_SOCKET_IFNAME"):
        return
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        probe.connect((host, 9))  # UDP: nothing is sent, the kernel only picks the route
        local = probe.getsockname()[0]
    except OSError:
        return  # gloo's own error will name the address it cannot reach
    finally:
        probe.close()
    if local.startswith("127."):
        return
    for name, address in _interfaces():
        if address == local:
            os.environ["GLOO_SOCKET_IFNAME"] = name
            return
