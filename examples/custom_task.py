"""A task of your own, trained by distrib's universal loop on every rank:

    mpirun -n 2 python -m distrib.train --task examples.custom_task:make_task
    torchrun --standalone --nproc-per-node 2 -m distrib.train --task examples.custom_task:make_task --epochs 8

(from the repository root; for a module of your own, put its folder on PYTHONPATH). The loop calls `collect` for
each epoch's data, shards it by rank, and per minibatch calls `apply`, `targets` and `loss`; `evaluate` sums the
validation stats, which the loop adds over ranks and divides by "count". Every option of python -m distrib.train
applies: --zero-offload, --accumulation-steps, --checkpoint-every, --resume, ...
"""

import torch
from torch import nn
from torch.nn import functional as F

from distrib.comm import Communicator
from distrib.tasks import Batch, Models


class NoisySine:
    """Supervised regression: y = sin(3x) + noise for x in [-2, 2]; val_loss is the mean squared error."""

    phases = ("model",)  # one model; a GAN would name two, trained in turn
    defaults = {"epochs": 8, "lr": 1e-2}  # this task's own defaults for the command line's options

    def __init__(self, seed: int = 0, size: int = 4096, noise: float = 0.1):
        gen = torch.Generator().manual_seed(seed)  # the same data on every rank
        x = torch.rand(size + 1024, 1, generator=gen) * 4 - 2
        y = torch.sin(3 * x) + noise * torch.randn(size + 1024, 1, generator=gen)
        self.train, self.val = (x[:size], y[:size]), (x[size:], y[size:])
        self.seed = seed

    def build(self) -> Models:
        torch.manual_seed(self.seed)  # the same start on every rank
        return {"model": nn.Sequential(nn.Linear(1, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 1))}

    def collect(self, epoch: int, models: Models, comm: Communicator) -> Batch:
        return self.train  # tensors sharing dim 0; the loop shuffles and shards them

    def validation(self) -> Batch:
        return self.val

    def apply(self, phase: str, models: Models, batch: Batch) -> torch.Tensor:
        return models[phase](batch[0])

    def targets(self, phase: str, models: Models, batch: Batch, guesses: torch.Tensor) -> torch.Tensor:
        return batch[1]  # given by the data

    def loss(self, phase: str, guesses: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(guesses, targets, reduction="none").mean(1)  # one loss per sample

    def evaluate(self, models: Models, batch: Batch) -> dict[str, float]:
        error = F.mse_loss(models["model"](batch[0]), batch[1], reduction="sum")
        return {"loss": float(error), "count": float(len(batch[0]))}


def make_task(seed: int = 0) -> NoisySine:
    """What --task examples.custom_task:make_task calls, with --seed."""
    return NoisySine(seed=seed)
