"""The Communicator: rank, size, point-to-point, and the collectives the rest of distrib is written against.

A transport (transport.py) implements point-to-point calls and the library's own ("native") collectives. Everything
else lives here once: argument checks, staging of tensors a transport cannot touch directly, the algorithm looked up
in algorithms.TABLE, asynchronous handles from the engine thread, and around every collective the flight recorder
(flight.py: each call numbered and recorded where peers can read it), the check that every rank makes the same call
(verify.py), and the report of a wait that times out (stuck.py).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any

import torch

from distrib.comm import contract, sparse, stuck, verify
from distrib.comm.algorithms import ALGORITHMS, TABLE
from distrib.comm.contract import CollectiveTimeout, real
from distrib.comm.engine import Engine, Handle, observed
from distrib.comm.flight import Board, open_board
from distrib.comm.kinds import Kind, algorithm_of, kind_of, reduce_
from distrib.comm.mirror import Mirror
from distrib.comm.topology import Topology, place
from distrib.comm.transport import Transport

_CLOSED = "this communicator was closed (close()); make calls before closing it"


class Communicator(Transport):
    """Collectives over `size` ranks: every rank calls each collective, in the same order; send and recv are
    point-to-point, called by the two ranks they name."""

    def __init__(self, rank: int, size: int, *, timeout: float | None = None, algorithm: str = "native") -> None:
        self.rank = rank
        self.size = size
        source = f"{type(self).__name__}(timeout={{!r}})"
        self.timeout = contract.env_timeout() if timeout is None else contract.check_timeout(timeout, source)
        self.algorithm = self.check_algorithm(algorithm)
        self.device = torch.device("cpu")  # where object collectives stage their bytes
        self.verify = verify.mode_from_env()  # the check that ranks make the same call: verify.MODES
        self._seq = 0  # the number of the collective this rank entered last
        self._board: Board | None = None  # the flight recorder, once the transport can carry open_flight's traffic
        self._engine = Engine(f"distrib-{self.backend}-rank{rank}")
        # The torch.distributed ProcessGroup over the same ranks, for torch's own utilities that take one (Join,
        # torch's comm hooks); None where none exists (an MPI communicator started by distrib.init() alone).
        self.process_group: Any = None
        # Called as observer(name, queued_ns, started_ns, finished_ns, info) after every collective, on the thread
        # that ran it; distrib.trace sets it while recording.
        self.observer: Callable[[str, int, int, int, dict[str, Any]], None] | None = None
        self._topology: Topology | None = None  # which ranks share a host, found on first need (_hosts)
        self._groups: dict[Topology, tuple[Communicator, Communicator]] = {}  # the hierarchical algorithm's splits
        self._kinds: dict[Any, Kind] = {}  # the kinds of call seen (kinds.py)
        self._unusable: str | None = None  # why no call may be made any more: one timed out, or closed

    @property
    def blocked_seconds(self) -> float:
        """Time callers have spent blocked in this communicator's collectives: communication not hidden."""
        return self._engine.blocked_ns / 1e9

    def __repr__(self) -> str:
        return f"{type(self).__name__}(rank={self.rank}, size={self.size}, algorithm={self.algorithm!r})"

    # Point-to-point, and the public collectives.

    def send(self, t: torch.Tensor, dst: int) -> None:
        self.wait_all(self.post(sends=[(contract.check_peer(self, t, dst, "send"), dst)]), "send")

    def recv(self, t: torch.Tensor, src: int) -> None:
        self.wait_all(self.post(recvs=[(contract.check_peer(self, t, src, "recv"), src)]), "recv")

    def sendrecv(self, send: torch.Tensor, dst: int, recv: torch.Tensor, src: int) -> None:
        sends = [(contract.check_peer(self, send, dst, "sendrecv"), dst)]
        recvs = [(contract.check_peer(self, recv, src, "sendrecv"), src)]
        self.wait_all(self.post(sends=sends, recvs=recvs), "sendrecv")

    def allreduce(
        self,
        t: torch.Tensor,
        op: str = "sum",
        algorithm: str | None = None,
        async_op: bool = False,
        *,
        label: Mapping[str, Any] | None = None,
    ) -> torch.Tensor | Handle:
        """Reduce `t` over all ranks, in place (a sparse COO `t` as torch's gloo does, whatever the algorithm);
        returns `t` (or a handle whose wait() returns it).

        `label` (of this and the other tensor collectives) adds fields to what the observer sees, such as a trace
        span's {"bucket": 3}.
        """
        kind = kind_of(self, "allreduce", t, op, algorithm or self.algorithm, label)
        if kind.restarts and t.is_cpu and t.is_contiguous():  # nothing to stage, view or scale
            return self._run(partial(reduce_, self, kind, t, op), async_op, kind, t)
        if kind.sparse:  # a sparse gradient: gathered and summed (sparse.py)
            return sparse.allreduce(self, t, op, async_op)

        def job() -> torch.Tensor:
            chosen = kind.chosen or algorithm_of(self, kind)
            if self.size == 1 or kind.nbytes == 0:
                return t
            work = self._staged(t, host=chosen == "shm")
            flat = torch.view_as_real(work).view(-1) if kind.complex else work if work.dim() == 1 else work.view(-1)
            reduce_(self, kind, flat, "sum" if op == "avg" else op)
            if op == "avg":
                flat.div_(self.size)
            if work is not t:
                t.copy_(work)
            return t

        return self._run(job, async_op, kind, t)

    def reduce_scatter(
        self,
        t: torch.Tensor,
        op: str = "sum",
        algorithm: str | None = None,
        async_op: bool = False,
        *,
        label: Mapping[str, Any] | None = None,
    ) -> torch.Tensor | Handle:
        """Reduce `t` over ranks and return this rank's part of dim 0 split into `size` equal parts.

        `t` serves as scratch space: afterwards its contents are unspecified (the result may be a view of it).
        """
        kind = kind_of(self, "reduce_scatter", t, op, algorithm or self.algorithm, label)
        if t.dim() == 0 or t.shape[0] % self.size:
            raise ValueError(
                f"reduce_scatter needs dim 0 divisible by the world size {self.size}, got shape "
                f"{tuple(t.shape)}; pad the tensor"
            )

        def job() -> torch.Tensor:
            chosen = kind.chosen or algorithm_of(self, kind)
            if self.size == 1:
                return t
            work = self._staged(t, host=chosen == "shm")
            shard = TABLE[chosen].reduce_scatter(self, real(work.view(-1)), "sum" if op == "avg" else op)
            if op == "avg":
                shard.div_(self.size)
            shard = torch.view_as_complex(shard.view(-1, 2)) if kind.complex else shard
            return shard.view(t.shape[0] // self.size, *t.shape[1:]).to(t.device)

        return self._run(job, async_op, kind, t)

    def allgather(
        self,
        t: torch.Tensor,
        out: torch.Tensor | None = None,
        algorithm: str | None = None,
        async_op: bool = False,
        *,
        label: Mapping[str, Any] | None = None,
    ) -> torch.Tensor | Handle:
        """Every rank's `t` concatenated along dim 0, written into `out` when given (t may be a view of it)."""
        kind = kind_of(self, "allgather", t, "", algorithm or self.algorithm, label)
        shape = (self.size * (t.shape[0] if t.dim() else 1), *t.shape[1:])
        if out is None:
            out = torch.empty(shape, dtype=t.dtype, device=t.device)
        elif tuple(out.shape) != shape or out.dtype != t.dtype or not out.is_contiguous():
            raise ValueError(
                f"allgather out must be a contiguous {t.dtype} tensor of shape {shape}, got "
                f"{'non-contiguous ' if not out.is_contiguous() else ''}{out.dtype} {tuple(out.shape)}"
            )

        def job() -> torch.Tensor:
            chosen = kind.chosen or algorithm_of(self, kind)
            work = self._staged(out, copy_in=False, host=chosen == "shm")
            flat = work.view(-1)
            part = t.numel()
            mine = flat[self.rank * part : (self.rank + 1) * part]
            if mine.data_ptr() != t.data_ptr() or t.device != work.device or not t.is_contiguous():
                mine.copy_(t.reshape(-1))
            if self.size > 1 and part:
                TABLE[chosen].allgather(self, real(flat))
            if work is not out:
                out.copy_(work)
            return out

        return self._run(job, async_op, kind, t)

    def broadcast(
        self, t: torch.Tensor, root: int = 0, async_op: bool = False, *, label: Mapping[str, Any] | None = None
    ) -> torch.Tensor | Handle:
        """Copy rank `root`'s `t` into every rank's `t`, in place."""
        kind = kind_of(self, "broadcast", t, f"root {root}", "", label, {"root": root})
        contract.check_root(root, self.size, "broadcast")

        def job() -> torch.Tensor:
            if self.size == 1 or t.numel() == 0:
                return t
            work = self._staged(t, copy_in=self.rank == root)
            self._native_broadcast(real(work.view(-1)), root)
            if work is not t:
                t.copy_(work)
            return t

        return self._run(job, async_op, kind, t)

    def barrier(self, async_op: bool = False) -> None | Handle:
        """Return once every rank has called barrier (or raise CollectiveTimeout)."""
        return self._run(lambda: self._native_barrier() if self.size > 1 else None, async_op, kind_of(self, "barrier"))

    def allgather_object(self, obj: Any) -> list[Any]:
        """Every rank's picklable `obj`, as a list indexed by rank."""
        return self._run(lambda: self._allgather_object(obj), False, kind_of(self, "allgather_object"))

    def broadcast_object(self, obj: Any, root: int = 0) -> Any:
        """Rank `root`'s picklable `obj`, on every rank."""
        contract.check_root(root, self.size, "broadcast_object")
        return obj if self.size == 1 else self.allgather_object(obj if self.rank == root else None)[root]

    # Shared machinery.

    def check_algorithm(self, algorithm: str) -> str:
        """`algorithm` when this communicator can run it, else a ValueError naming the ones it can."""
        if algorithm not in ALGORITHMS:
            raise ValueError(f"algorithm must be one of {', '.join(ALGORITHMS)}; got {algorithm!r}")
        if algorithm == "shm" and (why := self._shm_unavailable()):
            raise ValueError(f"algorithm 'shm' {why}; use 'ring' or 'native'")
        return algorithm

    def _hosts(self) -> Topology:
        """Which ranks share a host. Collective the first time: call it inside a collective, where every rank does."""
        if self._topology is None:
            self._topology = Topology.of(self._allgather_object(place()))
        return self._topology

    def open_flight(self) -> None:
        """Start the flight recorder: collective, the last step of a transport's __init__ (verify.py, flight.py)."""
        if self.size > 1:
            board = open_board(self)  # its own collectives go unrecorded: the board is not ours until the end
            if board is None or not board.whole:  # the same on every rank: _flight_store may be collective
                store = self._flight_store()
                if board is not None and store is not None:
                    board.mirror = Mirror(store, f"distrib-flight/{board.token}")
            if board is not None and not self.spins:  # the library's threads need the cores: sleep, not spin
                board.tries, board.wakes = min(board.tries, 1), True
            self._board, self._seq = board, 0  # on every rank: the user's first collective is call #1

    def _flight_store(self) -> Any:
        """A key-value store (torch.distributed's) every rank reaches, for the recorder across hosts; None: none."""
        return None

    def _run(self, job: Callable[[], Any], async_op: bool, kind: Kind, t: torch.Tensor | None = None) -> Any:
        contract.check_usable(self)
        if t is not None and t.requires_grad:  # in place on its data, outside autograd (torch's collectives too)
            job = torch.no_grad()(job)
        engine, checked = self._engine, self.size > 1
        if self.observer is not None or async_op or not engine.idle:
            job = partial(verify.run, self, kind, t, job) if checked else job
            job = observed(job, self.observer, kind.name, kind.info) if self.observer is not None else job
            return self._compose(job, async_op)
        start = time.perf_counter_ns()  # nothing queued: run on the caller's thread, no hand-off cost
        try:
            return verify.run(self, kind, t, job) if checked else job()
        finally:
            engine.blocked_ns += time.perf_counter_ns() - start

    def _compose(self, job: Callable[[], Any], async_op: bool) -> Any:
        """Run `job` in its place in this rank's order of collectives (a checked call, or one made of others)."""
        engine = self._engine
        if engine.on_its_thread():  # called back by a finished collective (a hook's future): run it now,
            return engine.run_here(job, async_op)  # in the same place of the order on every rank
        if async_op:
            return engine.submit(job)
        if not engine.idle:
            return engine.submit(job).wait()  # queued behind earlier async work, to keep the order
        start = time.perf_counter_ns()
        try:
            return job()
        finally:
            engine.blocked_ns += time.perf_counter_ns() - start

    def _timeout(self, what: str, missing: list[int]) -> CollectiveTimeout:
        self._spoil(what)
        return stuck.report(self, what, missing)  # the flight recorder's account of who is where

    def _spoil(self, what: str) -> None:  # after a timeout here, or in a group a call of ours ran on
        self._unusable = self._unusable or (
            f"this communicator timed out in call #{self._seq} ({what}) and cannot be used again: the ranks no "
            "longer agree on the next call, and data of the one that timed out may still arrive. End the job"
        )

    def _close_parts(self) -> bool:
        """What every transport's close does first, once (False: closed before): queued calls finish; the groups of
        "hierarchical" close in the order made, the same on every rank (closing is collective); the recorder."""
        if self._unusable == _CLOSED:
            return False
        if self._unusable is None and not self._engine.idle:
            self._engine.submit(lambda: None).wait()
        self._unusable = _CLOSED
        for group in dict.fromkeys(g for pair in self._groups.values() for g in pair):
            group.close()
        if self._board is not None:
            self._board.close()
        return True
