"""python -m distrib.train: train a built-in task (or your own) on every rank the launcher started.

mpirun -n 4 python -m distrib.train                 # the default task, MPI collectives
torchrun --nproc-per-node 4 -m distrib.train --task autoencoder --allreduce ring
torchrun --nproc-per-node 8 -m distrib.train --device cuda --precision bf16   # a GPU per rank, NCCL
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
from distrib.checkpoint import Checkpointer, CheckpointError, TrainingState, atomic
from distrib.cli import options
from distrib.cli.optim import build_optimizer, build_schedule
from distrib.cli.options import fail
from distrib.cli.report import Reporter
from distrib.cli.stopping import Peers, StopSignals, watch_rank
from distrib.data import check as check_sharding
from distrib.device import DeviceError, choose, where
from distrib.env import LaunchError, read_world
from distrib.local_sgd import LocalSGD
from distrib.loop import LoopConfig, NonFiniteError, Optimizers, Progress, Stopped, fit
from distrib.process import default_backend
from distrib.tasks import Models, Task


def main(argv: list[str] | None = None) -> int:
    watch_rank()  # under MPICH, so that a rank killed by a signal is named; forks, so before torch starts threads
    args, task = options.parse(argv, __doc__)
    _share_cores()
    _warn_of_shared_store()
    device = _device(args)
    comm = _communicator(args, device)
    out = _run_dir(args, comm)
    models = {phase: model.to(device) for phase, model in task.build().items()}
    wrapped, optimizers = _wrap(args, models, comm)
    if comm.rank == 0:
        print(f"training {args.task} on {comm.size} rank(s), backend {comm.backend}, rank 0 on {device}, "
              f"precision {args.precision}", flush=True)  # fmt: skip
    progress = Progress()
    schedules = {
        phase: build_schedule(optimizer, args.schedule, args.warmup_steps, args.epochs, progress)
        for phase, optimizer in optimizers.items()
    }
    state = TrainingState(models, optimizers, schedules, progress, options.settings(args), task)
    saver = Checkpointer(out / "checkpoints", comm, state, args.checkpoint_every, args.keep, args.checkpoint_async)
    resumed = _resume(saver, args, out, comm) if args.resume else False
    _prepare(out, progress.epoch if resumed else None, comm)  # the first write: every check above has passed
    history, status = _train(args, task, wrapped, state, saver, comm, out)
    if status == 0 and comm.rank == 0:
        _save_results(out, task, models, history)
    return status


def _share_cores() -> None:
    """Ranks on one host share its cores: one rank's torch threads get its share, unless OMP_NUM_THREADS says."""
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // (read_world().local_size or 1)))


def _warn_of_shared_store() -> None:
    """torchrun restarts workers, but by default keeps one store for all attempts, where gloo and NCCL find the
    addresses of the attempt before (pytorch/pytorch#135712): a restart may fail to connect, using up restarts."""
    restarts = os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0") != "0"
    if restarts and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True" and os.environ.get("RANK") == "0":
        if os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0":
            print("distrib: torchrun --max-restarts keeps one store for every attempt, so a restart may connect to "
                  "the dead attempt's addresses (pytorch#135712): start torchrun with "
                  "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1", file=sys.stderr, flush=True)  # fmt: skip


def _device(args: argparse.Namespace) -> torch.device:
    """This rank's device (--device); a GPU becomes the current one, so every library's default GPU is ours."""
    try:
        device = choose(args.device, read_world(), args.backend)
    except DeviceError as error:
        fail(f"argument --device: {error}")
    except LaunchError as error:
        fail(f"argument --backend: {error}")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def _communicator(args: argparse.Namespace, device: torch.device) -> distrib.Communicator:
    """The backend given, else the one that follows the device (nccl for GPUs under torchrun)."""
    try:
        backend = args.backend or default_backend(read_world(), device)
        comm = distrib.init(backend, timeout=args.timeout, algorithm=args.allreduce)
    except (LaunchError, ValueError) as error:
        fail(f"argument {'--allreduce' if str(error).startswith('algorithm') else '--backend'}: {error}")
    try:
        check_sharding(1, args.batch_size, comm.rank, comm.size, seed=args.seed, epoch=0, drop_last=False)
    except ValueError as error:
        fail(f"argument --batch-size: {error}")
    return comm


