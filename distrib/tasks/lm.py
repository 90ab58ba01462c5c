"""Language modelling: a GPT learns to predict the next byte of real text (default: the Python standard library).

Each epoch's data is a fixed number of random windows of the training text, their starts drawn from (seed, epoch)
alone, so every rank and every world size sees the same windows, and a resumed epoch draws them again exactly.
The targets come from the input itself: each window shifted by one byte. Validation is bits per byte on evenly
spaced windows of the held-out files; the unigram entropy of the corpus is the bar a model must clear.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch.nn import functional as F

from distrib.comm import Communicator
from distrib.tasks import corpus as text
from distrib.tasks.base import Batch, Models, unwrap
from distrib.tasks.gpt import GPT, preset

_WINDOW_STREAM = 40_000  # the windows' draw, apart from the shuffle of distrib.data (seeded by (seed, epoch))


class LanguageModel:
    """Next-byte prediction with a GPT; val_bits_per_byte is the validation cross-entropy in bits."""

    phases = ("model",)
    # About two minutes at 4 ranks on 2 cores: 8 epochs of 128 steps of 32 windows of 128 bytes (4M bytes seen).
    defaults = {"epochs": 8, "batch_size": 32, "lr": 2e-3, "warmup_steps": 20}

    def __init__(
        self,
        seed: int = 0,
        corpus: text.Corpus | None = None,
        block_size: int = 128,
        size: str = "small",
        windows: int = 4096,
        val_windows: int = 256,
        prompt: bytes | None = None,
    ):
        self.corpus = corpus if corpus is not None else text.load()
        self.config = preset(size, block_size)
        for kind, data in (("training", self.corpus.train), ("validation", self.corpus.val)):
            if len(data) < block_size + 1:
                raise ValueError(
                    f"a window of {block_size} bytes and its next byte do not fit in the {len(data)} bytes of "
                    f"{kind} text: use a block size below {len(data)}, or more text"
                )
        self.seed, self.windows = seed, windows
        val_starts = np.linspace(0, len(self.corpus.val) - block_size - 1, val_windows).round().astype(np.int64)
        self._val = (torch.from_numpy(val_starts),)
        # The sample at the end continues the first line of the validation text, unless told otherwise.
        self.prompt = prompt if prompt is not None else bytes(self.corpus.val[:block_size].numpy()).split(b"\n")[0]

    def build(self) -> Models:
        torch.manual_seed(self.seed)
        return {"model": GPT(self.config)}

    def collect(self, epoch: int, models: Models, comm: Communicator) -> Batch:
        """This epoch's window starts in the training text (the windows are cut as minibatches need them)."""
        rng = np.random.default_rng((self.seed, epoch, _WINDOW_STREAM))
        return (torch.from_numpy(rng.integers(0, len(self.corpus.train) - self.config.block_size, self.windows)),)

    def validation(self) -> Batch:
        return self._val

    def apply(self, phase: str, models: Models, batch: Batch) -> torch.Tensor:
        return models[phase](self._window(self.corpus.train, batch[0], models[phase])[:, :-1])

    def targets(self, phase: str, models: Models, batch: Batch, guesses: torch.Tensor) -> torch.Tensor:
        return self._window(self.corpus.train, batch[0], models[phase])[:, 1:]  # from the input: the next bytes

    def loss(self, phase: str, guesses: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy (nats) over each window's positions: one value per window."""
        return F.cross_entropy(guesses.transpose(1, 2), targets, reduction="none").mean(1)

    def evaluate(self, models: Models, batch: Batch) -> dict[str, float]:
        ids = self._window(self.corpus.val, batch[0], models["model"])
        losses = self.loss("model", models["model"](ids[:, :-1]), ids[:, 1:])
        nats = float(losses.sum())
        return {"loss": nats, "bits_per_byte": nats / math.log(2), "count": float(len(losses))}

    def sample(self, models: Models, length: int = 300) -> str:
        """Text the model writes after the prompt, sampled with a generator seeded by the task's seed; bytes that are
        not printable UTF-8 show as U+FFFD."""
        model = unwrap(models["model"])
        device = next(model.parameters()).device
        prompt = torch.tensor(list(self.prompt or b"\n"), dtype=torch.int64, device=device)
        was_training = model.training
        model.eval()
        ids = model.generate(prompt, length, torch.Generator().manual_seed(self.seed))
        model.train(was_training)
        text = bytes(ids.tolist()).decode("utf-8", errors="replace")
        return "".join(c if c.isprintable() or c in "\n\t" else "\ufffd" for c in text)  # no terminal escapes

    def _window(self, data: torch.Tensor, starts: torch.Tensor, model: torch.nn.Module) -> torch.Tensor:
        """The block_size + 1 bytes from each start, as token ids on the model's device."""
        offsets = torch.arange(self.config.block_size + 1)
        device = next(unwrap(model).parameters()).device
        return data[starts[:, None] + offsets].to(device=device, dtype=torch.int64)
