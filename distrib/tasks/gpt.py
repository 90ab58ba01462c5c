"""A small decoder-only transformer (GPT): token and position embeddings, pre-norm blocks of causal self-attention
and an MLP, and an output head tied to the token embedding. Byte-level by default (a vocabulary of 256)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F


@dataclass(frozen=True)
class GPTConfig:
    """The model's shape: vocabulary, context length (block_size), layers, attention heads, width."""

    vocab: int = 256
    block_size: int = 128
    layers: int = 2
    heads: int = 4
    width: int = 128

    def __post_init__(self) -> None:
        for name in ("vocab", "block_size", "layers", "heads", "width"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a whole number >= 1, got {value!r}")
        if self.width % self.heads:
            raise ValueError(f"width {self.width} must divide into {self.heads} heads: choose a multiple of heads")


# Sizes by name; the block size is set apart (GPTConfig.sized). 12 tensors a block and 4 more in all.
PRESETS = {
    "tiny": GPTConfig(layers=1, heads=2, width=32),  # 25k parameters at block size 128: tests
    "small": GPTConfig(layers=2, heads=4, width=128),  # 0.45M: --task lm's default, learns in minutes on 2 cores
    "medium": GPTConfig(layers=8, heads=7, width=448),  # 19.5M parameters, 100 tensors: the benchmarks' GPT
}


def preset(name: str, block_size: int) -> GPTConfig:
    """The named size with this context length."""
    if name not in PRESETS:
        raise ValueError(f"model size must be one of {', '.join(PRESETS)}; got {name!r}")
    return dataclasses.replace(PRESETS[name], block_size=block_size)


class CausalSelfAttention(nn.Module):
    """Multi-head attention in which each position sees itself and the positions before it, never after."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.heads = config.heads
        self.qkv = nn.Linear(config.width, 3 * config.width)
        self.proj = nn.Linear(config.width, config.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, time, width = x.shape
        q, k, v = (
            t.view(batch, time, self.heads, width // self.heads).transpose(1, 2) for t in self.qkv(x).split(width, 2)
        )
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # [batch, heads, time, width / heads]
        return self.proj(y.transpose(1, 2).reshape(batch, time, width))


class Block(nn.Module):
    """Pre-norm residual block: x + attention(norm(x)), then x + MLP(norm(x))."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(config.width)
        self.attention = CausalSelfAttention(config)
        self.norm2 = nn.LayerNorm(config.width)
        self.mlp = nn.Sequential(
            nn.Linear(config.width, 4 * config.width), nn.GELU(), nn.Linear(4 * config.width, config.width)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class GPT(nn.Module):
    """Token ids [batch, time] to next-token logits [batch, time, vocab]."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.tokens = nn.Embedding(config.vocab, config.width)
        self.positions = nn.Embedding(config.block_size, config.width)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.layers))
        self.norm = nn.LayerNorm(config.width)
        self._init_weights()

    def _init_weights(self) -> None:
        """GPT-2's: normal(0, 0.02), zero biases, and the projections into the residual stream scaled by
        1/sqrt(2 * layers), so the stream's variance does not grow with depth."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear):
                nn.init.zeros_(module.bias)
        for block in self.blocks:
            for projection in (block.attention.proj, block.mlp[2]):
                nn.init.normal_(projection.weight, std=0.02 / math.sqrt(2 * self.config.layers))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        time = ids.shape[1]
        if time > self.config.block_size:
            raise ValueError(f"{time} tokens exceed the block size {self.config.block_size}: feed at most that many")
        x = self.tokens(ids) + self.positions(torch.arange(time, device=ids.device))
        for block in self.blocks:
            x = block(x)
        return self.norm(x) @ self.tokens.weight.T  # the head is the token embedding, tied

    @torch.no_grad()
    def generate(self, prompt: torch.Tensor, new: int, generator: torch.Generator, temperature: float = 0.8):
        """`prompt` [time] followed by `new` tokens sampled one at a time, each seeing the last block_size tokens."""
        ids = prompt
        for _ in range(new):
            logits = self(ids[-self.config.block_size :][None])[0, -1] / temperature
            choice = torch.multinomial(F.softmax(logits.float().cpu(), dim=0), 1, generator=generator)
            ids = torch.cat([ids, choice.to(ids.device)])
        return ids