def _wrap(args: argparse.Namespace, models: Models, comm: distrib.Communicator) -> tuple[Models, Optimizers]:
    """Each phase's model as the loop trains it, and its optimizer: DDP and a torch optimizer, ZeRO-Offload, or a
    plain model and local SGD around a torch optimizer."""
    try:
        if args.zero_offload:  # gradients cross ranks in the step (reduce-scatter); Adam's state stays on the CPU
            hyper = {"lr": args.lr, "weight_decay": args.weight_decay, "adamw": args.optimizer == "adamw"}
            zero = distrib.ZeroOffloadOptimizer
            return dict(models), {
                p: zero(m.parameters(), comm=comm, algorithm=args.allreduce, **hyper) for p, m in models.items()
            }
        if args.sync_every:  # local SGD: gradients stay on their rank; the optimizer averages weights every H steps
            return dict(models), {
                phase: LocalSGD(
                    build_optimizer(args.optimizer, m.parameters(), args.lr, args.weight_decay), comm, args.sync_every,
                    args.outer_lr, args.outer_momentum, algorithm=args.allreduce,
                )
                for phase, m in models.items()
            }  # fmt: skip
        ddp = distrib.DistributedDataParallel
        wrapped = {
            phase: ddp(m, device_ids=_device_ids(m), comm=comm, algorithm=args.allreduce) for phase, m in models.items()
        }
        optimizers = {
            phase: build_optimizer(args.optimizer, m.parameters(), args.lr, args.weight_decay)
            for phase, m in wrapped.items()
        }
        return wrapped, optimizers
    except (ValueError, RuntimeError) as error:  # e.g. a model that differs across ranks (torch: RuntimeError)
        fail(f"argument --task: {error}")


def _device_ids(model: torch.nn.Module) -> list[int] | None:
    """torch DDP's device_ids for a model on one GPU (inputs go there before forward), None on the CPU."""
    device = where(model)
    return [device.index] if device.type == "cuda" else None


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
    config = LoopConfig(
        args.epochs, args.batch_size, args.accumulation_steps, args.clip_grad, args.seed, args.on_nan, args.precision
    )
    report, told_short = None, []  # told_short: the short epoch is said once
    if comm.rank == 0:
        report = Reporter(out, args.epochs, state.progress.total, not args.no_progress, args.tensorboard)

    def on_step(info: dict[str, float]) -> None:
        if report is not None:
            report.step(info, state.progress)
            if not told_short and _short_epoch(args.batch_size, info["samples"], state.progress):
                told_short.append(True)
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
            history = fit(task, models, state.optimizers, comm, config, state.schedulers, on_step, on_epoch,
                          progress, stop)  # fmt: skip
            saver.finish()  # the checkpoint a thread is writing, published
            return history, 0
        except Stopped as stopped:
            try:
                where = saver.save()
                saver.finish()
            except CheckpointError as error:
                fail(f"{error}; stopped by signal {stopped.signum} without a final checkpoint", status=1)
            _say(comm, f"stopped by signal {stopped.signum} after step {stopped.progress.total}; saved {where}, "
                 "continue with --resume")  # fmt: skip
            return [], 128 + stopped.signum
        except NonFiniteError as error:
            with contextlib.suppress(CheckpointError):
                saver.finish()  # the last good checkpoint, if a thread was writing it; the NaN is the news
            fail(str(error), status=1)
        except CheckpointError as error:  # a checkpoint that cannot be written: stop, not go on
            fail(str(error), status=1)
        except OSError as error:  # rank 0's metrics.jsonl or TensorBoard files; the launcher stops the others
            fail(f"cannot write {error.filename or out}: {error.strerror or error}", status=1)
        except distrib.CollectiveError as error:
            lost = peers.describe_lost()
            if lost:
                raise type(error)(f"{error}; {lost}", error.culprits, error.stuck_pids) from None
            raise
        finally:
            if report is not None:
                report.close()


