"""python -m distrib.train: train a built-in task (or your own) on every rank the launcher started.

mpirun -n 4 python -m distrib.train                 # the default task, MPI collectives
torchrun --nproc-per-node 4 -m distrib.train --task autoencoder --allreduce ring
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

import torch

import distrib
from distrib import tasks
from distrib.checkpoint import Checkpointer, CheckpointError, TrainingState
from distrib.data import check as check_sharding
from distrib.data import num_steps
from distrib.env import LaunchError, read_world
from distrib.loop import ON_NAN, LoopConfig, NonFiniteError, Progress, Stopped, train
from distrib.optim import OPTIMIZERS, SCHEDULES, build_optimizer, build_schedule
from distrib.report import Reporter
from distrib.stopping import Peers, StopSignals, watch_rank
from distrib.tasks.classify import Classify, read_data
from distrib.tracing import trace


class _Parser(argparse.ArgumentParser):
    """Bad options: one line naming the option and what is allowed, exit status 2, and only rank 0 says it."""

    def error(self, message: str) -> None:  # type: ignore[override]
        _fail(message)


def _fail(message: str, status: int = 2) -> None:
    """One line on rank 0, then every rank exits: 2 for a user's mistake, 1 for a failed run."""
    try:
        quiet = read_world().rank != 0
    except LaunchError:
        quiet = False
    if not quiet:
        print(f"python -m distrib.train: error: {message}", file=sys.stderr)
    sys.exit(status)


def _positive(kind: type):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a positive {kind.__name__}, got {text!r}") from None
        if not value > 0 or value != value:
            raise argparse.ArgumentTypeError(f"must be a positive {kind.__name__}, got {text!r}")
        return value

    return parse


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 0, got {text!r}")
    return value


def parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="python -m distrib.train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--task", default="classify", help=f"built-in ({', '.join(tasks.BUILTIN)}) or package.module:factory"
    )
    p.add_argument("--epochs", type=_positive(int), default=5)
    p.add_argument("--batch-size", type=_positive(int), default=128, help="the global minibatch, over all ranks")
    p.add_argument("--lr", type=_positive(float), default=3e-3)
    p.add_argument("--optimizer", choices=OPTIMIZERS, default="adam")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--schedule", choices=SCHEDULES, default="cosine", help="after the warm-up")
    p.add_argument("--warmup-steps", type=_non_negative_int, default=20)
    p.add_argument("--accumulation-steps", type=_positive(int), default=1, help="micro-batches per optimizer step")
    p.add_argument("--clip-grad", type=_positive(float), default=None, help="max global gradient norm")
    p.add_argument("--seed", type=_non_negative_int, default=0)
    p.add_argument("--backend", choices=distrib.BACKENDS, default=None, help="default: from the launcher")
    p.add_argument("--allreduce", choices=distrib.ALGORITHMS, default="native", help="the gradient allreduce")
    p.add_argument("--timeout", type=_positive(float), default=None, help="seconds a collective waits for a peer")
    p.add_argument("--zero-offload", action="store_true", help="ZeRO-Offload: sharded Adam(W) steps on the CPU")
    p.add_argument("--data", type=Path, default=None, help="(inputs, labels) saved by torch.save, for --task classify")
    p.add_argument("--out", type=Path, default=None, help="run directory (default: runs/TASK-TIME)")
    p.add_argument(
        "--checkpoint-every", type=_positive(int), default=None, metavar="N", help="steps (also: at each epoch's end)"
    )
    p.add_argument("--keep", type=_positive(int), default=3, metavar="K", help="the newest K checkpoints are kept")
    p.add_argument(
        "--resume", nargs="?", const=True, type=Path, metavar="PATH", help="from the newest checkpoint in --out or PATH"
    )
    p.add_argument(
        "--on-nan", choices=ON_NAN, default="error", help="a NaN/Inf loss or gradient: fail, or skip the step"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar on rank 0")
    p.add_argument("--trace", type=Path, default=None, help="write a Chrome trace (Perfetto) of every rank here")
    p.add_argument("--tensorboard", type=Path, default=None, help="write TensorBoard scalars here (rank 0)")
    return p


def _zero(args: argparse.Namespace, model: torch.nn.Module, comm: distrib.Communicator) -> torch.optim.Optimizer:
    """ZeRO-Offload's optimizer for a plain model: Adam or AdamW, the only optimizers it shards."""
    if args.optimizer not in ("adam", "adamw"):
        _fail(f"argument --zero-offload: shards Adam and AdamW only, not --optimizer {args.optimizer}")
    return distrib.ZeroOffloadOptimizer(
        model.parameters(), lr=args.lr, weight_decay=args.weight_decay, adamw=args.optimizer == "adamw", comm=comm,
        algorithm=args.allreduce,
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    watch_rank()  # under MPICH, so that a rank killed by a signal is named; forks, so before torch starts threads
    task = _task(args)
    if getattr(task, "defaults", None):  # a task's own defaults (RL needs more epochs); the command line wins
        defaults = parser()
        defaults.set_defaults(**task.defaults)
        args = defaults.parse_args(argv)
    if "OMP_NUM_THREADS" not in os.environ:  # ranks on one host share its cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // (read_world().local_size or 1)))
    if args.tensorboard is not None and importlib.util.find_spec("tensorboard") is None:
        _fail("argument --tensorboard: needs the tensorboard package; pip install tensorboard")
    try:
        comm = distrib.init(args.backend, timeout=args.timeout, algorithm=args.allreduce)
    except (LaunchError, ValueError) as error:
        _fail(f"argument --backend: {error}")
    try:
        check_sharding(1, args.batch_size, comm.rank, comm.size, seed=args.seed, epoch=0, drop_last=False)
    except ValueError as error:
        _fail(f"argument --batch-size: {error}")
    if args.resume is True and args.out is None:
        _fail("argument --resume: name the run to continue, as --out RUN_DIR or --resume RUN_DIR")
    out = _run_dir(args, comm)

    models = task.build()
    try:
        if args.zero_offload:  # gradients cross ranks in the optimizer's step (reduce-scatter), not in hooks
            wrapped = dict(models)
            optimizers = {phase: _zero(args, m, comm) for phase, m in models.items()}
        else:
            wrapped = {
                phase: distrib.DistributedDataParallel(m, comm=comm, algorithm=args.allreduce)
                for phase, m in models.items()
            }
            optimizers = {
                phase: build_optimizer(args.optimizer, m.parameters(), args.lr, args.weight_decay)
                for phase, m in wrapped.items()
            }
    except ValueError as error:  # e.g. a model that differs across ranks
        _fail(f"argument --task: {error}")
    steps = args.epochs * -(
        -num_steps(len(task.collect(0, models, comm)[0]), args.batch_size) // args.accumulation_steps
    )
    schedules = {phase: build_schedule(o, args.schedule, args.warmup_steps, steps) for phase, o in optimizers.items()}
    config = LoopConfig(args.epochs, args.batch_size, args.accumulation_steps, args.clip_grad, args.seed, args.on_nan)
    state = TrainingState(models, optimizers, schedules, Progress(), _settings(args), task)
    saver = Checkpointer(out / "checkpoints", comm, state, args.checkpoint_every, args.keep)
    if args.resume:
        _resume(saver, out if args.resume is True else args.resume, out, comm)

    report = None
    if comm.rank == 0:
        report = Reporter(out, args.epochs, steps, state.progress.total, not args.no_progress, args.tensorboard)

    def on_step(info: dict[str, float]) -> None:
        if report is not None:
            report.step(info)
        saver.on_step()

    def on_epoch(stats: dict[str, float]) -> None:
        if report is not None:
            report.epoch(stats)
        saver.on_epoch()

    peers = Peers(comm)  # taken while every rank is alive, to name one that dies
    recording = trace(args.trace, comm) if args.trace else contextlib.nullcontext()
    with StopSignals() as stop, recording:
        try:
            history = train(task, wrapped, optimizers, comm, config, schedules, on_step, on_epoch, state.progress, stop)
        except Stopped as stopped:
            try:
                where = saver.save()
            except CheckpointError as error:
                _fail(f"{error}; stopped by signal {stopped.signum} without a final checkpoint", status=1)
            _say(comm, f"stopped by signal {stopped.signum} after step {stopped.progress.total}; saved {where}, "
                 "continue with --resume")  # fmt: skip
            return 128 + stopped.signum
        except NonFiniteError as error:
            _fail(str(error), status=1)
        except CheckpointError as error:  # a checkpoint could not be written: stop rather than run unprotected
            _fail(str(error), status=1)
        except distrib.CollectiveError as error:
            lost = peers.describe_lost()
            if lost:
                raise type(error)(f"{error}; {lost}") from None
            raise
        finally:
            if report is not None:
                report.close()
    if comm.rank == 0:
        weights = {p: m.state_dict() for p, m in models.items()}
        torch.save(weights["model"] if list(weights) == ["model"] else weights, out / "model.pt")
        from distrib.plot import plot_run

        plot_run(out)
        shown = {k: v for k, v in history[-1].items() if k.startswith("val_") and k != "val_count"} if history else {}
        final = " (final " + ", ".join(f"{k} {v:.4g}" for k, v in shown.items()) + ")" if shown else ""
        print(f"run saved in {out}{final}")
    return 0


def _task(args: argparse.Namespace) -> tasks.Task:
    """The task by name, or the classify task over the tensors of --data."""
    if args.data is None:
        try:
            return tasks.load(args.task, seed=args.seed)
        except ValueError as error:
            _fail(f"argument --task: {error}")
    if args.task != "classify":
        _fail(f"argument --data: only --task classify reads --data, not {args.task!r}; drop --data")
    try:
        return Classify(seed=args.seed, data=read_data(args.data))
    except ValueError as error:
        _fail(f"argument --data: {error}")


def _settings(args: argparse.Namespace) -> dict[str, object]:
    """What a resumed run must share with the one that wrote the checkpoint, for the data position to hold."""
    keys = ("task", "batch_size", "accumulation_steps", "seed", "optimizer")
    return {f"--{k.replace('_', '-')}": getattr(args, k) for k in keys}


def _resume(saver: Checkpointer, path: Path, out: Path, comm: distrib.Communicator) -> None:
    """Load the newest checkpoint that verifies, and keep metrics.jsonl to the epochs it covers."""
    try:
        where = saver.resume(path)
    except CheckpointError as error:
        _fail(f"argument --resume: {error}")
    progress = saver.state.progress
    if comm.rank == 0:
        lines = (out / "metrics.jsonl").read_text().splitlines()
        kept = [line for line in lines if line.strip() and json.loads(line)["epoch"] < progress.epoch]
        (out / "metrics.jsonl").write_text("".join(line + "\n" for line in kept))
    _say(comm, f"resuming from {where}: epoch {progress.epoch + 1}, {progress.step} of its steps done")


def _say(comm: distrib.Communicator, message: str) -> None:
    if comm.rank == 0:
        print(message, file=sys.stderr, flush=True)


def _run_dir(args: argparse.Namespace, comm: distrib.Communicator) -> Path:
    """Rank 0 makes the run directory once the arguments are known good; a bad one is a clear error on all ranks."""
    problem = None
    if comm.rank == 0:
        out = (
            args.out
            or Path("runs") / f"{args.task.replace(':', '-').replace('.', '-')}-{time.strftime('%Y%m%d-%H%M%S')}"
        )
        if not args.resume and any((out / "checkpoints").glob("step-*")):
            problem = (
                f"argument --out: {out} holds the checkpoints of an earlier run; continue it with --resume, "
                "or choose another --out"
            )
        else:
            try:
                (out / "checkpoints").mkdir(parents=True, exist_ok=True)
                if not args.resume or not (out / "metrics.jsonl").exists():
                    (out / "metrics.jsonl").write_text("")
            except OSError as error:
                where = error.filename or out
                problem = (
                    f"argument --out: cannot write to {where}: {error.strerror or error}; choose a writable directory"
                )
    problem = comm.broadcast_object(problem)
    if problem:
        _fail(problem)
    return comm.broadcast_object(out if comm.rank == 0 else None)


if __name__ == "__main__":
    sys.exit(main())
