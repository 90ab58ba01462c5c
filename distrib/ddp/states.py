"""The module's state across ranks: which parameters DDP reduces, that every rank holds the same model, and the
broadcasts that make parameters and buffers equal (at construction, before each forward, when ranks join)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from distrib.comm import Communicator

_ALIGN = 16  # bytes: each tensor's slice of a broadcast starts where any dtype may view it
_FIX = " Build the same model on every rank: the same parameters, shapes and order."


def reducer_parameters(module: nn.Module, ignored: set[str]) -> tuple[list[nn.Parameter], list[str], list[bool]]:
    """The parameters DDP reduces, each once, with its name in torch's messages and whether its gradient is sparse
    (an nn.Embedding's or nn.EmbeddingBag's with sparse=True): trainable and not ignored, in module order (torch's).

    A name is torch's debug name: "module.param", ".param" at the root, and a shared parameter's last one."""
    params, names, sparse, index = [], [], [], {}
    for module_name, child in module.named_modules():
        for name, p in child.named_parameters(recurse=False):
            fqn = f"{module_name}.{name}" if module_name else name
            if p.requires_grad and fqn not in ignored and id(p) not in index:
                index[id(p)] = len(params)
                params.append(p)
                names.append("")
                sparse.append(isinstance(child, (nn.Embedding, nn.EmbeddingBag)) and child.sparse)
            if id(p) in index:  # every later occurrence renames it: torch's mapping keeps the last
                names[index[id(p)]] = f"{module_name}.{name}"
    return params, names, sparse


def synced_state(module: nn.Module, ignored: set[str], buffers: bool) -> list[torch.Tensor]:
    """What construction makes equal on every rank: every parameter (frozen ones too) and, if asked, every buffer,
    except the ignored ones."""
    tensors = [p for name, p in module.named_parameters() if name not in ignored]
    return tensors + (synced_buffers(module, ignored) if buffers else [])


def synced_buffers(module: nn.Module, ignored: set[str]) -> list[torch.Tensor]:
    """The buffers a forward broadcasts, looked up afresh: a buffer may be rebound between forwards."""
    return [b for name, b in module.named_buffers() if name not in ignored]


def check_same_model(comm: Communicator, params: Sequence[torch.Tensor], rank: int) -> None:
    """Raise on every rank, in torch's words, if the ranks' parameters differ in number, sizes or strides."""
    mine = [(tuple(p.shape), p.stride()) for p in params]
    everyone = comm.allgather_object(mine)
    counts = [len(entries) for entries in everyone]
    for other, count in enumerate(counts):
        if count != counts[rank]:
            raise RuntimeError(
                f"DDP expects same model across all ranks, but Rank {rank} has {counts[rank]} params, while rank "
                f"{other} has inconsistent {count} params.{_FIX}"
            )
    for k, (shape, stride) in enumerate(everyone[0]):
        for other, entries in sorted(enumerate(everyone), key=lambda item: item[0] != rank):  # this rank's own first
            for what, mine_, theirs in (("sizes", entries[k][0], shape), ("strides", entries[k][1], stride)):
                if mine_ != theirs:
                    where = "this process" if other == rank else f"process {other}"
                    raise RuntimeError(
                        f"[{rank}]: params[{k}] in {where} with {what} {list(mine_)} appears not to match {what} of "
                        f"the same param in process 0.{_FIX}"
                    )


def broadcast_(comm: Communicator, tensors: Sequence[torch.Tensor], root: int = 0) -> None:
    """Overwrite `tensors` with rank `root`'s values: one broadcast of their bytes per device.

    Version counters are left as they were (torch's _unsafe_preserve_version_counter): a buffer saved for backward
    by one forward (BatchNorm's running stats) may be refreshed before a second forward without failing that
    backward.
    """
    if comm.size == 1 or not tensors:
        return
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    for t in tensors:
        by_device.setdefault(t.device, []).append(t)
    for device, group in by_device.items():
        nbytes = [t.numel() * t.element_size() for t in group]
        offsets = [0]
        for n in nbytes:
            offsets.append(offsets[-1] + -(-n // _ALIGN) * _ALIGN)
        flat = torch.empty(offsets[-1], dtype=torch.uint8, device=device)
        with torch.no_grad():
            for t, start, n in zip(group, offsets, nbytes):
                flat[start : start + n].copy_(t.detach().contiguous().view(-1).view(torch.uint8))  # t[::2] too
            comm.broadcast(flat, root)
            if comm.rank != root:
                with torch.autograd._unsafe_preserve_version_counter(tuple(group)):
                    for t, start, n in zip(group, offsets, nbytes):
                        t.copy_(flat[start : start + n].view(t.dtype).view(t.shape))
