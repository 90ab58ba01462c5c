"""Optimizers and learning-rate schedules by name: SGD (momentum), Adam, AdamW, RAdam; warm-up, then cosine."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from distrib.steps import Progress

OPTIMIZERS = ("sgd", "adam", "adamw", "radam")
SCHEDULES = ("cosine", "constant")


def build_optimizer(
    name: str, params: Iterable[torch.nn.Parameter], lr: float, weight_decay: float = 0.0
) -> torch.optim.Optimizer:
    """A torch optimizer; SGD gets momentum 0.9, the usual choice for this kind of training."""
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "radam":
        return torch.optim.RAdam(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}; got {name!r}")


def build_schedule(
    optimizer: torch.optim.Optimizer, kind: str, warmup_steps: int, epochs: int, progress: Progress
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over `warmup_steps`, then a cosine decay to zero at the end of `epochs`, or constant.

    The total is `epochs` times the current epoch's steps, read from `progress` (the loop sets it once the epoch's
    data is collected, before its first step), so no data is gathered just to size the schedule.
    """
    if kind not in SCHEDULES:
        raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}; got {kind!r}")

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if kind == "constant":
            return 1.0
        done = (step - warmup_steps) / max(1, epochs * progress.steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(done, 1.0)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
