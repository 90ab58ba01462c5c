"""The universal training loop of the seed: collect, extract, apply, targets, loss, gradients, step, validate.

The loop sees models and optimizers; whether gradients cross ranks in a DDP wrapper's hooks or in a ZeRO
optimizer's step, it does not know. Every rank runs the same steps, so no rank waits at an epoch's end, and
every rank takes the same decision on a non-finite step or a stop request, so none is left waiting either.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from distrib import tracing
from distrib.comm import Communicator
from distrib.data import Shard, num_steps, shard, split
from distrib.tasks.base import Batch, Models, Task

Optimizers = dict[str, torch.optim.Optimizer]
ON_NAN = ("error", "skip")
_BAD_LOSS, _BAD_GRAD = 1, 2  # a rank's flags in the per-step agreement
log = logging.getLogger("distrib")


@dataclass(frozen=True)
class LoopConfig:
    """How to go over the data: epochs, global batch, accumulation, clipping, the shuffling seed, NaN policy."""

    epochs: int
    batch_size: int  # the global minibatch, over all ranks
    accumulation_steps: int = 1  # micro-batches per optimizer step
    clip_grad: float | None = None  # max global gradient norm, after averaging over ranks
    seed: int = 0
    on_nan: str = "error"  # a non-finite loss or gradient: "error" stops the run, "skip" drops that step

    def __post_init__(self) -> None:
        if self.on_nan not in ON_NAN:
            raise ValueError(f"on_nan must be one of {', '.join(ON_NAN)}; got {self.on_nan!r}")


@dataclass
class Progress:
    """Where training stands; with the weights and the optimizer state, all that an exact resume needs.

    The data position is `step`, the optimizer steps (global batches) done in the epoch: distrib.data makes the
    global batch the unit, so the position means the same at any world size.
    """

    epoch: int = 0
    step: int = 0  # optimizer steps done in this epoch
    total: int = 0  # optimizer steps done since the start of training
    skipped: int = 0  # steps dropped for a non-finite loss or gradient (on_nan="skip")
    steps: int = 0  # optimizer steps in this epoch, known once its data is collected
    loss_sums: torch.Tensor | None = None  # this rank's loss sums of the epoch so far: per phase, then samples


class NonFiniteError(FloatingPointError):
    """A loss or gradient was NaN or Inf; raised on every rank at the same step, naming it and the ranks."""


class Stopped(Exception):
    """Every rank stopped after the same step because `stop()` reported a signal on some rank."""

    def __init__(self, signum: int, progress: Progress) -> None:
        super().__init__(f"stopped by signal {signum} after step {progress.total}")
        self.signum, self.progress = signum, progress


def train(
    task: Task,
    models: Models,
    optimizers: Optimizers,
    comm: Communicator,
    config: LoopConfig,
    schedulers: dict[str, torch.optim.lr_scheduler.LRScheduler] | None = None,
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
    while progress.epoch < config.epochs:
        epoch, started, seen, stage = progress.epoch, time.perf_counter(), 0, _Stages(comm)
        for model in models.values():
            model.train()
        with stage("collect"):
            dataset = task.collect(epoch, models, comm)  # from disk, or from agent-environment interaction
        if progress.loss_sums is None:
            progress.loss_sums = torch.zeros(len(task.phases) + 1, dtype=torch.float64)  # per phase, then samples
        progress.steps = -(-num_steps(len(dataset[0]), config.batch_size) // config.accumulation_steps)
        minibatches = shard(len(dataset[0]), config.batch_size, comm.rank, comm.size, epoch=epoch, seed=config.seed)
        groups = itertools.islice(_groups(minibatches, config.accumulation_steps), progress.step, None)
        for group in groups:  # shuffled, grouped, this rank's share; after a resume, from where it stopped
            samples = sum(s.global_count for s in group)  # the loss is a mean over all of them, on all ranks
            sums, verdicts = torch.zeros_like(progress.loss_sums), []
            for p, phase in enumerate(task.phases):
                model, optimizer = models[phase], optimizers[phase]
                optimizer.zero_grad(set_to_none=True)
                for i, part in enumerate(group):
                    with stage("data"):
                        minibatch = [t[part.indices] for t in dataset]
                    # Gradients cross the network only on the last micro-batch of the group.
                    with _no_sync(model) if i < len(group) - 1 else contextlib.nullcontext():
                        with stage("forward"):
                            guesses = task.apply(phase, models, minibatch)
                            targets = task.targets(phase, models, minibatch, guesses)
                            losses = task.loss(phase, guesses, targets)
                        with stage("backward"):
                            (losses.sum() * (comm.size / samples)).backward()  # hooks average over ranks
                    sums[p] += float(losses.detach().sum())
                with stage("step"):
                    norm = _clip(model, optimizer, config.clip_grad)
                with stage("wait"):  # a tiny allreduce: its time is mostly waiting for the slowest rank
                    verdicts.append(_agree(comm, float(sums[p]), model, norm if config.clip_grad else None, stop))
                if verdicts[-1].finite:
                    with stage("step"):
                        optimizer.step()
                else:
                    _non_finite(verdicts[-1], phase, progress, config.on_nan, comm.rank == 0)  # raise, or log
                if schedulers and phase in schedulers:
                    schedulers[phase].step()  # the schedule follows the data, skipped steps included
            sums[-1] = sum(s.local_count for s in group)
            seen += float(sums[-1])
            _advance(progress, progress.loss_sums, sums, all(v.finite for v in verdicts))
            if on_step is not None:
                lr = optimizers[task.phases[0]].param_groups[0]["lr"]
                loss = float(sums[0]) / max(float(sums[-1]), 1.0)  # this rank's share of the global batch
                on_step({"epoch": epoch, "samples": samples, "grad_norm": norm, "loss": loss, "lr": lr})
            if any(v.signal for v in verdicts):  # some rank was asked to stop: all stop here, after this step
                raise Stopped(max(v.signal for v in verdicts), progress)
        totals = comm.allreduce(torch.cat([progress.loss_sums, torch.tensor([seen], dtype=torch.float64)]))
        with stage("validation"):
            validation = validate(task, models, comm)
        stats = {"epoch": epoch, **_train_losses(task, totals[:-1]), **validation}
        stats["samples_per_s"] = float(totals[-1]) / (time.perf_counter() - started)
        stats |= {f"time_{name}_s": seconds for name, seconds in stage.seconds.items()}
        stats["lr"] = optimizers[task.phases[0]].param_groups[0]["lr"]
        if config.on_nan == "skip":
            stats["skipped_steps"] = progress.skipped
        progress.epoch, progress.step, progress.loss_sums = epoch + 1, 0, None
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


class _Stages:
    """Seconds spent per stage of the loop this epoch; each stage is also a span when a trace is recording.

    "comm" is the part of the compute stages spent blocked on collectives: communication not hidden by compute.
    """

    def __init__(self, comm: Communicator) -> None:
        self.comm = comm
        self.seconds: dict[str, float] = {"comm": 0.0}

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start, blocked = time.perf_counter(), self.comm.blocked_seconds
        with tracing.span(name):
            yield
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
        if name in ("forward", "backward", "step"):
            self.seconds["comm"] += self.comm.blocked_seconds - blocked


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


@dataclass(frozen=True)
class _Verdict:
    """One phase's step, as all ranks agreed on it: ranks with a non-finite loss or gradient, a stop signal."""

    bad_loss: list[int]
    bad_grad: list[int]
    signal: int

    @property
    def finite(self) -> bool:
        return not (self.bad_loss or self.bad_grad)


