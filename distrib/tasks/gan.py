"""Generative learning: a GAN learns to draw points from a ring of eight Gaussians, checkable without images.

Two data-parallel models updated in turn on every minibatch: the discriminator learns to tell real points
from generated ones, then the generator learns to fool it. The noise each sample is generated from is
drawn per epoch for every sample index, so a rank's share of it follows the data and every world size
trains on the same global batch.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from distrib.comm import Communicator
from distrib.tasks.base import Batch, Models, data_generator, unwrap


def ring(n: int, gen: torch.Generator, modes: int = 8, radius: float = 2.0, std: float = 0.05) -> torch.Tensor:
    """n points from `modes` Gaussians evenly spaced on a circle: the classic mode-collapse test."""
    angles = 2 * math.pi * torch.randint(0, modes, (n,), generator=gen) / modes
    centers = radius * torch.stack([torch.cos(angles), torch.sin(angles)], dim=1)
    return centers + std * torch.randn(n, 2, generator=gen)


class GAN:
    """val_energy_distance compares generated with held-out real points (0 when the distributions match)."""

    phases = ("discriminator", "generator")

    def __init__(
        self,
        seed: int = 0,
        train_size: int = 65536,
        val_size: int = 4096,
        noise_dim: int = 8,
        partners: int = 16,
        r1: float = 0.3,
    ):
        gen = data_generator("gan", seed)
        self._real = ring(train_size, gen)
        self._reference = ring(val_size, gen)  # held-out real points
        # E|X - X'| of the reference with itself, over distinct pairs: the energy distance's constant term.
        pairs = torch.cdist(self._reference.double(), self._reference.double())
        self._spread = float(pairs.sum() / (val_size * (val_size - 1)))
        self._val = (
            torch.randn(val_size, noise_dim, generator=gen),
            torch.randn(val_size, partners, noise_dim, generator=gen),  # the E|Y-Y'| term's partners, per sample
        )
        self.seed, self.noise_dim, self.r1 = seed, noise_dim, r1
        self._epoch, self._data = -1, None

    def build(self) -> Models:
        torch.manual_seed(self.seed)
        width = 128
        generator = nn.Sequential(
            nn.Linear(self.noise_dim, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 2)
        )
        discriminator = nn.Sequential(
            nn.Linear(2, width), nn.LeakyReLU(0.2), nn.Linear(width, width), nn.LeakyReLU(0.2), nn.Linear(width, 1)
        )
        return {"discriminator": discriminator, "generator": generator}

    def collect(self, epoch: int, models: Models, comm: Communicator) -> Batch:
        """The real points, and this epoch's noise for each sample index (the same on every rank)."""
        if epoch != self._epoch:
            rng = np.random.default_rng((self.seed, epoch))
            noise = torch.as_tensor(rng.standard_normal((len(self._real), self.noise_dim)), dtype=torch.float32)
            self._epoch, self._data = epoch, (self._real, noise)
        return self._data

    def validation(self) -> Batch:
        return self._val

    def apply(self, phase: str, models: Models, batch: Batch) -> torch.Tensor:
        """Discriminator logits on fakes; in its own phase also on the real points, with their R1 penalty."""
        real, noise = batch
        if phase == "discriminator":
            with torch.no_grad():  # fakes are inputs here: the generator is neither trained nor synchronised
                fake = unwrap(models["generator"])(noise)
            real = real.detach().requires_grad_(True)
            logits = models["discriminator"](torch.cat([real, fake])).view(2, -1).T  # [real, fake] per sample
            # R1 (Mescheder et al., 2018): the discriminator's slope at real points, a penalty that keeps it
            # from sharpening without bound. autograd.grad reaches only `real`, so no DDP hook fires here;
            # the parameters' gradients arrive once, in the loop's backward, second-order terms included.
            (slope,) = torch.autograd.grad(logits[:, 0].sum(), real, create_graph=True)
            return torch.cat([logits, slope.pow(2).sum(1, keepdim=True)], dim=1)
        discriminator = unwrap(models["discriminator"])
        # The generator's loss goes through the discriminator, whose parameters must stay out of that graph:
        # their gradients would be wasted work, and would fire its DDP hooks outside its own phase.
        discriminator.requires_grad_(False)
        try:
            return discriminator(models["generator"](noise))
        finally:
            discriminator.requires_grad_(True)

    def targets(self, phase: str, models: Models, batch: Batch, guesses: torch.Tensor) -> torch.Tensor:
        """Labels, not data: real is 1 and fake 0 for the discriminator; the generator wants its fakes called real."""
        if phase == "discriminator":
            return torch.tensor([1.0, 0.0], device=guesses.device).expand(len(guesses), 2)
        return torch.ones_like(guesses)

    def loss(self, phase: str, guesses: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        losses = F.binary_cross_entropy_with_logits(guesses[:, :2], targets, reduction="none").sum(1)
        return losses + self.r1 / 2 * guesses[:, 2] if phase == "discriminator" else losses

    def evaluate(self, models: Models, batch: Batch) -> dict[str, float | torch.Tensor]:
        """Energy distance 2E|X-Y| - E|X-X'| - E|Y-Y'| as a sum over samples, so ranks' slices simply add up.

        Each generated y is compared with every reference point, and with partners y' from its own extra noise.
        """
        generator = models["generator"]
        fake = generator(batch[0]).double()
        partners = generator(batch[1].flatten(0, 1)).double().view(*batch[1].shape[:2], 2)
        cross = torch.cdist(fake, self._reference.to(fake.device, torch.float64)).mean(1)
        energy = 2 * cross - (fake[:, None] - partners).norm(dim=2).mean(1) - self._spread
        return {"energy_distance": energy.sum(), "count": float(len(energy))}
