"""Tasks for the failure tests, passed as --task tests.faulty:task (or :uneven): the default task, plus faults.

DISTRIB_TEST_FAULT="KIND:RANK:STEP" strikes at the STEP-th optimizer step (from 1) this process takes, on RANK:
  nan    the loss of that step is NaN
  kill   the rank touches DISTRIB_TEST_MARKER (when set), then SIGKILLs itself before the step's forward pass
  term   the rank sends itself SIGTERM, as a launcher passing on a Ctrl-C or a scheduler's notice would
  pause  the rank touches the file DISTRIB_TEST_MARKER, then every later step sleeps 0.2 s, so a test can
         signal the launcher mid-epoch
  again  as kill, in every process that reaches the step (a launcher's restart), until DISTRIB_TEST_KILLS
         (default 2) have died: each death leaves a file DISTRIB_TEST_MARKER.N (N = 1, 2, ...)
  leave  the rank SIGKILLs its launcher (torchrun's agent: its parent) and itself, as a host that goes away
RANK "any" strikes on whichever rank the process is (for a variable set on one host's launcher only).
DISTRIB_TEST_NOISE=1 jitters the inputs with torch's global RNG: an exact resume then needs the RNG restored.
DISTRIB_TEST_WIDTH=W gives the model W hidden units (another model under the same task name).
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import torch

from distrib.env import read_world
from distrib.tasks.base import Batch, Models
from distrib.tasks.classify import Classify


class Faulty(Classify):
    """The default task with one fault on one rank, and optionally noisy inputs."""

    def __init__(self, seed: int = 0, **kwargs) -> None:
        super().__init__(seed=seed, **kwargs)
        kind, rank, step = (os.environ.get("DISTRIB_TEST_FAULT") or "none:0:0").split(":")
        self.kind, self.step = kind, int(step)
        self.mine = rank == "any" or read_world().rank == int(rank)
        self.noise = os.environ.get("DISTRIB_TEST_NOISE") == "1"
        self.steps, self.paused = 0, False

    def build(self) -> Models:
        width = os.environ.get("DISTRIB_TEST_WIDTH")
        return super().build() if width is None else _mlp(self.seed, self.dim, int(width), self.classes)

    def apply(self, phase: str, models: Models, batch: Batch) -> torch.Tensor:
        self.steps += 1
        if self.mine and self.steps == self.step:
            if self.kind == "kill":
                if "DISTRIB_TEST_MARKER" in os.environ:
                    Path(os.environ["DISTRIB_TEST_MARKER"]).touch()  # the time of death, for the test
                os.kill(os.getpid(), signal.SIGKILL)
            elif self.kind == "again":
                marker = os.environ["DISTRIB_TEST_MARKER"]
                deaths = sum(Path(f"{marker}.{n}").exists() for n in range(1, 100))
                if deaths < int(os.environ.get("DISTRIB_TEST_KILLS", "2")):
                    Path(f"{marker}.{deaths + 1}").touch()
                    os.kill(os.getpid(), signal.SIGKILL)
            elif self.kind == "leave":
                os.kill(os.getppid(), signal.SIGKILL)
                os.kill(os.getpid(), signal.SIGKILL)
            elif self.kind == "term":
                os.kill(os.getpid(), signal.SIGTERM)
            elif self.kind == "pause":
                Path(os.environ["DISTRIB_TEST_MARKER"]).touch()
                self.paused = True
        if self.paused:
            time.sleep(0.2)
        inputs = batch[0] + 0.05 * torch.randn_like(batch[0]) if self.noise else batch[0]
        return models[phase](inputs)

    def loss(self, phase: str, guesses: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        losses = super().loss(phase, guesses, targets)
        if self.kind == "nan" and self.mine and self.steps == self.step:
            losses = losses * float("nan")
        return losses


class Uneven(Classify):
    """A model whose hidden width depends on the rank: DDP must refuse it on every rank."""

    def build(self) -> Models:
        return _mlp(self.seed, self.dim, 128 + 8 * read_world().rank, self.classes)


def _mlp(seed: int, dim: int, width: int, classes: int) -> Models:
    torch.manual_seed(seed)
    return {"model": torch.nn.Sequential(torch.nn.Linear(dim, width), torch.nn.ReLU(), torch.nn.Linear(width, classes))}


def task(seed: int = 0) -> Faulty:
    return Faulty(seed=seed)


def uneven(seed: int = 0) -> Uneven:
    return Uneven(seed=seed)