def _agree(
    comm: Communicator, loss: float, model: torch.nn.Module, norm: float | None, stop: Callable[[], int] | None
) -> _Verdict:
    """One small allreduce(max): each rank's non-finite flags in its own slot, and the largest stop signal."""
    flags = torch.zeros(comm.size + 1, dtype=torch.int64)
    grads_ok = math.isfinite(norm) if norm is not None else _finite_grads(model)
    flags[comm.rank] = (0 if math.isfinite(loss) else _BAD_LOSS) | (0 if grads_ok else _BAD_GRAD)
    flags[-1] = stop() if stop is not None else 0
    comm.allreduce(flags, op="max", algorithm="native")  # a few bytes: latency is all, so the backend's own
    ranks = flags[:-1].tolist()
    return _Verdict(
        [r for r, f in enumerate(ranks) if f & _BAD_LOSS],
        [r for r, f in enumerate(ranks) if f & _BAD_GRAD],
        int(flags[-1]),
    )


def _finite_grads(model: torch.nn.Module) -> bool:
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    return not grads or bool(torch.stack([g.isfinite().all() for g in grads]).all())


def _non_finite(verdict: _Verdict, phase: str, progress: Progress, on_nan: str, loud: bool) -> None:
    """Raise NonFiniteError naming the step and the ranks, or (on_nan="skip") log the skipped step."""
    what = [f"loss on rank(s) {verdict.bad_loss}"] * bool(verdict.bad_loss)
    what += [f"gradient on rank(s) {verdict.bad_grad}"] * bool(verdict.bad_grad)
    where = f"step {progress.total + 1} (epoch {progress.epoch + 1}, step {progress.step + 1} of {progress.steps})"
    if on_nan == "error":
        raise NonFiniteError(
            f"{where}, phase {phase!r}: NaN or Inf {' and '.join(what)}; lower --lr, clip with --clip-grad, "
            "or pass --on-nan skip to drop such steps"
        )
    if loud:
        log.warning("distrib: %s, phase %r: NaN or Inf %s; step skipped", where, phase, " and ".join(what))


def _advance(progress: Progress, loss_sums: torch.Tensor, sums: torch.Tensor, finite: bool) -> None:
    """One step done; the epoch's loss sums count only the steps applied."""
    if finite:
        loss_sums += sums
    progress.skipped += not finite
    progress.step += 1
    progress.total += 1


def _train_losses(task: Task, sums: torch.Tensor) -> dict[str, float]:
    seen = max(float(sums[-1]), 1.0)
    if len(task.phases) == 1:
        return {"train_loss": float(sums[0]) / seen}
    return {f"train_loss_{phase}": float(sums[p]) / seen for p, phase in enumerate(task.phases)}


__all__ = [
    "ON_NAN", "Batch", "LoopConfig", "NonFiniteError", "Optimizers", "Progress", "Stopped", "train", "validate",
]  # fmt: skip
