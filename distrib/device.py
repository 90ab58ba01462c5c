"""Where this rank computes, and getting data there: the --device choice, minibatches on the model's device, a
wait where GPU work must be finished to be timed, and bf16 autocast.

One GPU per rank, as torch's DDP has it: local rank r computes on cuda:r. Data is collected on the CPU; it is held
on the device when it fits (moved once), else each minibatch's rows are gathered into pinned host memory and
copied without blocking the host, so the copy overlaps the work already queued on the GPU.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from distrib.env import World

DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("fp32", "bf16")
HOLD_FRACTION = 0.25  # a dataset is held on the GPU when it takes at most this share of the free memory


class DeviceError(ValueError):
    """The device asked for cannot be given to this rank; the message names the device count and the local rank."""


def cuda_count() -> int:
    """CUDA devices this process sees (0 without a CUDA build, a driver, or visible devices)."""
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def choose(requested: str, world: World, backend: str | None = None) -> torch.device:
    """This rank's device for --device `requested` ("auto", "cpu" or "cuda").

    auto: cuda:LOCAL_RANK when every rank on this host can have a GPU of its own, else the CPU (never a mix, so
    all ranks agree on the backend). cuda: a GPU or a DeviceError; ranks may share one over the mpi and gloo
    backends (local rank r takes GPU r % count), not over nccl, which needs one per rank. Backend nccl implies cuda.
    """
    if requested not in DEVICES:
        raise DeviceError(f"device must be one of {', '.join(DEVICES)}; got {requested!r}")
    if requested == "cpu":
        if backend == "nccl":
            raise DeviceError("backend nccl reduces GPU tensors, but the device is cpu; use --device cuda, or gloo/mpi")
        return torch.device("cpu")
    count, local = cuda_count(), world.local_size or world.local_rank + 1
    if requested == "auto" and backend != "nccl":
        return torch.device("cuda", world.local_rank) if 0 < local <= count else torch.device("cpu")
    if count == 0:
        why = "this torch is a CPU-only build" if torch.version.cuda is None else "no driver, or CUDA_VISIBLE_DEVICES"
        raise DeviceError(f"cuda asked for on local rank {world.local_rank}, but torch sees 0 CUDA devices ({why})")
    if backend == "nccl" and world.local_rank >= count:
        raise DeviceError(
            f"backend nccl needs one GPU per rank, but local rank {world.local_rank} of {local} on this host finds "
            f"{count} CUDA device(s); start at most {count} rank(s) per host, or use mpi or gloo to share a GPU"
        )
    return torch.device("cuda", world.local_rank % count)


def where(model: nn.Module) -> torch.device:
    """The device of a model's parameters (the CPU for a model without any): the loop takes it from here."""
    first = next(model.parameters(), None)
    return first.device if first is not None else torch.device("cpu")


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on `device`, so a stage's time includes it; nothing to wait for on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast(device: torch.device, precision: str) -> torch.autocast:
    """bf16 autocast on the device for precision "bf16" (fp32 weights, bf16 matmuls); disabled for "fp32"."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}; got {precision!r}")
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


class Feeder:
    """Minibatches on one device: the data held there when it fits, else rows copied from pinned host memory."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._source: tuple[torch.Tensor, ...] = ()  # the tensors `_held` copies, to move new data only
        self._held: list[torch.Tensor] = []

    def hold(self, data: Sequence[torch.Tensor]) -> Sequence[torch.Tensor]:
        """`data` itself, or its copy on the device when it fits there; the same tensors again are not re-copied."""
        if self.device.type == "cpu" or all(t.device == self.device for t in data):
            return data
        if len(data) == len(self._source) and all(a is b for a, b in zip(data, self._source)):
            return self._held
        self._source, self._held = (), []  # let go of the last copy before sizing up the free memory
        nbytes = sum(t.numel() * t.element_size() for t in data)
        if self.device.type == "cuda" and nbytes > HOLD_FRACTION * torch.cuda.mem_get_info(self.device)[0]:
            return data
        self._source, self._held = tuple(data), [t.to(self.device) for t in data]
        return self._held

    def rows(self, data: Sequence[torch.Tensor], index: torch.Tensor | slice) -> list[torch.Tensor]:
        """The rows `index` (indices or a slice) of every tensor of `data`, on the device."""
        return [self._rows(t, index) for t in data]

    def _rows(self, t: torch.Tensor, index: torch.Tensor | slice) -> torch.Tensor:
        if isinstance(index, slice):
            part = t[index]
            return part if part.device == self.device else part.to(self.device, non_blocking=part.is_pinned())
        if t.device == self.device:
            return t[index.to(self.device)]
        if self.device.type != "cuda":
            return t[index].to(self.device)
        # Gathered into fresh pinned memory: torch's host allocator recycles it only once the copy has finished.
        staged = torch.empty((len(index), *t.shape[1:]), dtype=t.dtype, pin_memory=True)
        torch.index_select(t, 0, index, out=staged)
        return staged.to(self.device, non_blocking=True)


__all__ = ["DEVICES", "PRECISIONS", "DeviceError", "Feeder", "autocast", "choose", "synchronize", "where"]
