"""Flat gradient buckets: which parameters share a buffer (torch's assignment rule), the buffer with a view per
parameter, a sparse gradient's bucket of its own, and the GradBucket a comm hook receives.

torch's DDP assigns buckets twice: at construction over the parameters in model order (one bucket of each dtype
and device unless unused parameters are searched for), the list reversed so the last layers go first; and once
after the first iteration, in the order the gradients became ready. The same layout here means a comm hook sees
the same buckets, index for index, as under torch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

MIB = 1 << 20
FIRST_BUCKET_BYTES = MIB  # torch's too: a small first bucket gets communication going early in backward
DEFAULT_CAP_MB = 25  # torch's default bucket_cap_mb
UNLIMITED = 1 << 62  # "sys.maxsize": one bucket of each dtype and device


def assign(
    params: Sequence[torch.Tensor], order: Sequence[int], limits: Sequence[int], sparse: Sequence[bool]
) -> list[list[int]]:
    """Indices of `params` grouped into buckets, taken in `order` (torch's _compute_bucket_assignment_by_size).

    A parameter with a sparse gradient is a bucket of its own. Else one dtype and device per bucket; a bucket closes
    once it holds at least its limit (limits[k] for the k-th bucket of its kind, the last limit repeating). Closed
    buckets come in the order they closed, then the open ones, the kind seen last first.
    """
    buckets: list[list[int]] = []
    filling: dict[tuple, tuple[list[int], int, int]] = {}  # kind -> (indices, bytes, buckets of it closed)
    for i in order:
        if sparse[i]:
            buckets.append([i])
            continue
        p = params[i]
        kind = (p.dtype, p.device)
        indices, size, closed = filling.get(kind, ([], 0, 0))
        indices.append(i)
        size += p.numel() * p.element_size()
        if size >= limits[min(closed, len(limits) - 1)]:
            buckets.append(indices)
            filling[kind] = ([], 0, closed + 1)
        else:
            filling[kind] = (indices, size, closed)
    # torch's open buckets come out of a C++ hash map: in the reverse order of their kinds' first parameters.
    buckets.extend(indices for indices, _, _ in reversed(filling.values()) if indices)
    return buckets


def initial_layout(params: Sequence[torch.Tensor], limits: Sequence[int], sparse: Sequence[bool]) -> list[list[int]]:
    """The construction-time buckets: model order, sorted by their first parameter, then reversed (torch's)."""
    return sorted(assign(params, range(len(params)), limits, sparse), key=min)[::-1]


Zeros = Callable[[int, torch.dtype, torch.device], torch.Tensor]  # a bucket's memory: numel, dtype, device


def torch_zeros(numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.zeros(numel, dtype=dtype, device=device)


class Bucket:
    """One flat buffer holding the gradients of `indices`, each parameter a view at its offset."""

    def __init__(
        self, params: Sequence[torch.Tensor], indices: list[int], index: int, last: bool, zeros: Zeros = torch_zeros
    ) -> None:
        self.indices, self.index, self.last = indices, index, last
        first = params[indices[0]]
        self.params = [params[i] for i in indices]
        self._position = {i: k for k, i in enumerate(indices)}
        self.offsets, offset = [], 0
        for p in self.params:
            self.offsets.append(offset)
            offset += p.numel()
        self.flat = zeros(offset, first.dtype, first.device)
        self.views = {i: self._view(self.flat, k) for k, i in enumerate(indices)}
        self.pending = len(indices)
        self.work = None  # a distrib Handle, or a torch Future when a comm hook ran

    def _view(self, flat: torch.Tensor, k: int) -> torch.Tensor:
        """Parameter k's place in `flat`, laid out as the parameter where it is dense (channels_last, say), as
        AccumulateGrad lays out its gradient (torch's bucket views); else row-major."""
        p = self.params[k]
        if dense(p):
            return flat.as_strided(p.shape, p.stride(), flat.storage_offset() + self.offsets[k])
        return self._plain(flat, k)

    def _plain(self, flat: torch.Tensor, k: int) -> torch.Tensor:
        p = self.params[k]
        return flat[self.offsets[k] : self.offsets[k] + p.numel()].view(p.shape)

    def slot(self, i: int) -> torch.Tensor:
        """Parameter i's averaged gradient as a tensor of its own over the bucket's memory, for `.grad`: no copy
        out of the bucket, and, not being a view, it detaches in place like any gradient."""
        view = self.views[i]
        grad = torch.empty(0, dtype=view.dtype, device=view.device)
        return grad.set_(self.flat.untyped_storage(), view.storage_offset(), view.shape, view.stride())

    def installed(self, i: int) -> bool:
        """Whether parameter i's `.grad` lives in this bucket, at its place."""
        grad = self._param(i).grad
        return grad is not None and aliases(grad, self.views[i])

    def _param(self, i: int) -> torch.Tensor:
        return self.params[self._position[i]]

    def held_elsewhere(self) -> bool:
        """Whether anything but this bucket and the gradients it put in `.grad` holds its memory (a gradient the
        user kept after clearing `.grad`): then the next backward must not write over it."""
        installed = sum(1 for i in self.indices if self.installed(i))
        holders = 2 + len(self.views) + installed  # the flat buffer, a temporary handle to it, the views, .grad's
        return torch._C._storage_Use_Count(self.flat.untyped_storage()._cdata) > holders

    def take(self, i: int, divide: int | None, as_view: bool) -> None:
        """Parameter i's gradient into the bucket, divided by `divide` (None: as it is, for a comm hook)."""
        param, view = self._param(i), self.views[i]
        grad = param.grad
        if grad is None:
            view.zero_()
        elif aliases(grad, view):  # accumulated straight into the bucket
            if divide is not None:
                view.div_(divide)
        else:
            if divide is None:
                view.copy_(grad)
            elif grad.requires_grad:  # backward(create_graph=True): the copy stays differentiable, as torch's
                view.copy_(grad * (1.0 / divide))
            else:
                torch.mul(grad, 1.0 / divide, out=view)  # torch's own scaling
            if as_view:
                param.grad = view

    def hand_out(self, i: int, result: torch.Tensor, as_view: bool) -> None:
        """The average into `.grad`: as a view of the bucket (gradient_as_bucket_view), else as a tensor of its own
        over the bucket's memory, handed over instead of copied (the next backward accumulates into it, or, once
        `.grad` is cleared, renews the bucket if the old gradient is still held)."""
        param, view = self._param(i), self.views[i]
        if result.data_ptr() != view.data_ptr():  # a comm hook's result lives elsewhere
            view.copy_(result)
        if self.installed(i):
            return
        if view.dtype != param.dtype:  # the module converted after wrapping (.double()): as torch, the bucket keeps
            param.grad = view.to(param.dtype) if param.grad is None else param.grad.copy_(view)  # its dtype
        elif as_view:
            param.grad = view
        elif param.grad is not None and (param.grad.requires_grad or not param.is_contiguous()):
            param.grad.copy_(view)  # a differentiable gradient (create_graph), or one laid out as its parameter
        else:
            param.grad = self.slot(i)

    def renew(self) -> None:
        """Fresh memory for the next backward, the old left to whoever holds it."""
        self.flat = torch.zeros_like(self.flat)
        self.views = {i: self._view(self.flat, k) for k, i in enumerate(self.indices)}

    def grad_bucket(self) -> GradBucket:
        return GradBucket(self)


class SparseBucket:
    """One parameter whose gradient is sparse (nn.Embedding(sparse=True)), as torch keeps it: no flat buffer, the
    gradient itself divided and reduced in place (comm/sparse.py), so `.grad` holds the average."""

    def __init__(
        self, params: Sequence[torch.Tensor], indices: list[int], index: int, last: bool, zeros: Zeros = torch_zeros
    ) -> None:
        self.indices, self.index, self.last = indices, index, last
        self.params = [params[indices[0]]]
        self.offsets: list[int] = []  # no views: a hook's GradBucket.gradients() is empty, as torch's
        self.views: dict[int, torch.Tensor] = {}
        p = self.params[0]  # until a gradient comes, no rows (what a joined rank's shadow backward reduces)
        rows = torch.empty(0, *p.shape[1:], dtype=p.dtype, device=p.device)
        no = torch.empty(1, 0, dtype=torch.int64, device=p.device)
        self.flat = torch.sparse_coo_tensor(no, rows, p.shape, check_invariants=False)
        self.pending = 1
        self.work = None

    def _view(self, flat: torch.Tensor, k: int) -> torch.Tensor:
        return flat

    _plain = _view

    def held_elsewhere(self) -> bool:
        return False

    def take(self, i: int, divide: int | None, as_view: bool) -> None:
        """The parameter's gradient as the bucket, divided in place by `divide` (None: left for a comm hook)."""
        grad = self.params[0].grad
        if grad is None:
            raise RuntimeError("Expected sparse gradient to be defined.")
        if not grad.is_sparse:
            raise RuntimeError("Expected variable to have sparse gradient.")
        if divide is not None:
            grad.div_(divide)
        self.flat = grad

    def hand_out(self, i: int, result: torch.Tensor, as_view: bool) -> None:
        if result is not self.flat:  # a comm hook's result
            self.flat.copy_(result)


class GradBucket:
    """What a comm hook receives: torch.distributed.GradBucket's interface over one bucket.

    buffer() holds this rank's gradients as they are (a hook divides by the world size itself, as under torch);
    gradients() are views of the current buffer, shaped like the parameters.
    """

    def __init__(self, bucket: Bucket | SparseBucket) -> None:
        self._bucket, self._buffer = bucket, bucket.flat

    def index(self) -> int:
        return self._bucket.index

    def is_last(self) -> bool:
        return self._bucket.last

    def buffer(self) -> torch.Tensor:
        return self._buffer

    def set_buffer(self, buffer: torch.Tensor) -> None:
        self._buffer = buffer

    def gradients(self) -> list[torch.Tensor]:
        return [self._bucket._plain(self._buffer, k) for k in range(len(self._bucket.offsets))]  # row-major, torch's

    def parameters(self) -> list[torch.Tensor]:
        return list(self._bucket.params)


def dense(t: torch.Tensor) -> bool:
    """Whether `t` fills exactly numel places of memory in some order of its dims (torch's non-overlapping and
    dense): then its gradient, and its bucket view, are laid out as it is."""
    if t.numel() == 0:
        return False
    need = 1
    for stride, size in sorted(zip(t.stride(), t.shape)):
        if size == 1:
            continue
        if stride != need:
            return False
        need *= size
    return True


def aliases(grad: torch.Tensor, view: torch.Tensor) -> bool:
    """Whether `grad` is `view`'s memory, shape and layout: a gradient that lives in its bucket."""
    return grad.data_ptr() == view.data_ptr() and grad.shape == view.shape and grad.stride() == view.stride()
