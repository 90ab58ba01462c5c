"""ZeRO's flat layout: every parameter a view into one buffer padded to divide by the world size.

Rank r owns the contiguous shard r of that buffer, so a reduce-scatter hands each rank the gradient of exactly
the parameters it updates, and an allgather into the buffer updates every parameter in place. Checkpoints move
state between these shards and torch.optim's one-tensor-per-parameter form (gather, per_parameter, scatter_).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from distrib.comm import Communicator


@dataclass(frozen=True)
class FlatLayout:
    """Parameter i fills [offsets[i], offsets[i] + numel) of a buffer of `padded` elements, group by group."""

    shapes: tuple[torch.Size, ...]
    group_sizes: tuple[int, ...]  # how many parameters each param group has, in order
    world_size: int
    offsets: tuple[int, ...] = field(init=False)
    numel: int = field(init=False)

    def __post_init__(self) -> None:
        if self.world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {self.world_size}")
        if sum(self.group_sizes) != len(self.shapes) or min(self.group_sizes, default=0) < 1:
            raise ValueError(f"group sizes {self.group_sizes} must be >= 1 and add up to {len(self.shapes)} shapes")
        offsets, total = [], 0
        for shape in self.shapes:
            offsets.append(total)
            total += shape.numel()
        if total == 0:
            raise ValueError("the parameters hold no elements; there is nothing to optimize")
        object.__setattr__(self, "offsets", tuple(offsets))
        object.__setattr__(self, "numel", total)

    @property
    def shard_numel(self) -> int:
        """Elements per rank: the parameter count rounded up to a multiple of the world size, divided by it."""
        return -(-self.numel // self.world_size)

    @property
    def padded(self) -> int:
        return self.shard_numel * self.world_size

    def shard(self, rank: int) -> slice:
        """Rank `rank`'s part of the flat buffer."""
        return slice(rank * self.shard_numel, (rank + 1) * self.shard_numel)

    def views(self, flat: Tensor) -> list[Tensor]:
        """Each parameter's view into `flat` (a buffer of this layout), shaped like the parameter."""
        return [flat[o : o + s.numel()].view(s) for o, s in zip(self.offsets, self.shapes)]

    def pieces(self, rank: int) -> Iterator[tuple[int, slice, slice]]:
        """(parameter index, its elements in rank's shard, where they sit in the shard), for every overlap."""
        lo, hi = rank * self.shard_numel, (rank + 1) * self.shard_numel
        for i, (offset, shape) in enumerate(zip(self.offsets, self.shapes)):
            start, stop = max(offset, lo), min(offset + shape.numel(), hi)
            if start < stop:
                yield i, slice(start - offset, stop - offset), slice(start - lo, stop - lo)

    def group_spans(self, rank: int) -> list[tuple[int, slice]]:
        """(group index, slice of rank's shard) for each param group with elements in that shard."""
        lo, hi = rank * self.shard_numel, (rank + 1) * self.shard_numel
        spans, first = [], 0
        for g, count in enumerate(self.group_sizes):
            last = first + count - 1
            start = max(self.offsets[first], lo)
            stop = min(self.offsets[last] + self.shapes[last].numel(), hi)
            if start < stop:
                spans.append((g, slice(start - lo, stop - lo)))
            first += count
        return spans


def flatten_(params: Sequence[Tensor], layout: FlatLayout) -> tuple[Tensor, Tensor]:
    """Move the parameters' data and gradients into two flat buffers and re-point them at views of those.

    Gradients already present are kept (copied in); afterwards backward accumulates straight into the buffer.
    """
    first = params[0]
    flat = torch.zeros(layout.padded, dtype=first.dtype, device=first.device)
    grads = torch.zeros_like(flat)
    for p, view, grad in zip(params, layout.views(flat), layout.views(grads)):
        view.copy_(p.detach())
        p.data = view
        if p.grad is not None:
            grad.copy_(p.grad)
        p.grad = grad
    return flat, grads


def check_params(params: Sequence[Tensor], dtypes: tuple[torch.dtype, ...]) -> None:
    """Everything one flat buffer of trainable parameters of these dtypes needs, checked before anything moves."""
    seen: set[int] = set()
    for i, p in enumerate(params):
        where = f"parameter {i} {tuple(p.shape)}"
        if id(p) in seen:
            raise ValueError(f"{where} is passed twice; pass each parameter once")
        seen.add(id(p))
        if p.device.type == "meta":
            raise ValueError(
                f"{where} is on the meta device: it has no values to offload to the CPU; materialise the model "
                "first (model.to_empty(device=...) and initialise it)"
            )
        if p.layout != torch.strided:
            raise ValueError(f"{where} is {p.layout}; ZeRO flattens dense parameters only")
        if p.dtype not in dtypes:
            raise TypeError(
                f"{where} has dtype {p.dtype}; ZeRO-Offload keeps fp32 masters of float32, bfloat16 or float16 "
                "parameters; cast the model, e.g. model.float()"
            )
        if not p.requires_grad:
            raise ValueError(
                f"{where} does not require grad; pass only trainable ones: "
                "[p for p in model.parameters() if p.requires_grad]"
            )
    kinds = sorted({f"{p.dtype} on {p.device}" for p in params})
    if len(kinds) > 1:
        raise ValueError(
            f"the parameters must share one dtype and device to share one flat buffer, got {', '.join(kinds)}; "
            "cast and move the model as a whole, e.g. model.to('cuda', torch.bfloat16)"
        )


def gather(comm: Communicator, layout: FlatLayout, shard: Tensor, algorithm: str | None) -> list[Tensor] | None:
    """Every rank's shard, cut into one tensor per parameter on rank 0 (None elsewhere; all ranks call it)."""
    full = comm.allgather(shard, algorithm=algorithm)  # every rank briefly holds the whole: no gather collective
    return layout.views(full.cpu()) if comm.rank == 0 else None


def per_parameter(state: dict[int, dict[str, Tensor]], name: str, shapes: Sequence[torch.Size]) -> dict[int, Tensor]:
    """state[i][name] for every parameter i that has it, as in torch.optim's state dicts, checked against shapes."""
    found = {}
    for i, entry in state.items():
        if not 0 <= i < len(shapes):
            raise ValueError(f"the saved state names parameter {i}, but this optimizer has {len(shapes)}")
        if name in entry:
            if entry[name].shape != shapes[i]:
                raise ValueError(
                    f"saved {name} of parameter {i} has shape {tuple(entry[name].shape)}, the parameter "
                    f"{tuple(shapes[i])}; load the state of the same model"
                )
            found[i] = entry[name]
    return found


def scatter_(layout: FlatLayout, rank: int, tensors: dict[int, Tensor], shard: Tensor) -> None:
    """Copy the parts of per-parameter tensors that fall in rank's shard into it; absent parameters are skipped."""
    for i, inside, at in layout.pieces(rank):
        if i in tensors:
            shard[at].copy_(tensors[i].reshape(-1)[inside])
