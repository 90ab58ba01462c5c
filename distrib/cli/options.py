"""The options of python -m distrib.train: each bad value exits with status 2 and one line naming the option,
said by rank 0 only, before anything is written."""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import NoReturn

from distrib import tasks
from distrib.cli.optim import OPTIMIZERS, SCHEDULES
from distrib.comm import ALGORITHMS
from distrib.comm.contract import check_timeout, env_timeout
from distrib.comm.verify import mode_from_env as verify_mode
from distrib.device import DEVICES, PRECISIONS
from distrib.env import LaunchError, read_world
from distrib.memory import wanted as keep_memory
from distrib.process import BACKENDS
from distrib.steps import ON_NAN
from distrib.tasks import corpus
from distrib.tasks.classify import Classify, read_data
from distrib.tasks.gpt import PRESETS
from distrib.tasks.lm import LanguageModel

PROG = "python -m distrib.train"
_QUIET_RANKS_WAIT = 2.0  # seconds the other ranks wait under torchrun, so that rank 0 fails first
AUTO = "auto"  # --resume auto
MAX_RATE = 1e4  # --lr and --weight-decay: above this torch's float32 steps overflow (1e308) or diverge at once
MAX_SEED = 2**63 - 1  # torch seeds are 64-bit, and the built-in tasks add offsets to theirs


def fail(message: str, status: int = 2) -> NoReturn:
    """One line on rank 0, then every rank exits: 2 for a user's mistake, 1 for a failed run.

    Under torchrun the line also goes to the error file torchrun reads, so its report's root cause quotes it,
    and the other ranks wait a moment before exiting: the first rank out is the one torchrun blames, and its
    agent stops the rest, so rank 0 must not be stopped before it has said why.
    """
    try:
        rank = read_world().rank
    except LaunchError:
        rank = 0
    line = f"{PROG}: error: {message}"
    if rank == 0:
        print(line, file=sys.stderr, flush=True)
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if error_file and rank == 0:
        with contextlib.suppress(OSError):  # a full disk: the line above is said already
            info = {"py_callstack": line, "timestamp": str(int(time.time()))}  # torchrun's report quotes py_callstack
            Path(error_file).write_text(json.dumps({"message": {"message": line, "extraInfo": info}}))
    elif error_file:
        time.sleep(_QUIET_RANKS_WAIT)
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


def _real(low: float, high: float = math.inf, *, positive: bool = False):
    """A finite float in [low, high] (above low when `positive`): NaN and Inf never make sense as a rate or a norm."""
    what = ("a positive float" if positive else f"a float from {low:g}") + (f" up to {high:g}" * (high < math.inf))

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
        if not (low <= value <= high and math.isfinite(value)) or (positive and value == low):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
        return value

    return parse


def _whole(high: int | None = None):
    """A whole number >= 0, at most `high` (a power of two less one)."""
    what = "a whole number >= 0" + (f" and < 2**{high.bit_length()}" if high is not None else "")

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
        if value < 0 or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
        return value

    return parse


def _resume(text: str) -> Path | str:
    """--resume PATH, or --resume auto: the newest checkpoint in --out if there is one, else a fresh start."""
    return AUTO if text == AUTO else Path(text)


