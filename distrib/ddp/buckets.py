"""Flat gradient buckets: which parameters share a buffer, and one allreduce per buffer, in a fixed order.

Gradients are copied in as they become ready, scaled by 1/size as torch does (the sum is then the average). A
bucket's allreduce starts as soon as it is full and every bucket before it has started, so all ranks issue the
same collectives in the same order while backward goes on. The last bucket also carries one count per parameter
("this rank produced its gradient"): after the allreduce every rank knows which parameters went unused where,
without a collective of its own.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from distrib.comm import Communicator, Handle

MIB = 1 << 20
FIRST_BUCKET_BYTES = MIB  # torch's too: a small first bucket gets communication going early in backward


def assign(params: Sequence[torch.Tensor], cap_bytes: int, first_cap_bytes: int) -> list[list[int]]:
    """Indices of `params` grouped into buckets, in launch order.

    Parameters go in reverse (backward produces the last layers' gradients first), one dtype and device per
    bucket; a bucket closes once it holds at least its limit: first_cap_bytes for a group's first, cap_bytes after.
    """
    filling: dict[tuple, list[int]] = {}
    filled: dict[tuple, int] = {}
    closed: list[list[int]] = []
    started: set[tuple] = set()  # groups whose first bucket has closed
    for i in reversed(range(len(params))):
        p = params[i]
        key = (p.dtype, p.device)
        filling.setdefault(key, []).append(i)
        filled[key] = filled.get(key, 0) + p.numel() * p.element_size()
        if filled[key] >= (cap_bytes if key in started else first_cap_bytes):
            closed.append(filling.pop(key))
            filled[key] = 0
            started.add(key)
    closed.extend(filling.values())
    return sorted(closed, key=lambda bucket: -bucket[0])  # the bucket holding the latest parameter goes first


class Bucket:
    """One flat buffer holding the gradients of `indices` (each a view at its offset), reduced by one allreduce."""

    def __init__(self, params: Sequence[torch.Tensor], indices: list[int], extra: int = 0) -> None:
        self.indices = indices
        first = params[indices[0]]
        total = sum(params[i].numel() for i in indices)
        self.flat = torch.zeros(total + extra, dtype=first.dtype, device=first.device)
        self.views: dict[int, torch.Tensor] = {}
        offset = 0
        for i in indices:
            self.views[i] = self.flat[offset : offset + params[i].numel()].view(params[i].shape)
            offset += params[i].numel()
        self.extra = self.flat[total:]
        self.waiting = len(indices)
        self.handle: Handle | None = None


def _aliases(grad: torch.Tensor, view: torch.Tensor) -> bool:
    return grad.data_ptr() == view.data_ptr() and grad.shape == view.shape and grad.stride() == view.stride()


class Reducer:
    """Averages parameters' gradients over ranks through flat buckets, overlapping the allreduces with backward.

    Per backward: `ready(i)` for each gradient as autograd finishes it, then `finish()` once at the end, which
    leaves the averages in `param.grad`.
    """

    def __init__(
        self,
        comm: Communicator,
        params: Sequence[torch.Tensor],
        *,
        cap_bytes: int,
        first_cap_bytes: int,
        algorithm: str,
        grad_as_view: bool,
    ) -> None:
        self.comm, self.params = comm, list(params)
        self.algorithm, self.grad_as_view = algorithm, grad_as_view
        layout = assign(self.params, cap_bytes, first_cap_bytes)
        last = len(layout) - 1
        self.buckets = [Bucket(self.params, ix, extra=len(self.params) * (k == last)) for k, ix in enumerate(layout)]
        self._bucket_of = {i: bucket for bucket in self.buckets for i in bucket.indices}
        self._start()

    def _start(self) -> None:
        self.is_ready = [False] * len(self.params)
        self.produced = [False] * len(self.params)  # sent in the last bucket's extra slots
        self.launched = 0
        for bucket in self.buckets:
            bucket.waiting, bucket.handle = len(bucket.indices), None

    def ready(self, i: int) -> None:
        """Parameter i's gradient is final for this backward: copy it into its bucket and launch what can go."""
        self._fill(i, self.params[i].grad)
        self._launch()

    def _fill(self, i: int, grad: torch.Tensor | None) -> None:
        bucket = self._bucket_of[i]
        view = bucket.views[i]
        if grad is None:
            view.zero_()
        elif _aliases(grad, view):  # accumulated straight into the bucket (gradient_as_bucket_view)
            view.div_(self.comm.size)
            self.produced[i] = True
        else:
            torch.mul(grad, 1.0 / self.comm.size, out=view)  # torch's own scaling, so results match it bit for bit
            if self.grad_as_view:
                self.params[i].grad = view
            self.produced[i] = True
        self.is_ready[i] = True
        bucket.waiting -= 1

    def _launch(self) -> None:
        while self.launched < len(self.buckets) and self.buckets[self.launched].waiting == 0:
            bucket = self.buckets[self.launched]
            if self.launched == len(self.buckets) - 1:
                bucket.extra.copy_(torch.tensor(self.produced))
            bucket.handle = self.comm.allreduce(
                bucket.flat, op="sum", algorithm=self.algorithm, async_op=True, label={"bucket": self.launched}
            )
            self.launched += 1

    def finish(self, late: Mapping[int, torch.Tensor | None]) -> list[int]:
        """End the backward: fill the parameters still missing (their gradient from `late`, else zeros), launch
        the remaining buckets, and hand each bucket's averages to `.grad` as soon as it arrives, while later ones
        are still travelling. Returns how many ranks produced each parameter's gradient."""
        try:
            for i, ready in enumerate(self.is_ready):
                if not ready:
                    self._fill(i, late.get(i))
            self._launch()
            for bucket in self.buckets:
                bucket.handle.wait()
                for i in bucket.indices:
                    if self.produced[i]:
                        self._copy_out(i)
            counts = self.buckets[-1].extra.round().long().tolist()
            for i, produced in enumerate(self.produced):
                if not produced and counts[i]:  # used elsewhere only; one no rank used keeps its .grad, as in torch
                    self._copy_out(i)
            return counts
        finally:
            self._start()

    def _copy_out(self, i: int) -> None:
        param, view = self.params[i], self._bucket_of[i].views[i]
        if self.grad_as_view:
            if param.grad is None or not _aliases(param.grad, view):
                param.grad = view
        elif param.grad is None:
            param.grad = view.clone()
        else:
            param.grad.copy_(view)
