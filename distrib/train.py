"""python -m distrib.train: train a built-in task (or your own) on every rank the launcher started.

mpirun -n 4 python -m distrib.train                 # the default task, MPI collectives
torchrun --nproc-per-node 4 -m distrib.train --task autoencoder --allreduce ring
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path

import torch

import distrib
from distrib.checkpoint import Checkpointer, CheckpointError, TrainingState
from distrib.cli import options
from distrib.cli.optim import build_optimizer, build_schedule
from distrib.cli.options import fail
from distrib.cli.report import Reporter
from distrib.cli.stopping import Peers, StopSignals, watch_rank
from distrib.data import check as check_sharding
from distrib.env import LaunchError, read_world
from distrib.loop import LoopConfig, NonFiniteError, Optimizers, Progress, Stopped, fit
from distrib.tasks import Models, Task


def main(argv: list[str] | None = None) -> int:
    watch_rank()  # under MPICH, so that a rank killed by a signal is named; forks, so before torch starts threads
    args, task = options.parse(argv, __doc__)
    _share_cores()
    comm = _communicator(args)
    out = _run_dir(args, comm)
    models = task.build()
    wrapped, optimizers = _wrap(args, models, comm)
    progress = Progress()
    schedules = {
        phase: build_schedule(optimizer, args.schedule, args.warmup_steps, args.epochs, progress)
        for phase, optimizer in optimizers.items()
    }
    state = TrainingState(models, optimizers, schedules, progress, options.settings(args), task)
    saver = Checkpointer(out / "checkpoints", comm, state, args.checkpoint_every, args.keep)
    if args.resume:
        _resume(saver, out if args.resume is True else args.resume, out, comm)
    history, status = _train(args, task, wrapped, state, saver, comm, out)
    if status == 0 and comm.rank == 0:
        _save_results(out, models, history)
    return status


def _share_cores() -> None:
    """Ranks on one host share its cores: one rank's torch threads get its share, unless OMP_NUM_THREADS says."""
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // (read_world().local_size or 1)))


def _communicator(args: argparse.Namespace) -> distrib.Communicator:
    try:
        comm = distrib.init(args.backend, timeout=args.timeout, algorithm=args.allreduce)
    except (LaunchError, ValueError) as error:
        fail(f"argument --backend: {error}")
    try:
        check_sharding(1, args.batch_size, comm.rank, comm.size, seed=args.seed, epoch=0, drop_last=False)
    except ValueError as error:
        fail(f"argument --batch-size: {error}")
    return comm


def _wrap(args: argparse.Namespace, models: Models, comm: distrib.Communicator) -> tuple[Models, Optimizers]:
    """Each phase's model as the loop trains it, and its optimizer: DDP and a torch optimizer, or ZeRO-Offload."""
    try:
        if args.zero_offload:  # gradients cross ranks in the optimizer's step (reduce-scatter), not in hooks
            hyper = {"lr": args.lr, "weight_decay": args.weight_decay, "adamw": args.optimizer == "adamw"}
            zero = distrib.ZeroOffloadOptimizer
            return dict(models), {
                p: zero(m.parameters(), comm=comm, algorithm=args.allreduce, **hyper) for p, m in models.items()
            }
        ddp = distrib.DistributedDataParallel
        wrapped = {phase: ddp(m, comm=comm, algorithm=args.allreduce) for phase, m in models.items()}
        optimizers = {
            phase: build_optimizer(args.optimizer, m.parameters(), args.lr, args.weight_decay)
            for phase, m in wrapped.items()
        }
        return wrapped, optimizers
    except ValueError as error:  # e.g. a model that differs across ranks
        fail(f"argument --task: {error}")


def _train(
    args: argparse.Namespace,
    task: Task,
    models: Models,
    state: TrainingState,
    saver: Checkpointer,
    comm: distrib.Communicator,
    out: Path,
) -> tuple[list[dict[str, float]], int]:
    """Run the loop with its reports and checkpoints; every way it can end becomes a history and an exit status."""
    config = LoopConfig(args.epochs, args.batch_size, args.accumulation_steps, args.clip_grad, args.seed, args.on_nan)
    report = None
    if comm.rank == 0:
        report = Reporter(out, args.epochs, state.progress.total, not args.no_progress, args.tensorboard)

    def on_step(info: dict[str, float]) -> None:
        if report is not None:
            report.step(info, state.progress)
        saver.on_step()

    def on_epoch(stats: dict[str, float]) -> None:
        if report is not None:
            report.epoch(stats)
        saver.on_epoch()

    peers = Peers(comm)  # taken while every rank is alive, to name one that dies
    recording = distrib.trace(args.trace, comm) if args.trace else contextlib.nullcontext()
    with StopSignals() as stop, recording:
        try:
            progress = state.progress
            return fit(task, models, state.optimizers, comm, config, state.schedulers, on_step, on_epoch, progress,
                       stop), 0  # fmt: skip
        except Stopped as stopped:
            try:
                where = saver.save()
            except CheckpointError as error:
                fail(f"{error}; stopped by signal {stopped.signum} without a final checkpoint", status=1)
            _say(comm, f"stopped by signal {stopped.signum} after step {stopped.progress.total}; saved {where}, "
                 "continue with --resume")  # fmt: skip
            return [], 128 + stopped.signum
        except (NonFiniteError, CheckpointError) as error:  # a checkpoint that cannot be written: stop, not go on
            fail(str(error), status=1)
        except distrib.CollectiveError as error:
            lost = peers.describe_lost()
            if lost:
                raise type(error)(f"{error}; {lost}", error.culprits, error.stuck_pids) from None
            raise
        finally:
            if report is not None:
                report.close()


def _save_results(out: Path, models: Models, history: list[dict[str, float]]) -> None:
    """Rank 0: the weights as a plain state_dict, the learning curves, and the final validation stats."""
    weights = {p: m.state_dict() for p, m in models.items()}
    torch.save(weights["model"] if list(weights) == ["model"] else weights, out / "model.pt")
    from distrib.cli.plot import plot_run

    plot_run(out)
    shown = {k: v for k, v in history[-1].items() if k.startswith("val_") and k != "val_count"} if history else {}
    final = " (final " + ", ".join(f"{k} {v:.4g}" for k, v in shown.items()) + ")" if shown else ""
    print(f"run saved in {out}{final}")


def _resume(saver: Checkpointer, path: Path, out: Path, comm: distrib.Communicator) -> None:
    """Load the newest checkpoint that verifies, and keep metrics.jsonl to the epochs it covers."""
    try:
        where = saver.resume(path)
    except CheckpointError as error:
        fail(f"argument --resume: {error}")
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
        fail(problem)
    return comm.broadcast_object(out if comm.rank == 0 else None)


if __name__ == "__main__":
    sys.exit(main())
