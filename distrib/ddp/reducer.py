"""The Reducer: torch's DDP reducer over a distrib Communicator, decision for decision.

Per backward, each parameter's gradient is marked ready as autograd produces it; its bucket is reduced as soon as
it is full and every bucket before it has gone, so all ranks issue the same collectives in the same order while
backward goes on; once the last bucket has gone, the end of the current graph task finalizes: it waits for the
buckets and writes the averages to `.grad`. Unused parameters are marked ready at the first hook (found by a
search of the autograd graph, `find_unused_parameters=True`, or in the first iteration of a static graph), a
parameter that becomes ready twice is an error, and a backward that left buckets unreduced is reported at the next
forward, all with torch's messages (messages.py).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from distrib.comm import Communicator
from distrib.ddp import messages
from distrib.ddp.buckets import (
    UNLIMITED,
    Bucket,
    GradBucket,
    SparseBucket,
    aliases,
    assign,
    initial_layout,
    torch_zeros,
)

_engine = torch.autograd.Variable._execution_engine


class Reducer:
    """Averages the gradients of `params` over the ranks of `comm`; see the module docstring."""

    def __init__(
        self,
        comm: Communicator,
        params: Sequence[torch.Tensor],
        names: Sequence[str],
        *,
        first_cap: int,
        cap: int,
        algorithm: str,
        grad_as_view: bool,
        find_unused: bool,
        sparse: Sequence[bool],
    ) -> None:
        self.comm, self.params, self.names, self.sparse = comm, list(params), list(names), list(sparse)
        self.algorithm, self.grad_as_view, self.find_unused = algorithm, grad_as_view, find_unused
        self.first_cap, self.cap, self.static_graph, n = first_cap, cap, False, len(self.params)
        limits = [first_cap, cap] if find_unused and first_cap < cap else [cap] if find_unused else [UNLIMITED]
        self._build(initial_layout(self.params, limits, self.sparse))
        self.comm_hook: tuple[Any, Callable] | None = None
        self.num_iterations = 0
        self.expect_hooks = self.require_finalize = False
        self.ready = [False] * n
        self.unused: list[int] = []  # marked ready at an iteration's first hook
        self.marked_unused = False
        self.local_used = torch.zeros(n, dtype=torch.int32)  # this rank's use of each parameter
        self.used_everywhere = torch.zeros(n, dtype=torch.int32)  # ... summed over the ranks
        self._used_work = None
        self.hook_counts = [0] * n  # static graph: firings per parameter in the first iteration
        self._left: list[int] = []  # static graph: firings still expected in this iteration
        self.static_first = False
        self.div_factor: int | None = None
        self.join_work: Any = None  # the join context's "still training" allreduce, for the divide factor
        self.static_world_size, self.rebuilt, self.ready_order, self.graph_static = True, False, [], True

    def _build(self, layout: list[list[int]], collective: bool = False) -> None:
        """Buckets of `layout`; `collective` (the rebuild, which every rank takes together) may share memory."""
        last, zeros = len(layout) - 1, self._zeros if collective else torch_zeros
        kinds = [SparseBucket if self.sparse[indices[0]] else Bucket for indices in layout]
        self.buckets = [kind(self.params, ix, k, k == last, zeros) for k, (kind, ix) in enumerate(zip(kinds, layout))]
        self.bucket_of = {i: bucket for bucket in self.buckets for i in bucket.indices}
        self.launched = 0

    def _zeros(self, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A bucket's memory: where algorithm "shm" (or "auto", which may pick it) runs on CPU tensors, memory the
        host's ranks share, reduced where it lies (comm/regions.py); else ordinary. Collective."""
        if device.type == "cpu" and (self.algorithm or self.comm.algorithm) in ("shm", "auto"):
            shared = self.comm.shared_zeros(numel, dtype)
            if shared is not None:
                return shared
        return torch.zeros(numel, dtype=dtype, device=device)

    # Modes.

    @property
    def dynamic(self) -> bool:
        """Unused parameters are searched for in every forward."""
        return self.find_unused and not self.static_graph

    def set_static_graph(self) -> None:
        self.static_graph = self.static_first = True

    @property
    def should_rebuild(self) -> bool:
        return (self.static_graph or not self.find_unused) and not self.rebuilt

    # Forward.

    def prepare_for_forward(self) -> None:
        self.num_iterations += 1

    def ensure_prior_reduction_finished(self) -> None:
        """torch's check at the next forward: a backward that left parameters unreduced is an error."""
        if self.require_finalize:
            unready = [i for i, ready in enumerate(self.ready) if not ready]
            raise RuntimeError(
                messages.unfinished(self.static_graph, self.find_unused, self.comm.rank, unready, self.names)
            )

    def rebuild_buckets(self) -> bool:
        """Once, after the first iteration: buckets in the order gradients became ready (rank 0's order)."""
        self.ensure_prior_reduction_finished()
        if not self.should_rebuild or len(set(self.ready_order)) < len(self.params):
            return False
        order = torch.tensor(self.ready_order[: len(self.params)], dtype=torch.int64)
        self.comm.broadcast(order, 0)
        old = self.buckets
        self._build(assign(self.params, order.tolist(), [self.first_cap, self.cap], self.sparse), collective=True)
        if self.grad_as_view:  # gradients that were views of the old buckets move into the new ones
            for bucket in old:
                for i in bucket.views:
                    grad = self.params[i].grad
                    if grad is not None and aliases(grad, bucket.views[i]):
                        self.bucket_of[i].views[i].copy_(grad)
                        self.params[i].grad = self.bucket_of[i].views[i]
        self.rebuilt, self.ready_order = True, []
        return True

    def push_all_for_rebuild(self) -> None:
        """A rank that joined before training: it takes part in the rebuild with every parameter (as torch's)."""
        if self.should_rebuild and not self.ready_order:
            self.ready_order = list(range(len(self.params)))

    def prepare_for_backward(self, unused: list[int] | None) -> None:
        """A forward whose backward reduces; `unused`: the graph search's result when searching."""
        self.expect_hooks = True
        for bucket in self.buckets:
            bucket.pending, bucket.work = len(bucket.indices), None
            if not self.grad_as_view:  # torch's views stay views of the one bucket; a gradient of its own must not
                if bucket.held_elsewhere():
                    bucket.renew()
        self.launched = 0
        self.ready = [False] * len(self.params)
        self.marked_unused = False
        if self.static_graph and not self.static_first:
            self._left = list(self.hook_counts)
        if self.dynamic:
            previous, self.unused = self.unused, unused or []
            if not self.unused:
                messages.warn_no_unused()
            if self.num_iterations > 1:  # torch's: static so far while the unused set stays the same
                self.graph_static = self.graph_static and previous == self.unused

    def _ddp_graph_static(self) -> bool:  # torch's name, read by torch's tests
        return self.graph_static

    # Backward.

    def autograd_hook(self, i: int) -> None:
        """Parameter i's gradient has been accumulated (or is undefined: an output not used in the loss)."""
        if (self.dynamic or self.static_first) and self.params[i].grad is not None:
            self.local_used[i] = 1  # inside no_sync() too: used once in the accumulation is used (torch's)
        if not self.expect_hooks:  # no_sync(): this backward reduces nothing, and is no static graph's first
            return
        if self.static_first:
            self.hook_counts[i] += 1
            return
        if (self.dynamic or self.static_graph) and not self.marked_unused:
            self.marked_unused = True
            for j in self.unused:
                self.mark_ready(j)
        if self.static_graph:
            if self._left[i] == 0:
                raise RuntimeError(messages.GRAPH_CHANGED)
            self._left[i] -= 1
            if self._left[i]:
                return
        if self.should_rebuild:
            self.ready_order.append(i)
        self.mark_ready(i)

    def mark_ready(self, i: int) -> None:
        if self.ready[i]:
            raise RuntimeError(messages.marked_twice(i, self.names[i]))
        self.ready[i] = self.require_finalize = True
        bucket = self.bucket_of[i]
        self._copy_in(i, bucket)
        bucket.pending -= 1
        if bucket.pending == 0:
            while self.launched < len(self.buckets) and self.buckets[self.launched].pending == 0:
                self._launch(self.buckets[self.launched])
                self.launched += 1
            if self.launched == len(self.buckets):
                if self.dynamic:
                    self._reduce_used()
                if self.static_graph and self.should_rebuild:
                    self.ready_order.extend(self.unused)  # torch's: a static graph's unused ones rebuild last
                _engine.queue_callback(self.finalize)

    def _divide(self) -> int:
        if self.div_factor is None:
            self.div_factor = self.comm.size
            if self.join_work is not None and not self.static_world_size:
                self.join_work.wait()
                self.div_factor = int(self.join_work.get_future().value()[0].item())
        return self.div_factor

    def _copy_in(self, i: int, bucket: Bucket) -> None:
        """The gradient into its bucket, divided by the world size unless a comm hook divides (torch's scaling)."""
        hooked = self.comm_hook is not None
        if self.params[i].grad is not None and not hooked and self.params[i].grad.requires_grad:
            messages.warn_create_graph()  # backward(create_graph=True): the copy stays differentiable, as torch's
        bucket.take(i, None if hooked else self._divide(), self.grad_as_view)

    def _launch(self, bucket: Bucket) -> None:
        if self.comm_hook is None:
            label = {"bucket": bucket.index}
            bucket.work = self.comm.allreduce(bucket.flat, "sum", self.algorithm, async_op=True, label=label)
            return
        state, hook = self.comm_hook
        future = hook(state, GradBucket(bucket))
        if not isinstance(future, torch._C.Future):  # torch.futures.Future, or what its then() returns
            kind = type(future)
            raise RuntimeError(messages.hook_not_future(f"{kind.__module__}.{kind.__qualname__}"))
        bucket.work = future

    def _reduce_used(self) -> None:
        self.used_everywhere = self.local_used.clone()
        self._used_work = self.comm.allreduce(self.used_everywhere, "sum", "native", async_op=True)

    def delay_all_reduce(self) -> None:
        """The first backward of a static graph, at its very end: reduce everything at once, and learn which
        parameters the graph uses."""
        self._reduce_used()
        self.unused = [i for i, count in enumerate(self.hook_counts) if count == 0]
        self.static_first, self.require_finalize = False, True
        self.ready = [True] * len(self.params)
        for i in range(len(self.params)):
            self._copy_in(i, self.bucket_of[i])
        for bucket in self.buckets:
            self._launch(bucket)
        self.launched = len(self.buckets)
        self.finalize()

    def finalize(self) -> None:
        """Wait for every bucket and hand its averages to `.grad`, each bucket as soon as it has arrived."""
        self.expect_hooks = self.require_finalize = False
        try:
            for bucket in self.buckets:
                result = self._result(bucket)
                for k, i in enumerate(bucket.indices):
                    if (self.static_graph or self.find_unused) and self._unused_everywhere(i):
                        continue  # a parameter no rank used keeps its .grad, as in torch
                    bucket.hand_out(i, bucket._view(result, k), self.grad_as_view)
        finally:
            self.div_factor = None
            if self._used_work is not None:
                self._used_work.wait()
                self._used_work = None
            if self.dynamic:
                self.local_used.zero_()

    def _result(self, bucket: Bucket) -> torch.Tensor:
        if self.comm_hook is None:
            return bucket.work.wait()
        result = bucket.work.wait()
        if not isinstance(result, torch.Tensor) or result.numel() != bucket.flat.numel():
            raise RuntimeError(messages.bad_hook_result(result, bucket.flat.numel()))
        return result

    def _unused_everywhere(self, i: int) -> bool:
        if int(self.local_used[i]) or not self.static_graph and not self.dynamic:
            return False
        if self._used_work is not None:
            self._used_work.wait()
            self._used_work = None
        return int(self.used_everywhere[i]) == 0

    # For the join context: what a rank that has run out of data does in the others' backward.

    def shadow_backward(self) -> None:
        """Every bucket's collective with zeros (through the comm hook, if any), and the used-parameter map."""
        works = []
        for bucket in self.buckets:
            zeros = type(bucket)(self.params, bucket.indices, bucket.index, bucket.last)
            self._launch(zeros)
            works.append(zeros.work)
        for work in works:
            work.wait()
        if self.find_unused:
            self.comm.allreduce(torch.zeros(len(self.params), dtype=torch.int32), "sum", "native")

    def _get_local_used_map(self) -> torch.Tensor:  # torch's name, read by torch's tests
        return self.used_everywhere
