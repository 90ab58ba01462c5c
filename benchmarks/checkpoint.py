"""How long does training pause for a checkpoint? A synchronous write (the default) against --checkpoint-async
(the state copied to the CPU at the step, the files written by a thread while training goes on), in the same run.

python -m benchmarks.checkpoint [--params 1e6 1e7 3e7] [--checkpoints 5] [--steps-between 10] [--dir DIR]

A model of about P parameters (an MLP) trains with Adam on random data; every --steps-between steps it
checkpoints, and the time the training thread spends in the call is its pause. An asynchronous pause is the copy
and the collectives, plus any wait for the previous write still in flight; the write itself (fsync included) is
timed on its thread. Sync and async take turns checkpoint by checkpoint, so load on a shared machine hits both.
Runs under a launcher too (every rank's pause, the slowest reported).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

import distrib
from benchmarks import common
from benchmarks.common import RESULTS, print_table, save_figure, subplots
from distrib.checkpoint import Checkpointer, TrainingState, atomic
from distrib.loop import Progress

MAX_WIDTH = 1024  # the MLP's layers are square, this wide at most; their number sets the size
BATCH = 64
COLUMNS = {"params": ",d", "mode": "", "checkpoint_mb": ".1f", "pause_median_ms": ".2f", "pause_min_ms": ".2f"}
COLUMNS |= {"pause_max_ms": ".2f", "write_median_ms": ".1f", "step_ms": ".2f", "sync_over_async": ".1f"}


def model_of(params: int) -> torch.nn.Module:
    """An MLP of square layers with about `params` parameters."""
    width = max(8, min(MAX_WIDTH, math.isqrt(params)))
    layers = max(1, round(params / (width * width + width)))
    return torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])


class Run:
    """One model, its Adam and its Checkpointer, trained a step at a time."""

    def __init__(self, params: int, directory: Path, background: bool, comm: distrib.Communicator) -> None:
        torch.manual_seed(0)
        self.model = model_of(params)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=1e-4)
        self.progress = Progress(steps=10**9)
        state = TrainingState({"model": self.model}, {"model": self.optimizer}, {}, self.progress, {})
        self.saver = Checkpointer(directory, comm, state, keep=2, background=background)
        self.comm, self.inputs = comm, torch.randn(BATCH, self.model[0].in_features)

    def step(self) -> float:
        start = time.perf_counter()
        self.optimizer.zero_grad()
        self.model(self.inputs).square().mean().backward()
        self.optimizer.step()
        self.progress.total += 1
        return time.perf_counter() - start

    def checkpoint(self) -> float:
        """The pause: seconds this rank's training thread spent in the checkpoint call."""
        start = time.perf_counter()
        self.saver.save()
        return time.perf_counter() - start


def measure(params: int, checkpoints: int, between: int, root: Path, comm: distrib.Communicator) -> list[dict]:
    """Rows for sync and async at one size: pauses, write times and step time, over `checkpoints` each."""
    runs = {mode: Run(params, root / f"{params}-{mode}", mode == "async", comm) for mode in ("sync", "async")}
    pauses: dict[str, list[float]] = {mode: [] for mode in runs}
    steps: dict[str, list[float]] = {mode: [] for mode in runs}
    writes: dict[tuple[str, str], float] = {}  # (run, checkpoint) -> seconds its files took to write
    real_write = atomic.write

    def timed_write(path: Path, obj: object) -> atomic.Record:  # on the writer's thread in async mode
        start = time.perf_counter()
        record = real_write(path, obj)
        key = (path.parent.parent.name, path.parent.name)
        writes[key] = writes.get(key, 0.0) + time.perf_counter() - start
        return record

    atomic.write = timed_write
    try:
        for run in runs.values():
            run.step()  # Adam's moments exist from the first step: every checkpoint holds the same
        for _ in range(checkpoints):
            for mode, run in runs.items():
                steps[mode] += [run.step() for _ in range(between)]
                pauses[mode].append(run.checkpoint())
        for run in runs.values():
            run.saver.finish()
    finally:
        atomic.write = real_write
    size = sum(f.stat().st_size for f in next(iter(sorted((root / f"{params}-sync").glob("step-*")))).iterdir())
    rows = []
    for mode in runs:
        slowest = [max(p) for p in zip(*comm.allgather_object(pauses[mode]))]  # the job waits for the slowest
        rows.append({
            "params": sum(p.numel() for p in runs[mode].model.parameters()),
            "mode": mode,
            "checkpoint_mb": size / 1e6,
            "pause_median_ms": statistics.median(slowest) * 1e3,
            "pause_min_ms": min(slowest) * 1e3,
            "pause_max_ms": max(slowest) * 1e3,
            "write_median_ms": statistics.median(s for (run, _), s in writes.items() if run.endswith(mode)) * 1e3,
            "step_ms": statistics.median(steps[mode]) * 1e3,
        })  # fmt: skip
    rows[1]["sync_over_async"] = rows[0]["pause_median_ms"] / rows[1]["pause_median_ms"]
    return rows


def plot(rows: list[dict], path: Path) -> None:
    """Median pause per checkpoint (min-max bars) against model size, sync and async."""
    fig, ax = subplots(figsize=(6.5, 4.2))
    for mode in ("sync", "async"):
        mine = [r for r in rows if r["mode"] == mode]
        median = [r["pause_median_ms"] for r in mine]
        spread = [[m - r["pause_min_ms"] for m, r in zip(median, mine)],
                  [r["pause_max_ms"] - m for m, r in zip(median, mine)]]  # fmt: skip
        ax.errorbar([r["checkpoint_mb"] for r in mine], median, yerr=spread, marker="o", capsize=3, label=mode)
    ax.set(xscale="log", yscale="log", xlabel="checkpoint size (MB)", ylabel="training paused per checkpoint (ms)")
    ax.set_title("checkpoint pause: synchronous vs --checkpoint-async")
    ax.legend()
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.checkpoint", description=__doc__.splitlines()[0])
    p.add_argument("--params", type=float, nargs="+", default=[1e6, 1e7, 3e7], help="model sizes (parameters)")
    p.add_argument("--checkpoints", type=int, default=5, help="checkpoints per mode and size")
    p.add_argument("--steps-between", type=int, default=10, help="training steps between checkpoints")
    p.add_argument("--dir", type=Path, default=None, help="where checkpoints go (default: a temporary directory)")
    p.add_argument("--json", type=Path, default=RESULTS / "checkpoint.json")
    p.add_argument("--plot", type=Path, default=RESULTS / "checkpoint.png")
    args = p.parse_args(argv)
    if min(args.params) < 1 or args.checkpoints < 1 or args.steps_between < 1:
        p.error("--params, --checkpoints and --steps-between must be at least 1")
    comm = distrib.init()
    root = Path(comm.broadcast_object(str(args.dir or tempfile.mkdtemp(prefix="distrib-checkpoint-bench-"))))
    try:
        rows = [row for n in args.params for row in measure(int(n), args.checkpoints, args.steps_between, root, comm)]
    finally:
        comm.barrier()
        if comm.rank == 0 and args.dir is None:
            shutil.rmtree(root, ignore_errors=True)
    if comm.rank != 0:
        return
    print_table(f"checkpoint pause, {comm.size} rank(s), {args.checkpoints} checkpoints each", rows, COLUMNS)
    result = {"machine": common.machine(), "load_average": os.getloadavg(), "ranks": comm.size,
              "threads": torch.get_num_threads(), "rows": rows}  # fmt: skip
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1))
    plot(rows, args.plot)
    print(f"wrote {args.json} and {args.plot}")


if __name__ == "__main__":
    main()
