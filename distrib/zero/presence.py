"""Which parameters got a gradient since zero_grad(), the same on every rank: where torch.optim's rules and one flat
step part ways, the step says so instead of stepping differently.

torch.optim skips a parameter whose `.grad` is None (no state, no weight decay, its step count unchanged), and a
second step() without zero_grad() steps again on the gradients still in `.grad`. ZeroOffloadOptimizer steps the
whole flat buffer with one step count, and its step() consumes the gradients (the reduce-scatter works in place). So
a step in which no parameter has a gradient on any rank is skipped, as torch's would change nothing; one in which
only some have none, or that follows a step with no zero_grad() between, raises on every rank, naming the fix.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from distrib.comm import Communicator


class Presence:
    """Per parameter: whether torch would hold a gradient in `.grad` (one accumulated since zero_grad() to None); and
    whether step() has consumed them."""

    def __init__(self, params: Sequence[Tensor]) -> None:
        self._got = bytearray(p.grad is not None for p in params)  # gradients made before the optimizer count
        self._consumed = False

    def hook(self, i: int, dirty: threading.Event) -> Callable[[Tensor], None]:
        """Parameter i's post-accumulate-grad hook: its gradient is here, and the flat buffer `dirty` (it holds the
        ledger and the event only, never the optimizer)."""
        got = self._got

        def accumulated(_: Tensor) -> None:
            got[i] = 1
            dirty.set()

        return accumulated

    def cleared(self, to_none: bool) -> None:
        """zero_grad(): to None, no parameter has a gradient; in place, each that had one has a zero one (torch steps
        it), and one that never had one still has none."""
        if to_none:
            self._got[:] = bytes(len(self._got))
        self._consumed = False

    def consume(self) -> None:
        self._consumed = True

    def check(self, comm: Communicator, params: Sequence[Tensor], grads: Sequence[Tensor]) -> bool:
        """Whether this step has gradients at all (False: skip it, as torch would); raises where it cannot be torch's.

        `grads`: the flat buffer's views; a `.grad` that is one of them came from zero_grad() or the last step, and
        counts only if a backward accumulated into it since. Collective: every rank decides alike.
        """
        own = [
            p.grad is not None and (self._got[i] or p.grad.data_ptr() != g.data_ptr())
            for i, (p, g) in enumerate(zip(params, grads))
        ]
        stale = self._consumed and any(
            p.grad is not None and p.grad.data_ptr() == g.data_ptr() for p, g in zip(params, grads)
        )
        flags = comm.allreduce(torch.tensor([*own, stale], dtype=torch.int32), op="max", algorithm="native")
        if flags[-1]:
            raise RuntimeError(
                "ZeroOffloadOptimizer.step() again with no zero_grad() since the last step: torch.optim would step "
                "on the gradients left in .grad plus any new ones, but step() consumed them. Call "
                "optimizer.zero_grad() (or model.zero_grad()) after each step, accumulating over micro-batches "
                "before one step instead (model.zero_grad(set_to_none=False) looks the same from here: use the "
                "optimizer's)"
            )
        missing = [i for i, got in enumerate(flags[:-1].tolist()) if not got]
        if len(missing) == len(params):
            return False
        if missing:
            shown = ", ".join(f"{i} {tuple(params[i].shape)}" for i in missing[:5])
            more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            raise RuntimeError(
                f"parameter(s) {shown}{more} got no gradient on any rank since zero_grad(): torch.optim would "
                "leave them and their state as they are, but ZeroOffloadOptimizer steps all parameters together. "
                "Leave them out of the optimizer (or freeze them before building it); parameters that had a "
                "gradient before step with zero ones after zero_grad(set_to_none=False), in torch and here"
            )
        return True
