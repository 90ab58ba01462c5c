"""A torch.distributed ProcessGroup whose collectives are a distrib Communicator's: torch code written against
process groups (PowerSGD's comm hook, for one) runs over any distrib transport and algorithm."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from distrib.comm.base import Communicator


class CommunicatorGroup(dist.ProcessGroup):
    """The allreduce of a ProcessGroup (what torch's comm hooks call), carried by `comm`."""

    def __init__(self, comm: Communicator) -> None:
        super().__init__(comm.rank, comm.size)
        self.comm = comm

    def allreduce(self, tensors: list[torch.Tensor], opts: Any = None) -> dist.Work:
        op = _op(opts.reduceOp if opts is not None else dist.ReduceOp.SUM)
        handles = [self.comm.allreduce(t, op=op, async_op=True) for t in tensors]
        return _Work(handles, tensors)

    def getBackendName(self) -> str:  # noqa: N802 -- torch's name
        return f"distrib-{self.comm.backend}"


class _Work(dist.Work):
    """torch's Work over distrib handles: its future holds the list of tensors, as torch's does."""

    def __init__(self, handles: list, tensors: list[torch.Tensor]) -> None:
        super().__init__()
        self._handles, self._future = handles, torch.futures.Future()
        torch.futures.collect_all([h.get_future() for h in handles]).add_done_callback(
            lambda done: _settle(self._future, done, tensors)
        )

    def wait(self, timeout: Any = None) -> bool:
        for handle in self._handles:
            handle.wait()
        return True

    def is_completed(self) -> bool:
        return all(h.is_completed() for h in self._handles)

    def get_future(self) -> torch.futures.Future:
        return self._future


def _settle(future: torch.futures.Future, done: torch.futures.Future, tensors: list[torch.Tensor]) -> None:
    """Complete `future` with the tensors, or with the error of the first collective that failed."""
    try:
        for each in done.value():
            each.value()  # re-raises a failed collective's error
    except BaseException as error:  # noqa: BLE001 -- handed to whoever waits on the future
        future.set_exception(error)
        return
    future.set_result(tensors)


def _op(op: Any) -> str:
    for name, torch_op in (("sum", dist.ReduceOp.SUM), ("avg", dist.ReduceOp.AVG), ("max", dist.ReduceOp.MAX),
                           ("min", dist.ReduceOp.MIN)):  # fmt: skip
        if op == torch_op:
            return name
    raise ValueError(f"distrib's collectives reduce with sum, avg, max or min, not {op}")
