"""The default task: classify points from Gaussian clusters, four clusters a class. No download; learns in seconds."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from distrib.comm import Communicator
from distrib.tasks.base import Batch, Models


class Classify:
    """Supervised learning: 8-d points from 32 Gaussian clusters, cluster c belonging to class c % 8.

    Classes are balanced (chance is 12.5%) and not linearly separable (a linear model reaches about 60%), so the
    MLP's climb to about 97% validation accuracy shows real learning.
    """

    phases = ("model",)

    def __init__(self, seed: int = 0, train_size: int = 16384, val_size: int = 4096, dim: int = 8, classes: int = 8):
        gen = torch.Generator().manual_seed(10_000 + seed)
        centers = torch.randn(4 * classes, dim, generator=gen)
        cluster = torch.randint(0, 4 * classes, (train_size + val_size,), generator=gen)
        inputs = centers[cluster] + 0.4 * torch.randn(train_size + val_size, dim, generator=gen)
        labels = cluster % classes
        self._train = (inputs[:train_size], labels[:train_size])
        self._val = (inputs[train_size:], labels[train_size:])
        self.seed, self.dim, self.classes = seed, dim, classes

    def build(self) -> Models:
        torch.manual_seed(self.seed)
        return {
            "model": nn.Sequential(
                nn.Linear(self.dim, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, self.classes)
            )
        }

    def collect(self, epoch: int, models: Models, comm: Communicator) -> Batch:
        return self._train  # from "disk": the same data every epoch

    def validation(self) -> Batch:
        return self._val

    def apply(self, phase: str, models: Models, batch: Batch) -> torch.Tensor:
        return models[phase](batch[0])

    def targets(self, phase: str, models: Models, batch: Batch, guesses: torch.Tensor) -> torch.Tensor:
        return batch[1]  # given by the data

    def loss(self, phase: str, guesses: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(guesses, targets, reduction="none")

    def evaluate(self, models: Models, batch: Batch) -> dict[str, float]:
        logits = models["model"](batch[0])
        return {
            "loss": float(F.cross_entropy(logits, batch[1], reduction="sum")),
            "accuracy": float((logits.argmax(1) == batch[1]).sum()),  # summed here, divided by count in the loop
            "count": float(len(batch[1])),
        }
