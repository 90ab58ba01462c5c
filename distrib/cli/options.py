"""The options of python -m distrib.train: each bad value exits with status 2 and one line naming the option,
said by rank 0 only, before anything is written."""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path
from typing import NoReturn

from distrib import tasks
from distrib.cli.optim import OPTIMIZERS, SCHEDULES
from distrib.comm import ALGORITHMS
from distrib.comm.contract import check_timeout, env_timeout
from distrib.comm.verify import mode_from_env as verify_mode
from distrib.env import LaunchError, read_world
from distrib.process import BACKENDS
from distrib.steps import ON_NAN
from distrib.tasks.classify import Classify, read_data

PROG = "python -m distrib.train"


def fail(message: str, status: int = 2) -> NoReturn:
    """One line on rank 0, then every rank exits: 2 for a user's mistake, 1 for a failed run."""
    try:
        quiet = read_world().rank != 0
    except LaunchError:
        quiet = False
    if not quiet:
        print(f"{PROG}: error: {message}", file=sys.stderr)
    sys.exit(status)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # type: ignore[override]
        fail(message)


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


def _deadline(text: str) -> float:
    try:
        return check_timeout(text, "{!r}")
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 0, got {text!r}")
    return value


def parser(description: str | None = None) -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    builtin = ", ".join(tasks.BUILTIN)
    p.add_argument("--task", default="classify", help=f"built-in ({builtin}) or package.module:factory")
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
    p.add_argument("--backend", choices=BACKENDS, default=None, help="default: from the launcher")
    p.add_argument("--allreduce", choices=ALGORITHMS, default="native", help="the gradient allreduce")
    p.add_argument("--timeout", type=_deadline, default=None, help="seconds a collective waits for a peer")
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


def parse(argv: list[str] | None, description: str | None = None) -> tuple[argparse.Namespace, tasks.Task]:
    """The options and the task they name; a task's own defaults (RL needs more epochs) yield to the command line."""
    args = parser(description).parse_args(argv)
    task = _task(args)
    defaults = getattr(task, "defaults", None)
    if defaults:
        with_task = parser(description)
        with_task.set_defaults(**defaults)
        args = with_task.parse_args(argv)
    try:  # said here, as one line, rather than where the communicator starts
        verify_mode()
        if args.timeout is None:
            env_timeout()
    except ValueError as error:
        fail(str(error))
    if args.resume is True and args.out is None:
        fail("argument --resume: name the run to continue, as --out RUN_DIR or --resume RUN_DIR")
    if args.tensorboard is not None and importlib.util.find_spec("tensorboard") is None:
        fail("argument --tensorboard: needs the tensorboard package; pip install tensorboard")
    if args.zero_offload and args.optimizer not in ("adam", "adamw"):
        fail(f"argument --zero-offload: shards Adam and AdamW only, not --optimizer {args.optimizer}")
    return args, task


def _task(args: argparse.Namespace) -> tasks.Task:
    """The task by name, or the classify task over the tensors of --data."""
    if args.data is None:
        try:
            return tasks.load(args.task, seed=args.seed)
        except ValueError as error:
            fail(f"argument --task: {error}")
    if args.task != "classify":
        fail(f"argument --data: only --task classify reads --data, not {args.task!r}; drop --data")
    try:
        return Classify(seed=args.seed, data=read_data(args.data))
    except ValueError as error:
        fail(f"argument --data: {error}")


def settings(args: argparse.Namespace) -> dict[str, object]:
    """What a resumed run must share with the one that wrote the checkpoint, for the data position to hold."""
    keys = ("task", "batch_size", "accumulation_steps", "seed", "optimizer")
    return {f"--{k.replace('_', '-')}": getattr(args, k) for k in keys}
