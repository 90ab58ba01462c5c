"""The universal training loop of the seed: collect, extract, apply, targets, loss, gradients, step, validate.

The loop sees models and optimizers; whether gradients cross ranks in a DDP wrapper's hooks or in a ZeRO
optimizer's step, it does not know. Every rank runs the same steps, so no rank waits at an epoch's end, and
every rank takes the same decision on a non-finite step or a stop request, so none is left waiting either.
The bookkeeping (time per stage, that agreement, loss sums) lives in distrib/steps.py. The device is the models':
data collected on the CPU goes there (distrib/device.py), and the losses and validation sums stay there until the
one small collective per step or epoch that needs them.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from distrib.comm import Communicator
from distrib.data import Shard, loss_scale, num_steps, shard, split
from distrib.device import PRECISIONS, Feeder, autocast, where
from distrib.local_sgd import settle
from distrib.steps import ON_NAN, Clock, NonFiniteError, Progress, Stopped, Verdict, clip, end_epoch, finish_step, vote
from distrib.tasks.base import Batch, Models, Task

Optimizers = dict[str, torch.optim.Optimizer]
Schedulers = dict[str, torch.optim.lr_scheduler.LRScheduler]
VALIDATION_CHUNK = 4096  # samples a rank evaluates at once: bounds the memory of a large validation set


@dataclass(frozen=True)
class LoopConfig:
    """How to go over the data: epochs, global batch, accumulation, clipping, the shuffling seed, NaN policy, and
    the precision of forward passes ("bf16": autocast on the models' device, weights and optimizer stay fp32)."""

    epochs: int
    batch_size: int  # the global minibatch, over all ranks
    accumulation_steps: int = 1  # micro-batches per optimizer step
    clip_grad: float | None = None  # max global gradient norm, after averaging over ranks
    seed: int = 0
    on_nan: str = "error"  # a non-finite loss or gradient: "error" stops the run, "skip" drops that step
    precision: str = "fp32"

    def __post_init__(self) -> None:
        if self.on_nan not in ON_NAN:
            raise ValueError(f"on_nan must be one of {', '.join(ON_NAN)}; got {self.on_nan!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}; got {self.precision!r}")


def fit(
    task: Task,
    models: Models,
    optimizers: Optimizers,
    comm: Communicator,
    config: LoopConfig,
    schedulers: Schedulers | None = None,
    on_step: Callable[[dict[str, float]], None] | None = None,
    on_epoch: Callable[[dict[str, float]], None] | None = None,
    progress: Progress | None = None,
    stop: Callable[[], int] | None = None,
) -> list[dict[str, float]]:
    """Train from `progress` (default: the start) to config.epochs; returns one stats dict per epoch trained.

    `progress` is kept current, so a checkpoint taken in on_step or on_epoch resumes exactly there. `stop()`
    returns a signal number (0: go on); once any rank reports one, all raise Stopped after the same step.
    """
    progress = progress if progress is not None else Progress()
    history = []
    reported = optimizers[task.phases[0]].param_groups[0]  # whose lr the steps and epochs report
    feeder = Feeder(where(models[task.phases[0]]))  # the models' device, where every minibatch goes
    while progress.epoch < config.epochs:
        clock = Clock(comm, feeder.device)
        for model in models.values():
            model.train()
        with clock("collect"):
            dataset = task.collect(progress.epoch, models, comm)  # from disk, or from agent-environment interaction
            rows = functools.partial(feeder.rows, feeder.hold(dataset))  # held on the device if it fits there
        for group in _extract(dataset, task, config, comm, progress):  # shuffled global batches, this rank's share
            verdicts = [
                _step(task, phase, models, optimizers[phase], rows, group, comm, clock, progress, config, stop)
                for phase in task.phases
            ]
            for phase in task.phases:
                if schedulers and phase in schedulers:
                    schedulers[phase].step()  # the schedule follows the data, skipped steps included
            finish_step(progress, clock, group, verdicts, reported["lr"], on_step)  # raises Stopped if a rank was asked
        with clock("step"):
            settle(optimizers)  # local SGD: the ranks' replicas averaged, so all validate (and save) one model
        with clock("validation"):
            validation = validate(task, models, comm, config.precision)  # reduced over all ranks
        history.append(end_epoch(progress, task.phases, comm, clock, validation, reported["lr"], config.on_nan))
        if on_epoch is not None:
            on_epoch(history[-1])
    return history


def _extract(
    dataset: Batch, task: Task, config: LoopConfig, comm: Communicator, progress: Progress
) -> Iterator[list[Shard]]:
    """This epoch's global batches, as this rank's micro-batches grouped per optimizer step; after a resume, from
    the step it stopped at."""
    n = len(dataset[0])
    progress.start_epoch(-(-num_steps(n, config.batch_size) // config.accumulation_steps), len(task.phases))
    minibatches = shard(n, config.batch_size, comm.rank, comm.size, epoch=progress.epoch, seed=config.seed)
    yield from itertools.islice(_groups(minibatches, config.accumulation_steps), progress.step, None)


def _step(
    task: Task,
    phase: str,
    models: Models,
    optimizer: torch.optim.Optimizer,
    rows: Callable[[torch.Tensor], list[torch.Tensor]],
    group: list[Shard],
    comm: Communicator,
    clock: Clock,
    progress: Progress,
    config: LoopConfig,
    stop: Callable[[], int] | None,
) -> Verdict:
    """One phase's optimizer step on one global batch: apply, targets, loss, gradients, collect, apply gradients.

    `rows(indices)`: those rows of the epoch's data, on the device of the models.
    """
    model = models[phase]
    device = where(model)
    optimizer.zero_grad(set_to_none=True)
    scale = loss_scale(sum(part.global_count for part in group), comm.size)  # the mean over the whole global batch
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)  # on the device: read once, by the vote
    for i, part in enumerate(group):  # micro-batches: gradients cross ranks on the last one only (accumulation)
        with clock("data"):
            minibatch = rows(part.indices)
        with _no_sync(model) if i < len(group) - 1 else contextlib.nullcontext():
            with clock("forward"), autocast(device, config.precision):
                guesses = task.apply(phase, models, minibatch)
                targets = task.targets(phase, models, minibatch, guesses)  # given, from the input, noise or rewards
                losses = task.loss(phase, guesses, targets).float()  # per sample
            with clock("backward"):
                (losses.sum() * scale).backward()  # DDP's hooks average the gradients over ranks; ZeRO's step does
        loss_sum += losses.detach().sum()
    with clock("step"):
        norm = clip(model, optimizer, config.clip_grad)
    with clock("wait"):  # a tiny allreduce: its time is mostly waiting for the slowest rank
        verdict = vote(comm, phase, float(loss_sum), model, norm, stop)  # every rank decides alike
    if verdict.finite:
        with clock("step"):
            optimizer.step()  # ZeRO: reduce-scatter, CPU step, allgather; local SGD: every H steps, the outer step
    else:
        verdict.report(progress, config.on_nan, comm.rank == 0)  # raises NonFiniteError, or logs the skip
    return verdict


@torch.no_grad()
def validate(task: Task, models: Models, comm: Communicator, precision: str = "fp32") -> dict[str, float]:
    """Validation stats over all ranks: each rank evaluates its slice on the models' device, the sums are added
    there (floats or 0-d tensors), then over ranks in one allreduce, then divided once."""
    for model in models.values():
        model.eval()
    feeder = Feeder(where(next(iter(models.values()))))
    data = task.validation()
    start, stop = split(len(data[0]), comm.rank, comm.size)
    totals: dict[str, float | torch.Tensor] = {}
    for begin in range(start, stop, VALIDATION_CHUNK) or [start]:  # a rank with an empty slice still reports its keys
        chunk = feeder.rows(data, slice(begin, min(begin + VALIDATION_CHUNK, stop)))
        with autocast(feeder.device, precision):
            for key, value in task.evaluate(models, chunk).items():
                totals[key] = totals.get(key, 0.0) + value
    keys = sorted(totals)
    sums = torch.stack([torch.as_tensor(totals[k], dtype=torch.float64, device=feeder.device) for k in keys])
    sums = comm.allreduce(sums).tolist()
    count = sums[keys.index("count")]
    return {f"val_{k}": v / count for k, v in zip(keys, sums) if k != "count"} | {"val_count": count}


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


__all__ = [
    "ON_NAN", "Batch", "LoopConfig", "NonFiniteError", "Optimizers", "Progress", "Stopped", "fit", "validate",
]  # fmt: skip
