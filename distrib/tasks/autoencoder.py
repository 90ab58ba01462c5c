"""Unsupervised learning: an autoencoder squeezes 32-d points through 4 numbers and rebuilds them.

The points lie near a curved 4-d surface (a fixed random tanh layer of 4-d Gaussian codes, plus a little noise),
so 4 numbers suffice, but only a non-linear code finds them: the best linear one (PCA) leaves far more error.
"""

from __future__ import annotations

import torch
from torch import nn

from distrib.comm import Communicator
from distrib.tasks.base import Batch, Models, data_generator


class Autoencoder:
    """Targets are the inputs themselves; val_loss is the mean squared reconstruction error per point."""

    phases = ("model",)

    def __init__(self, seed: int = 0, train_size: int = 16384, val_size: int = 4096, dim: int = 32, code: int = 4):
        gen = data_generator("autoencoder", seed)
        hidden = torch.randn(code, 64, generator=gen)
        mix = torch.randn(64, dim, generator=gen) / 8
        codes = torch.randn(train_size + val_size, code, generator=gen)
        points = torch.tanh(codes @ hidden) @ mix + 0.05 * torch.randn(train_size + val_size, dim, generator=gen)
        points = (points - points.mean(0)) / points.std(0)  # unit variance per feature: predicting the mean costs 1
        self._train, self._val = (points[:train_size],), (points[train_size:],)
        self.seed, self.dim, self.code = seed, dim, code

    def build(self) -> Models:
        torch.manual_seed(self.seed)
        encoder = nn.Sequential(nn.Linear(self.dim, 128), nn.ReLU(), nn.Linear(128, self.code))
        decoder = nn.Sequential(nn.Linear(self.code, 128), nn.ReLU(), nn.Linear(128, self.dim))
        return {"model": nn.Sequential(encoder, decoder)}

    def collect(self, epoch: int, models: Models, comm: Communicator) -> Batch:
        return self._train  # unlabelled points, the same every epoch

    def validation(self) -> Batch:
        return self._val

    def apply(self, phase: str, models: Models, batch: Batch) -> torch.Tensor:
        return models[phase](batch[0])

    def targets(self, phase: str, models: Models, batch: Batch, guesses: torch.Tensor) -> torch.Tensor:
        return batch[0]  # derived from the input: the input itself

    def loss(self, phase: str, guesses: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return ((guesses - targets) ** 2).mean(1)

    def evaluate(self, models: Models, batch: Batch) -> dict[str, float | torch.Tensor]:
        error = ((models["model"](batch[0]) - batch[0]) ** 2).mean(1)
        return {"loss": error.sum(), "count": float(len(error))}
