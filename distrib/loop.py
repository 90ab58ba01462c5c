"""The universal training loop of the seed: collect, extract, apply, targets, loss, gradients, step, validate.

The loop sees models and optimizers; whether gradients cross ranks in a DDP wrapper's hooks or in a ZeRO
optimizer's step, it does not know. Every rank runs the same steps, so no rank waits at an epoch's end.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from distrib.comm import Communicator
from distrib.data import Shard, shard, split
from distrib.tasks.base import Batch, Models, Task

Optimizers = dict[str, torch.optim.Optimizer]


@dataclass(frozen=True)
class LoopConfig:
    """How to go over the data: epochs, global batch, accumulation, clipping, and the shuffling seed."""

    epochs: int
    batch_size: int  # the global minibatch, over all ranks
    accumulation_steps: int = 1  # micro-batches per optimizer step
    clip_grad: float | None = None  # max global gradient norm, after averaging over ranks
    seed: int = 0


def train(
    task: Task,
    models: Models,
    optimizers: Optimizers,
    comm: Communicator,
    config: LoopConfig,
    schedulers: dict[str, torch.optim.lr_scheduler.LRScheduler] | None = None,
    on_step: Callable[[dict[str, float]], None] | None = None,
    on_epoch: Callable[[dict[str, float]], None] | None = None,
) -> list[dict[str, float]]:
    """Train for config.epochs; returns one stats dict per epoch (training loss, validation stats, speed)."""
    history = []
    for epoch in range(config.epochs):
        started = time.perf_counter()
        for model in models.values():
            model.train()
        dataset = task.collect(epoch, models, comm)  # from disk, or from agent-environment interaction
        loss_sums = torch.zeros(len(task.phases) + 1, dtype=torch.float64)  # per phase, then samples seen
        minibatches = shard(len(dataset[0]), config.batch_size, comm.rank, comm.size, epoch=epoch, seed=config.seed)
        for group in _groups(minibatches, config.accumulation_steps):  # shuffled, grouped, this rank's share
            samples = sum(s.global_count for s in group)  # the loss is a mean over all of them, on all ranks
            for p, phase in enumerate(task.phases):
                model, optimizer = models[phase], optimizers[phase]
                optimizer.zero_grad(set_to_none=True)
                for i, part in enumerate(group):
                    minibatch = [t[part.indices] for t in dataset]
                    # Gradients cross the network only on the last micro-batch of the group.
                    with _no_sync(model) if i < len(group) - 1 else contextlib.nullcontext():
                        guesses = task.apply(phase, models, minibatch)
                        targets = task.targets(phase, models, minibatch, guesses)
                        losses = task.loss(phase, guesses, targets)
                        (losses.sum() * (comm.size / samples)).backward()  # hooks average over ranks
                    loss_sums[p] += float(losses.detach().sum())
                norm = _clip(model, optimizer, config.clip_grad)
                optimizer.step()
                if schedulers and phase in schedulers:
                    schedulers[phase].step()
            loss_sums[-1] += sum(s.local_count for s in group)
            if on_step is not None:
                on_step({"epoch": epoch, "samples": samples, "grad_norm": norm})
        comm.allreduce(loss_sums)
        stats = {"epoch": epoch, **_train_losses(task, loss_sums), **validate(task, models, comm)}
        stats["samples_per_s"] = float(loss_sums[-1]) / (time.perf_counter() - started)
        stats["lr"] = optimizers[task.phases[0]].param_groups[0]["lr"]
        history.append(stats)
        if on_epoch is not None:
            on_epoch(stats)
    return history


@torch.no_grad()
def validate(task: Task, models: Models, comm: Communicator, chunk: int = 4096) -> dict[str, float]:
    """Validation stats over all ranks: each rank evaluates its slice, the sums are added, then divided once."""
    for model in models.values():
        model.eval()
    data = task.validation()
    start, stop = split(len(data[0]), comm.rank, comm.size)
    totals: dict[str, float] = {}
    for begin in range(start, stop, chunk) or [start]:  # a rank with an empty slice still reports its keys
        for key, value in task.evaluate(models, [t[begin : min(begin + chunk, stop)] for t in data]).items():
            totals[key] = totals.get(key, 0.0) + value
    keys = sorted(totals)
    sums = comm.allreduce(torch.tensor([totals.get(k, 0.0) for k in keys], dtype=torch.float64))
    count = float(sums[keys.index("count")])
    return {f"val_{k}": float(v) / count for k, v in zip(keys, sums) if k != "count"} | {"val_count": count}


def _groups(minibatches: Iterator[Shard], size: int) -> Iterator[list[Shard]]:
    """Micro-batches in groups of `size`; the last group may be shorter, never dropped."""
    group: list[Shard] = []
    for minibatch in minibatches:
        group.append(minibatch)
        if len(group) == size:
            yield group
            group = []
    if group:
        yield group


def _no_sync(model: torch.nn.Module) -> contextlib.AbstractContextManager:
    """A DDP wrapper's no_sync(); a plain model has nothing to skip."""
    no_sync = getattr(model, "no_sync", None)
    return no_sync() if no_sync is not None else contextlib.nullcontext()


def _clip(model: torch.nn.Module, optimizer: torch.optim.Optimizer, max_norm: float | None) -> float:
    """Clip by the global norm of the averaged gradients (a sharded optimizer clips across its shards)."""
    if max_norm is None:
        return float("nan")
    clip = getattr(optimizer, "clip_grad_norm_", None)
    if clip is not None:
        return float(clip(max_norm))
    return float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm))


def _train_losses(task: Task, sums: torch.Tensor) -> dict[str, float]:
    seen = max(float(sums[-1]), 1.0)
    if len(task.phases) == 1:
        return {"train_loss": float(sums[0]) / seen}
    return {f"train_loss_{phase}": float(sums[p]) / seen for p, phase in enumerate(task.phases)}


__all__ = ["Batch", "LoopConfig", "Optimizers", "train", "validate"]
