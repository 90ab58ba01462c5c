"""The module's state across ranks: which parameters DDP reduces, that every rank holds the same model, and the
parameters and buffers those broadcasts make equal (at construction, before each forward, when ranks join)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from distrib.comm import Communicator

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
