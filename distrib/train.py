"""python -m distrib.train: train a built-in task (or your own) on every rank the launcher started.

mpirun -n 4 python -m distrib.train                 # the default task, MPI collectives
torchrun --nproc-per-node 4 -m distrib.train --task autoencoder --allreduce ring
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

import distrib
from distrib import tasks
from distrib.data import check as check_sharding
from distrib.data import num_steps
from distrib.env import LaunchError, read_world
from distrib.loop import LoopConfig, train
from distrib.optim import OPTIMIZERS, SCHEDULES, build_optimizer, build_schedule


class _Parser(argparse.ArgumentParser):
    """Bad options: one line naming the option and what is allowed, exit status 2, and only rank 0 says it."""

    def error(self, message: str) -> None:  # type: ignore[override]
        _fail(message)


def _fail(message: str) -> None:
    try:
        quiet = read_world().rank != 0
    except LaunchError:
        quiet = False
    if not quiet:
        print(f"python -m distrib.train: error: {message}", file=sys.stderr)
    sys.exit(2)


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
    p.add_argument("--out", type=Path, default=None, help="run directory (default: runs/TASK-TIME)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on rank 0")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if "OMP_NUM_THREADS" not in os.environ:  # ranks on one host share its cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // (read_world().local_size or 1)))
    try:
        task = tasks.load(args.task, seed=args.seed)
    except ValueError as error:
        _fail(f"argument --task: {error}")
    try:
        comm = distrib.init(args.backend, timeout=args.timeout, algorithm=args.allreduce)
    except (LaunchError, ValueError) as error:
        _fail(f"argument --backend: {error}")
    try:
        check_sharding(1, args.batch_size, comm.rank, comm.size, seed=args.seed, epoch=0, drop_last=False)
    except ValueError as error:
        _fail(f"argument --batch-size: {error}")
    out = _run_dir(args, comm)

    models = task.build()
    wrapped = {
        phase: distrib.DistributedDataParallel(m, comm=comm, algorithm=args.allreduce) for phase, m in models.items()
    }
    optimizers = {
        phase: build_optimizer(args.optimizer, m.parameters(), args.lr, args.weight_decay)
        for phase, m in wrapped.items()
    }
    steps = args.epochs * -(
        -num_steps(len(task.collect(0, models, comm)[0]), args.batch_size) // args.accumulation_steps
    )
    schedules = {phase: build_schedule(o, args.schedule, args.warmup_steps, steps) for phase, o in optimizers.items()}
    config = LoopConfig(args.epochs, args.batch_size, args.accumulation_steps, args.clip_grad, args.seed)

    bar = tqdm(total=steps, disable=comm.rank != 0 or args.no_progress, unit="step", leave=False, file=sys.stderr)

    def on_epoch(stats: dict[str, float]) -> None:
        if comm.rank == 0:
            shown = "  ".join(f"{k} {v:.4g}" for k, v in stats.items() if k not in ("epoch", "val_count"))
            tqdm.write(f"epoch {int(stats['epoch']) + 1}/{args.epochs}  {shown}")
            with open(out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(stats) + "\n")

    history = train(
        task, wrapped, optimizers, comm, config, schedules, on_step=lambda _: bar.update(), on_epoch=on_epoch
    )
    bar.close()
    if comm.rank == 0:
        weights = {p: m.state_dict() for p, m in models.items()}
        torch.save(weights["model"] if list(weights) == ["model"] else weights, out / "model.pt")
        from distrib.plot import plot_run

        plot_run(out)
        print(f"run saved in {out} (final val: {history[-1].get('val_loss', float('nan')):.4g} loss)")
    return 0


def _run_dir(args: argparse.Namespace, comm: distrib.Communicator) -> Path:
    """Rank 0 makes the run directory once the arguments are known good; a bad one is a clear error on all ranks."""
    problem = None
    if comm.rank == 0:
        out = (
            args.out
            or Path("runs") / f"{args.task.replace(':', '-').replace('.', '-')}-{time.strftime('%Y%m%d-%H%M%S')}"
        )
        try:
            out.mkdir(parents=True, exist_ok=True)
            (out / "metrics.jsonl").write_text("")
        except OSError as error:
            problem = f"argument --out: cannot write to {out}: {error.strerror or error}; choose a writable directory"
    problem = comm.broadcast_object(problem)
    if problem:
        _fail(problem)
    return comm.broadcast_object(out if comm.rank == 0 else None)


if __name__ == "__main__":
    sys.exit(main())