def _fraction(text: str) -> float:
    """A momentum: in [0, 1)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1), got {text!r}") from None
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1), got {text!r}")
    return value


def _deadline(text: str) -> float:
    try:
        return check_timeout(text, "{!r}")
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def parser(description: str | None = None) -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    builtin = ", ".join(tasks.BUILTIN)
    p.add_argument("--task", default="classify", help=f"built-in ({builtin}) or package.module:factory")
    p.add_argument("--epochs", type=_positive(int), default=5)
    p.add_argument("--batch-size", type=_positive(int), default=128, help="the global minibatch, over all ranks")
    p.add_argument("--lr", type=_real(0, MAX_RATE, positive=True), default=3e-3)
    p.add_argument("--optimizer", choices=OPTIMIZERS, default="adam")
    p.add_argument("--weight-decay", type=_real(0, MAX_RATE), default=0.0)
    p.add_argument("--schedule", choices=SCHEDULES, default="cosine", help="after the warm-up")
    p.add_argument("--warmup-steps", type=_whole(), default=20)
    p.add_argument("--accumulation-steps", type=_positive(int), default=1, help="micro-batches per optimizer step")
    p.add_argument("--clip-grad", type=_real(0, positive=True), default=None, help="max global gradient norm")
    p.add_argument("--seed", type=_whole(MAX_SEED), default=0)
    p.add_argument("--backend", choices=BACKENDS, default=None, help="default: from the launcher")
    p.add_argument("--allreduce", choices=ALGORITHMS, default="native", help="the gradient allreduce")
    p.add_argument("--timeout", type=_deadline, default=None, help="seconds a collective waits for a peer")
    p.add_argument("--zero-offload", action="store_true", help="ZeRO-Offload: sharded Adam(W) steps on the CPU")
    p.add_argument(
        "--data", type=Path, default=None, help="classify: (inputs, labels) from torch.save; lm: UTF-8 text or a dir"
    )
    p.add_argument("--block-size", type=_positive(int), default=None, help="lm: bytes of context (default 128)")
    p.add_argument("--model-size", choices=PRESETS, default=None, help="lm: the GPT's size (default small)")
    p.add_argument(
        "--sync-every", type=_positive(int), default=None, metavar="H",
        help="local SGD / DiLoCo: H steps on each rank's own gradients, then the outer step on the averaged deltas",
    )  # fmt: skip
    p.add_argument(
        "--outer-lr", type=_real(0, MAX_RATE, positive=True), default=None, help="--sync-every: outer lr (default 0.7)"
    )
    p.add_argument(
        "--outer-momentum", type=_fraction, default=None,
        help="--sync-every: the outer Nesterov momentum (0: none; default 0.9)",
    )  # fmt: skip
    p.add_argument("--out", type=Path, default=None, help="run directory (default: runs/TASK-TIME)")
    p.add_argument(
        "--checkpoint-every", type=_positive(int), default=None, metavar="N", help="steps (also: at each epoch's end)"
    )
    p.add_argument("--checkpoint-async", action="store_true", help="write checkpoints in a thread as training goes on")
    p.add_argument("--keep", type=_positive(int), default=3, metavar="K", help="the newest K checkpoints are kept")
    p.add_argument(
        "--resume",
        nargs="?",
        const=True,
        type=_resume,
        metavar="PATH|auto",
        help="from the newest checkpoint in --out or PATH; auto: that, or a fresh start when --out has none",
    )
    p.add_argument(
        "--on-nan", choices=ON_NAN, default="error", help="a NaN/Inf loss or gradient: fail, or skip the step"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar on rank 0")
    p.add_argument("--trace", type=Path, default=None, help="write a Chrome trace (Perfetto) of every rank here")
    p.add_argument("--tensorboard", type=Path, default=None, help="write TensorBoard scalars here (rank 0)")
    # Where and how precisely each rank computes (distrib/device.py).
    p.add_argument("--device", choices=DEVICES, default="auto", help="auto: cuda:LOCAL_RANK if each rank has a GPU")
    p.add_argument(
        "--precision", choices=PRECISIONS, default="fp32", help="bf16: autocast on the device; weights stay fp32"
    )
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
        keep_memory()
        if args.timeout is None:
            env_timeout()
    except ValueError as error:
        fail(str(error))
    if args.resume is True and args.out is None:
        fail("argument --resume: name the run to continue, as --out RUN_DIR or --resume RUN_DIR")
    if args.resume == AUTO and args.out is None:
        fail("argument --resume: auto continues the run in --out, or starts it there; name it with --out RUN_DIR")
    if args.tensorboard is not None and importlib.util.find_spec("tensorboard") is None:
        fail("argument --tensorboard: needs the tensorboard package; pip install tensorboard")
    for name, default in (("outer_lr", 0.7), ("outer_momentum", 0.9)):
        if getattr(args, name) is not None and not args.sync_every:
            option = f"--{name.replace('_', '-')}"
            fail(f"argument {option}: only local SGD (--sync-every H) has an outer step; drop {option} or add it")
        setattr(args, name, default if getattr(args, name) is None else getattr(args, name))
    for option, path in (("--trace", args.trace), ("--tensorboard", args.tensorboard)):
        if path is not None and (problem := _unwritable(path)):
            fail(f"argument {option}: cannot write {path}: {problem}")
    if args.zero_offload and args.sync_every:
        fail(
            "argument --sync-every: local SGD steps each rank's own optimizer; it does not combine with --zero-offload"
        )
    if args.zero_offload and args.optimizer not in ("adam", "adamw"):
        fail(f"argument --zero-offload: shards Adam and AdamW only, not --optimizer {args.optimizer}")
    return args, task


def _unwritable(path: Path) -> str:
    """Why a file or folder could not be made at `path` (its nearest existing ancestor decides), or ""."""
    at = path.parent if path.suffix else path
    while not at.exists():
        at = at.parent
    if not at.is_dir():
        return f"{at} is not a directory"
    return "" if os.access(at, os.W_OK) else f"{at} is not writable"


def _task(args: argparse.Namespace) -> tasks.Task:
    """The task by name; classify over the tensors of --data, or lm over its text and sizes."""
    lm_only = [f"--{k.replace('_', '-')}" for k in ("block_size", "model_size") if getattr(args, k) is not None]
    if args.task != "lm" and lm_only:
        fail(f"argument {lm_only[0]}: only --task lm takes {lm_only[0]}, not {args.task!r}; drop it")
    if args.task == "lm":
        return _language_model(args)
    if args.data is None:
        try:
            return tasks.load(args.task, seed=args.seed)
        except ValueError as error:
            fail(f"argument --task: {error}")
    if args.task != "classify":
        fail(f"argument --data: only --task classify and lm read --data, not {args.task!r}; drop --data")
    try:
        return Classify(seed=args.seed, data=read_data(args.data))
    except ValueError as error:
        fail(f"argument --data: {error}")


def _language_model(args: argparse.Namespace) -> LanguageModel:
    """The lm task over the standard library or --data, at --block-size and --model-size."""
    try:
        text = corpus.load(args.data)
    except ValueError as error:
        fail(f"argument --data: {error}")
    sizes = {"block_size": args.block_size, "size": args.model_size}
    try:
        return LanguageModel(seed=args.seed, corpus=text, **{k: v for k, v in sizes.items() if v is not None})
    except ValueError as error:
        fail(f"argument --block-size: {error}")


def settings(args: argparse.Namespace) -> dict[str, object]:
    """What a resumed run must share with the one that wrote the checkpoint, for the data position to hold."""
    keys = ("task", "batch_size", "accumulation_steps", "seed", "optimizer", "sync_every")
    return {f"--{k.replace('_', '-')}": getattr(args, k) for k in keys}
