"""Local SGD and DiLoCo: every rank takes H optimizer steps of its own, then the ranks average how far they moved
and an outer optimizer applies that average (Douillard et al. 2023, "DiLoCo": inner AdamW, outer SGD with
Nesterov momentum). The ranks talk once every H steps instead of every step.

`LocalSGD` wraps a rank's own (inner) optimizer and is an optimizer itself, so the loop calls its step() as any
other: the inner step, and on every H-th one the outer step. The model must be a plain one (no DDP): its gradients
stay on their rank. With H=1, an outer SGD of learning rate 1 and no momentum, and an inner optimizer linear in
the gradient (SGD, with or without momentum), this is data-parallel training: the average of the ranks' steps is
the step on the averaged gradient. An inner Adam is not linear, so there it is not (each rank's Adam normalises
its own gradient).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from distrib.comm import Communicator


class LocalSGD(torch.optim.Optimizer):
    """`inner` on this rank's gradients; every `sync_every` steps (and at `synchronize()`), the parameters move to
    the outer optimizer's step on the ranks' averaged deltas, the same on every rank."""

    state_per_rank = True  # checkpoints keep each rank's state: its inner optimizer and, between syncs, its weights

    def __init__(
        self,
        inner: torch.optim.Optimizer,
        comm: Communicator,
        sync_every: int,
        outer_lr: float = 0.7,
        outer_momentum: float = 0.9,
        algorithm: str | None = None,
    ) -> None:
        if sync_every < 1 or outer_lr <= 0 or not 0 <= outer_momentum < 1:
            raise ValueError(
                f"sync_every must be >= 1, outer_lr > 0 and outer_momentum in [0, 1); got {sync_every}, "
                f"{outer_lr}, {outer_momentum}"
            )
        super().__init__(inner.param_groups, inner.defaults)  # the very same groups: schedules reach the inner
        self.inner, self.comm, self.sync_every, self.algorithm = inner, comm, sync_every, algorithm
        self.params = [p for group in inner.param_groups for p in group["params"]]
        for p in self.params:  # every rank starts from rank 0's weights, as DDP does
            comm.broadcast(p.data, root=0)
        self.anchor = [p.detach().clone() for p in self.params]  # the weights of the last sync: the outer ones
        nesterov = outer_momentum > 0
        self.outer = torch.optim.SGD(self.anchor, lr=outer_lr, momentum=outer_momentum, nesterov=nesterov)
        self.since = 0  # inner steps since the last sync

    @torch.no_grad()
    def step(self, closure=None) -> None:
        if closure is not None:
            raise ValueError("LocalSGD.step takes no closure")
        self.inner.step()
        self.since += 1
        if self.since == self.sync_every:
            self.synchronize()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.inner.zero_grad(set_to_none=set_to_none)

    @torch.no_grad()
    def synchronize(self) -> None:
        """The outer step now, if any inner step was taken since the last: average the deltas, step, set weights."""
        if self.since == 0:
            return
        deltas = torch.cat([(a - p).reshape(-1) for a, p in zip(self.anchor, self.params)])
        self.comm.allreduce(deltas, op="avg", algorithm=self.algorithm)  # the outer gradient, the same everywhere
        offset = 0
        for anchor in self.anchor:
            anchor.grad = deltas[offset : offset + anchor.numel()].view_as(anchor)
            offset += anchor.numel()
        self.outer.step()
        for anchor, p in zip(self.anchor, self.params):
            p.copy_(anchor)
            anchor.grad = None
        self.since = 0

    @property
    def bytes_per_sync(self) -> int:
        """What one sync reduces: every parameter once."""
        return sum(p.numel() * p.element_size() for p in self.params)

    def state_dict(self) -> dict[str, Any]:
        return {
            "inner": self.inner.state_dict(),
            "outer": self.outer.state_dict(),
            "anchor": [a.clone() for a in self.anchor],
            "weights": [p.detach().clone() for p in self.params] if self.since else None,
            "since": self.since,
        }

    @torch.no_grad()
    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.inner.load_state_dict(state["inner"])
        self.param_groups = self.inner.param_groups  # loading made new groups: share them again, for the schedules
        for anchor, saved in zip(self.anchor, state["anchor"]):
            anchor.copy_(saved)
        self.outer.load_state_dict(state["outer"])
        for p, saved in zip(self.params, state["weights"] or state["anchor"]):
            p.copy_(saved)  # between syncs each rank's weights are its own
        self.since = state["since"]


def settle(optimizers: Mapping[str, torch.optim.Optimizer]) -> None:
    """Bring the ranks' replicas together where local SGD keeps them apart, so that all validate one model."""
    for optimizer in optimizers.values():
        if isinstance(optimizer, LocalSGD):
            optimizer.synchronize()
