"""The training benchmarks' GPT: distrib's "medium" preset (19.5M parameters in 100 tensors: embeddings, layer
norms, biases, matrices), the model of many small tensors that DDP's per-parameter hooks and buckets meet in
practice, beside the MLP's few large ones; "gpt-tiny" is the same code at the tiny preset, for smoke tests.
Batches are random byte sequences: the step's cost, not learning."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from distrib.tasks.gpt import GPT, preset

BLOCK = 64  # tokens per sequence
SIZES = {"gpt": "medium", "gpt-tiny": "tiny"}  # the benchmarks' model names, and their presets


def model(name: str = "gpt") -> GPT:
    torch.manual_seed(0)
    return GPT(preset(SIZES[name], BLOCK))


def batch(sequences: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids [sequences, BLOCK] and their next tokens, the same on every call."""
    ids = torch.randint(0, 256, (sequences, BLOCK + 1), generator=torch.Generator().manual_seed(1))
    return ids[:, :-1], ids[:, 1:]


def loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def describe(name: str = "gpt") -> str:
    config = preset(SIZES[name], BLOCK)
    return f"GPT ({config.layers}x{config.width}, {config.heads} heads, {BLOCK} tokens)"
