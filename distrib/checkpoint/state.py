"""What a checkpoint holds: the live training state it is written from and loaded into, and its format version."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from distrib.loop import Optimizers, Progress
from distrib.tasks.base import Models

FORMAT = 1  # the on-disk layout's version (see store.py); a checkpoint of another version is refused


@dataclass
class TrainingState:
    """Everything a checkpoint holds, live: loading writes into these objects in place."""

    models: Models
    optimizers: Optimizers
    schedulers: dict[str, torch.optim.lr_scheduler.LRScheduler]
    progress: Progress
    settings: dict[str, Any]  # what a resume must match, by option name: {"--batch-size": 1000, ...}
    task: Any = None  # its state_dict(), when it has one, is saved too: what it keeps across epochs (a replay memory)
