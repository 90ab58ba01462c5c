"""The loop's bookkeeping, apart from the loop: where training stands, time per stage, the per-step agreement of
all ranks (non-finite values, stop signals), clipping, and each epoch's stats."""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from distrib import tracing
from distrib.comm import Communicator
from distrib.data import Shard
from distrib.device import synchronize

ON_NAN = ("error", "skip")
_BAD_LOSS, _BAD_GRAD = 1, 2  # a rank's flags in the per-step vote
log = logging.getLogger("distrib")


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

    def start_epoch(self, steps: int, phases: int) -> None:
        """The epoch's data is known: `steps` optimizer steps of `phases` models each."""
        self.steps = steps
        if self.loss_sums is None:  # a resumed epoch keeps the sums of the steps done before the checkpoint
            self.loss_sums = torch.zeros(phases + 1, dtype=torch.float64)


class NonFiniteError(FloatingPointError):
    """A loss or gradient was NaN or Inf; raised on every rank at the same step, naming it and the ranks."""


class Stopped(Exception):
    """Every rank stopped after the same step because `stop()` reported a signal on some rank."""

    def __init__(self, signum: int, progress: Progress) -> None:
        super().__init__(f"stopped by signal {signum} after step {progress.total}")
        self.signum, self.progress = signum, progress


class Clock:
    """This epoch's seconds per stage of the loop, and samples seen; each stage is also a span in a recording trace.

    "comm" is the part of the compute stages spent blocked on collectives: communication not hidden by compute.
    On a GPU each stage ends by waiting for the work it queued, so its time (and its span) includes that work.
    """

    def __init__(self, comm: Communicator, device: torch.device | None = None) -> None:
        self.comm, self.started, self.samples = comm, time.perf_counter(), 0
        self.device = device if device is not None else torch.device("cpu")
        self.seconds: dict[str, float] = {"comm": 0.0}

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start, blocked = time.perf_counter(), self.comm.blocked_seconds
        with tracing.span(name):
            yield
            synchronize(self.device)
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
        if name in ("forward", "backward", "step"):
            self.seconds["comm"] += self.comm.blocked_seconds - blocked


def clip(model: torch.nn.Module, optimizer: torch.optim.Optimizer, max_norm: float | None) -> float | None:
    """Clip by the global norm of the averaged gradients (a sharded optimizer clips across its shards)."""
    if max_norm is None:
        return None
    sharded = getattr(optimizer, "clip_grad_norm_", None)
    if sharded is not None:
        return float(sharded(max_norm))
    return float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm))


@dataclass(frozen=True)
class Verdict:
    """One phase's step as all ranks agreed on it: this rank's loss sum and the gradient norm, the ranks with a
    non-finite loss or gradient, the largest stop signal."""

    phase: str
    loss: float
    norm: float
    bad_loss: list[int]
    bad_grad: list[int]
    signal: int

    @property
    def finite(self) -> bool:
        return not (self.bad_loss or self.bad_grad)

    def report(self, progress: Progress, on_nan: str, loud: bool) -> None:
        """Raise NonFiniteError naming the step and the ranks, or (on_nan="skip") log the skipped step."""
        what = [f"loss on rank(s) {self.bad_loss}"] * bool(self.bad_loss)
        what += [f"gradient on rank(s) {self.bad_grad}"] * bool(self.bad_grad)
        where = f"step {progress.total + 1} (epoch {progress.epoch + 1}, step {progress.step + 1} of {progress.steps})"
        if on_nan == "error":
            raise NonFiniteError(
                f"{where}, phase {self.phase!r}: NaN or Inf {' and '.join(what)}; lower --lr, clip with --clip-grad, "
                "or pass --on-nan skip to drop such steps"
            )
        if loud:
            log.warning("distrib: %s, phase %r: NaN or Inf %s; step skipped", where, self.phase, " and ".join(what))


def vote(
    comm: Communicator,
    phase: str,
    loss: float,
    model: torch.nn.Module,
    norm: float | None,
    stop: Callable[[], int] | None,
) -> Verdict:
    """One small allreduce(max): each rank's non-finite flags in its own slot, and the largest stop signal."""
    flags = torch.zeros(comm.size + 1, dtype=torch.int64)
    grads_ok = math.isfinite(norm) if norm is not None else _finite_grads(model)
    flags[comm.rank] = (0 if math.isfinite(loss) else _BAD_LOSS) | (0 if grads_ok else _BAD_GRAD)
    flags[-1] = stop() if stop is not None else 0
    comm.allreduce(flags, op="max", algorithm="native")  # a few bytes: latency is all, so the backend's own
    ranks = flags[:-1].tolist()
    return Verdict(
        phase,
        loss,
        float("nan") if norm is None else norm,
        [r for r, f in enumerate(ranks) if f & _BAD_LOSS],
        [r for r, f in enumerate(ranks) if f & _BAD_GRAD],
        int(flags[-1]),
    )


def _finite_grads(model: torch.nn.Module) -> bool:
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    return not grads or bool(torch.stack([g.isfinite().all() for g in grads]).all())


def finish_step(
    progress: Progress,
    clock: Clock,
    group: Sequence[Shard],
    verdicts: Sequence[Verdict],
    lr: float,
    on_step: Callable[[dict[str, float]], None] | None,
) -> None:
    """Count the step (its losses only if every phase applied it), report it, and stop all ranks if one was asked."""
    local = sum(part.local_count for part in group)
    clock.samples += local
    finite = all(v.finite for v in verdicts)
    if finite:
        progress.loss_sums += torch.tensor([v.loss for v in verdicts] + [local], dtype=torch.float64)
    progress.skipped += not finite
    progress.step += 1
    progress.total += 1
    if on_step is not None:
        samples = sum(part.global_count for part in group)
        loss = verdicts[0].loss / max(local, 1)  # this rank's share of the global batch
        on_step({"epoch": progress.epoch, "samples": samples, "grad_norm": verdicts[-1].norm, "loss": loss, "lr": lr})
    if any(v.signal for v in verdicts):  # some rank was asked to stop: all stop here, after this step
        raise Stopped(max(v.signal for v in verdicts), progress)


def end_epoch(
    progress: Progress,
    phases: Sequence[str],
    comm: Communicator,
    clock: Clock,
    validation: dict[str, float],
    lr: float,
    on_nan: str,
) -> dict[str, float]:
    """The epoch's stats (training losses and throughput over all ranks, validation, time per stage); the
    position moves to the next epoch's start."""
    totals = comm.allreduce(torch.cat([progress.loss_sums, torch.tensor([clock.samples], dtype=torch.float64)]))
    seen = max(float(totals[-2]), 1.0)
    if len(phases) == 1:
        losses = {"train_loss": float(totals[0]) / seen}
    else:
        losses = {f"train_loss_{phase}": float(totals[p]) / seen for p, phase in enumerate(phases)}
    stats = {"epoch": progress.epoch, **losses, **validation}
    stats["samples_per_s"] = float(totals[-1]) / (time.perf_counter() - clock.started)
    stats |= {f"time_{name}_s": seconds for name, seconds in clock.seconds.items()}
    stats["lr"] = lr
    if on_nan == "skip":
        stats["skipped_steps"] = progress.skipped
    progress.epoch, progress.step, progress.loss_sums = progress.epoch + 1, 0, None
    return stats
