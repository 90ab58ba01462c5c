"""Uneven inputs: what a rank that has run out of data does while the others still train (torch's DDP join hook).

It shadows each of their iterations' collectives: the bucket rebuild, the buffer broadcast, the "does this
iteration synchronise" allreduce, every bucket's allreduce with zeros (through the comm hook, if any) and the
used-parameter map; the others divide by the ranks still training, or by the initial world size. When all have
joined, the model of the highest rank among the last to join becomes everyone's.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.distributed.algorithms.join import Join, Joinable, JoinHook

from distrib.comm.coalesced import broadcast_
from distrib.ddp.states import synced_state


class Joining(Joinable):
    """DistributedDataParallel's side of torch's Join: the join() context, its hook, its device and group, and the
    agreements between ranks it needs."""

    def __init__(self) -> None:
        Joinable.__init__(self)

    def join(
        self, divide_by_initial_world_size: bool = True, enable: bool = True, throw_on_early_termination: bool = False
    ) -> Join:
        """torch's context manager for uneven inputs: ranks that run out of data shadow the others' collectives."""
        return Join(
            [self], enable, throw_on_early_termination, divide_by_initial_world_size=divide_by_initial_world_size
        )

    def join_hook(self, **kwargs: Any) -> JoinHook:
        return DDPJoinHook(self, divide_by_initial_world_size=kwargs.get("divide_by_initial_world_size", True))

    @property
    def join_device(self) -> torch.device:
        return self.device

    @property
    def join_process_group(self) -> Any:
        if self.process_group is None:
            raise RuntimeError(
                f"join needs a torch.distributed process group beside the {self.comm.backend!r} communicator, for "
                "torch's Join to count the ranks still training; start with distrib.init_process_group() instead "
                "of distrib.init()"
            )
        return self.process_group

    def common_rank(self, candidate: bool) -> int:
        """The highest rank among those for which `candidate` holds (torch's _find_common_rank)."""
        rank = torch.tensor([self.comm.rank if candidate else -1], dtype=torch.int64)
        return int(self.comm.allreduce(rank, op="max", algorithm="native"))

    def iteration_syncs(self, joined: bool) -> bool:
        """Tell joined ranks whether this iteration synchronises gradients (torch's
        _check_global_requires_backward_grad_sync); only a joined rank waits for the answer."""
        flag = torch.ones(1) if not joined and self.require_backward_grad_sync else torch.zeros(1)
        handle = self.comm.allreduce(flag, algorithm="native", async_op=True)
        return bool(handle.wait().item()) if joined else True

    def _sync_final_model(self, is_last_joiner: bool) -> None:
        self._authoritative_rank = self.common_rank(is_last_joiner)
        state = synced_state(self.module, self.parameters_to_ignore, self.forward_sync_buffers)
        broadcast_(self.comm, state, self._authoritative_rank)


class DDPJoinHook(JoinHook):
    def __init__(self, ddp: Any, divide_by_initial_world_size: bool) -> None:
        self.ddp = ddp
        ddp._divide_by_initial_world_size = divide_by_initial_world_size
        ddp._logging["join_uneven_inputs"] = 1
        super().__init__()

    def main_hook(self) -> None:
        """One of the others' iterations, shadowed."""
        ddp, reducer = self.ddp, self.ddp.reducer
        reducer.rebuild_buckets()
        if ddp.will_sync_module_buffers():
            ddp._sync_buffers(ddp.common_rank(False))
        should_sync = ddp.iteration_syncs(joined=True)
        ddp.require_forward_param_sync = should_sync
        if not should_sync:
            return
        reducer.shadow_backward()
        reducer.push_all_for_rebuild()

    def post_hook(self, is_last_joiner: bool) -> None:
        """Everyone has joined: the model of the highest rank among the last to join becomes everyone's."""
        self.ddp._sync_final_model(is_last_joiner)
