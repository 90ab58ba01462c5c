"""The default task: classify points from Gaussian clusters, four clusters a class (or tensors read from disk)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from distrib.comm import Communicator
from distrib.tasks.base import Batch, Models, data_generator


class Classify:
    """Supervised learning: 8-d points from 32 Gaussian clusters, cluster c belonging to class c % 8.

    Classes are balanced (chance is 12.5%) and not linearly separable (a linear model reaches about 60%), so the
    MLP's climb to about 97% validation accuracy shows real learning.
    """

    phases = ("model",)

    def __init__(
        self,
        seed: int = 0,
        train_size: int = 16384,
        val_size: int = 4096,
        dim: int = 8,
        classes: int = 8,
        data: tuple[torch.Tensor, torch.Tensor] | None = None,
    ):
        if data is None:
            gen = data_generator("classify", seed)
            centers = torch.randn(4 * classes, dim, generator=gen)
            cluster = torch.randint(0, 4 * classes, (train_size + val_size,), generator=gen)
            inputs = centers[cluster] + 0.4 * torch.randn(train_size + val_size, dim, generator=gen)
            labels = cluster % classes
        else:  # from disk (see read_data): the last fifth is held out
            inputs, labels = data
            val_size, dim, classes = max(1, len(inputs) // 5), inputs.shape[1], int(labels.max()) + 1
        train_size = len(inputs) - val_size
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

    def evaluate(self, models: Models, batch: Batch) -> dict[str, float | torch.Tensor]:
        logits = models["model"](batch[0])
        return {
            "loss": F.cross_entropy(logits, batch[1], reduction="sum"),
            "accuracy": (logits.argmax(1) == batch[1]).sum(),  # summed here, divided by count in the loop
            "count": float(len(batch[1])),
        }


def read_data(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs [n, dim] float, labels [n] int) saved by torch.save((inputs, labels), path); ValueError if not."""
    fix = "write it with torch.save((inputs, labels), PATH): float inputs [n, dim], integer labels [n]"
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except OSError as error:
        raise ValueError(f"cannot read {path}: {error.strerror or error}; {fix}") from None
    except Exception as error:  # not a torch.save file, or one holding code
        raise ValueError(f"{path} is not a file of tensors ({type(error).__name__}); {fix}") from None
    if not (isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data)):
        raise ValueError(f"{path} holds a {type(data).__name__}, not a pair of tensors; {fix}")
    inputs, labels = data
    problem = None
    if inputs.dim() != 2 or not inputs.is_floating_point() or len(inputs) < 2:
        problem = f"inputs are {inputs.dtype} {tuple(inputs.shape)}"
    elif labels.shape != (len(inputs),) or labels.is_floating_point() or labels.dtype == torch.bool:
        problem = f"labels are {labels.dtype} {tuple(labels.shape)} for {len(inputs)} inputs"
    elif int(labels.min()) < 0:
        problem = f"labels include {int(labels.min())}"
    if problem:
        raise ValueError(f"{path}: {problem}; {fix} (at least 2 samples, labels from 0)")
    return inputs.float(), labels.long()
