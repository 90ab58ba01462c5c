"""What a task tells the universal loop: its models, its data, how to derive targets, its loss and its stats.

Devices: a task builds its models and collects its data on the CPU; the loop moves the models' minibatches to their
device. A tensor a task makes itself (targets, noise) it makes on the device of the tensors it is given.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from distrib.comm import Communicator

Models = dict[str, nn.Module]
Batch = Sequence[torch.Tensor]  # tensors sharing dim 0: inputs, and targets when the data carries them
# Each built-in task draws its data from a stream of its own, apart from the seed its weights start from.
_DATA_STREAMS = {"classify": 10_000, "autoencoder": 20_000, "gan": 30_000}


def data_generator(task: str, seed: int) -> torch.Generator:
    """The generator a built-in task's data comes from, the same on every rank for a given seed."""
    return torch.Generator().manual_seed(_DATA_STREAMS[task] + seed)


@runtime_checkable
class Task(Protocol):
    """The stages of the seed's loop that differ between tasks; the loop itself stays one loop.

    `phases` names the models updated in turn on each minibatch: ("model",) for most tasks, a GAN's
    ("discriminator", "generator"). Each phase has its own optimizer and its own apply/targets/loss.
    A task that keeps state across epochs (RL's replay memory) adds state_dict() and load_state_dict() of
    tensors and plain values; checkpoints then hold it too. A task that can show what its models make adds
    sample(models) -> str; python -m distrib.train prints it at the end of a run (a language model's text).
    """

    phases: Sequence[str]

    def build(self) -> Models:
        """Fresh models, keyed by phase (built identically on every rank from the task's seed)."""
        ...

    def collect(self, epoch: int, models: Models, comm: Communicator) -> Batch:
        """This epoch's training data, identical on every rank: from disk, or from acting in an environment."""
        ...

    def validation(self) -> Batch:
        """Held-out data, never trained on."""
        ...

    def apply(self, phase: str, models: Models, batch: Batch) -> torch.Tensor:
        """The guesses of the phase's model on a minibatch."""
        ...

    def targets(self, phase: str, models: Models, batch: Batch, guesses: torch.Tensor) -> torch.Tensor:
        """Targets: given by the data, derived from the input, from noise, or from future rewards."""
        ...

    def loss(self, phase: str, guesses: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Per-sample losses, shape [batch]: the loop weights and sums them so any world size gives one result."""
        ...

    def evaluate(self, models: Models, batch: Batch) -> dict[str, float | torch.Tensor]:
        """Validation sums over a batch (e.g. loss, correct) plus "count", as floats or 0-d tensors (left on the
        device, they cost no wait there); the loop adds them over ranks."""
        ...


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DDP wrapper, for a phase that uses another phase's model without training it."""
    return getattr(model, "module", model)