def _short_epoch(batch_size: int, samples: float, progress: Progress) -> bool:
    """Say that the global batch is larger than the epoch's data: each epoch is then one smaller step. Not
    refused, because a task's data can vary by epoch (RL's episodes) and full-batch training is a choice."""
    short = progress.steps == 1 and progress.step == 1 and samples < batch_size
    if short:
        print(f"distrib: --batch-size {batch_size} is larger than epoch {progress.epoch + 1}'s data ({int(samples)} "
              f"samples): each such epoch is one step of all its samples", file=sys.stderr, flush=True)  # fmt: skip
    return short


def _save_results(out: Path, task: Task, models: Models, history: list[dict[str, float]]) -> None:
    """Rank 0: the weights as a plain state_dict, the learning curves, the final validation stats, and a sample
    of what the models make, for a task that can show one (a language model's text)."""
    weights = {p: {k: v.cpu() for k, v in m.state_dict().items()} for p, m in models.items()}  # loads anywhere
    try:
        atomic.write(out / "model.pt", weights["model"] if list(weights) == ["model"] else weights)
        from distrib.cli.plot import plot_run

        plot_run(out)
    except OSError as error:
        fail(f"cannot write {error.filename or out}: {error.strerror or error}; training finished, and the "
             f"checkpoints in {out / 'checkpoints'} hold its weights", status=1)  # fmt: skip
    shown = {k: v for k, v in history[-1].items() if k.startswith("val_") and k != "val_count"} if history else {}
    final = " (final " + ", ".join(f"{k} {v:.4g}" for k, v in shown.items()) + ")" if shown else ""
    print(f"run saved in {out}{final}")
    if hasattr(task, "sample"):
        print(f"sample:\n{task.sample(models)}")


def _resume(saver: Checkpointer, args: argparse.Namespace, out: Path, comm: distrib.Communicator) -> bool:
    """Load the newest checkpoint that verifies (in --out, or the PATH of --resume PATH); with --resume auto, none
    there means a fresh start. Whether one was loaded; nothing is written."""
    auto = args.resume == options.AUTO
    try:
        where = saver.resume(out if auto or args.resume is True else args.resume, fresh_if_none=auto)
    except CheckpointError as error:
        fail(f"argument --resume: {error}")
    if where is None:
        _say(comm, f"--resume auto: no checkpoint in {out} yet; starting from the beginning")
        return False
    progress = saver.state.progress
    _say(comm, f"resuming from {where}: epoch {progress.epoch + 1}, {progress.step} of its steps done")
    return True


def _say(comm: distrib.Communicator, message: str) -> None:
    if comm.rank == 0:
        print(message, file=sys.stderr, flush=True)


def _run_dir(args: argparse.Namespace, comm: distrib.Communicator) -> Path:
    """The run directory, named by rank 0; one that holds an earlier run's checkpoints needs --resume."""
    problem = None
    if comm.rank == 0:
        out = (
            args.out
            or Path("runs") / f"{args.task.replace(':', '-').replace('.', '-')}-{time.strftime('%Y%m%d-%H%M%S')}"
        )
        if not args.resume and any((out / "checkpoints").glob("step-*")):
            problem = (
                f"argument --out: {out} holds the checkpoints of an earlier run; continue it with --resume (or "
                "--resume auto), or choose another --out"
            )
    problem = comm.broadcast_object(problem)
    if problem:
        fail(problem)
    return comm.broadcast_object(out if comm.rank == 0 else None)


def _prepare(out: Path, epochs_done: int | None, comm: distrib.Communicator) -> None:
    """Rank 0 makes the run directory and starts metrics.jsonl, or keeps it to the `epochs_done` of a resume."""
    problem = None
    if comm.rank == 0:
        metrics = out / "metrics.jsonl"
        try:
            (out / "checkpoints").mkdir(parents=True, exist_ok=True)
            lines = metrics.read_text().splitlines() if epochs_done is not None and metrics.exists() else []
            kept = [line for line in lines if line.strip() and json.loads(line)["epoch"] < epochs_done]
            metrics.write_text("".join(line + "\n" for line in kept))
        except OSError as error:
            problem = f"argument --out: cannot write to {error.filename or out}: {error.strerror or error}; "
            problem += "choose a writable directory"
    problem = comm.broadcast_object(problem)
    if problem:
        fail(problem)


if __name__ == "__main__":
    sys.exit(main())
