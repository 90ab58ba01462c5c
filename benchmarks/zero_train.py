"""Section train of benchmarks.zero: a training step and the optimizer memory per rank of ZeRO-Offload against
DDP+Adam, 1-4 ranks, on an MLP of a few large tensors or a GPT of many small ones. Each world size is one mpiexec
job whose ranks run `python -m benchmarks.zero --train-worker`."""

from __future__ import annotations

import functools
import itertools
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks import gpt
from benchmarks.common import machine, save_figure, subplots
from distrib.zero.layout import FlatLayout, flatten_

WIDTHS = (1024, 3584, 3584, 1024)  # an MLP of 20.2M parameters
MODELS = ("mlp", *gpt.SIZES)
BATCH = {"mlp": 16, "gpt": 4, "gpt-tiny": 4}  # per rank and step, by default: samples, or sequences of gpt.BLOCK tokens
ZERO, DELAYED, DDP = "ZeRO-Offload", "ZeRO-Offload delay_update", "DDP+Adam"
BLOCK = 3  # steps in a row per implementation
TRAIN_COLUMNS = {"ranks": "d", "algorithm": "", "impl": "", "median_ms": ".1f", "min_ms": ".1f", "max_ms": ".1f"}
TRAIN_COLUMNS |= {
    "after_backward_ms": ".1f",
    "optimizer_mb_per_rank": ".1f",
    "time_vs_ddp": ".2f",
    "memory_vs_ddp": ".3f",
}


class DDPAdam:
    """The baseline: gradients as views of one flat buffer, one allreduce of it, torch.optim.Adam(fused=True)."""

    def __init__(self, model: torch.nn.Module, comm, algorithm: str) -> None:
        params = list(model.parameters())
        _, self.grads = flatten_(params, FlatLayout(tuple(p.shape for p in params), (len(params),), 1))
        self.comm, self.algorithm, self.adam = comm, algorithm, torch.optim.Adam(params, lr=1e-4, fused=True)

    def step(self) -> None:
        self.comm.allreduce(self.grads, op="avg", algorithm=self.algorithm)
        self.adam.step()

    def zero_grad(self) -> None:
        self.grads.zero_()

    def state_nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for state in self.adam.state.values() for t in state.values())


def mlp() -> torch.nn.Module:
    layers = [m for a, b in itertools.pairwise(WIDTHS) for m in (torch.nn.Linear(a, b), torch.nn.ReLU())]
    return torch.nn.Sequential(*layers[:-1])


def describe(model: str) -> str:
    return f"MLP {WIDTHS}" if model == "mlp" else gpt.describe(model)


def train_rows(comm, model_name: str, algorithm: str, batch: int, warmup: int, repeats: int) -> list[dict]:
    """One rank: DDP+Adam and ZeRO-Offload (plain, delayed) take turns; each step's time is the slowest rank's."""
    from distrib.zero import ZeroOffloadOptimizer

    build = mlp if model_name == "mlp" else functools.partial(gpt.model, model_name)
    if model_name == "mlp":
        x, y, loss = torch.randn(batch, WIDTHS[0]), torch.randn(batch, WIDTHS[-1]), torch.nn.functional.mse_loss
    else:
        (x, y), loss = gpt.batch(batch), gpt.loss
    baseline = build()
    runs = {DDP: (baseline, DDPAdam(baseline, comm, algorithm))}
    for impl in (ZERO, DELAYED):  # Adam, as the baseline's: the same math
        model, kw = build(), {"lr": 1e-4, "weight_decay": 0.0, "adamw": False, "delay_update": impl == DELAYED}
        runs[impl] = (model, ZeroOffloadOptimizer(model.parameters(), comm=comm, algorithm=algorithm, **kw))
    times: dict[str, list[list[float]]] = {impl: [] for impl in runs}  # [whole step, after backward]

    def step(impl: str) -> list[float]:
        model, opt = runs[impl]
        comm.barrier()
        start = time.perf_counter()
        loss(model(x), y).backward()
        backward_done = time.perf_counter()
        opt.step()
        opt.zero_grad()
        end = time.perf_counter()
        return comm.allreduce(torch.tensor([end - start, end - backward_done]), op="max").tolist()

    # Blocks of BLOCK steps, the order rotating each round, so background load hits all alike; the first step of a
    # block is not timed, so each is timed in its steady state (the delayed one with a CPU step in flight).
    names = list(runs)
    for r in range(warmup + math.ceil(repeats / (BLOCK - 1))):
        for impl in names[r % 3 :] + names[: r % 3]:
            took = [step(impl) for _ in range(BLOCK)]
            if impl == DELAYED:
                runs[impl][1].flush()  # not timed; nothing left to run into the next block
            times[impl] += took[1:] if r >= warmup else []
    rows = []
    for impl, (model, opt) in runs.items():
        steps = [t for t, _ in times[impl]]
        row = {
            "section": "train",
            "impl": impl,
            "model": model_name,
            "params": sum(p.numel() for p in model.parameters()),
        }
        row |= {"median_ms": statistics.median(steps) * 1e3, "min_ms": min(steps) * 1e3, "max_ms": max(steps) * 1e3}
        row |= {"ranks": comm.size, "algorithm": algorithm}
        row["after_backward_ms"] = statistics.median(a for _, a in times[impl]) * 1e3
        row["optimizer_mb_per_rank"] = comm.allreduce(torch.tensor([opt.state_nbytes()]), op="max").item() / 2**20
        rows.append(row)
    return rows


def train_worker(out: Path, model: str, algorithms: list[str], batch: int, warmup: int, repeats: int) -> None:
    """Each rank of an mpiexec job; rank 0 writes the rows to `out`."""
    import distrib

    comm = distrib.init()
    rows = [row for algorithm in algorithms for row in train_rows(comm, model, algorithm, batch, warmup, repeats)]
    if comm.rank == 0:
        out.write_text(json.dumps(rows))


def train(model: str, ranks: list[int], algorithms: list[str], batch: int, warmup: int, repeats: int) -> list[dict]:
    """Rows for each implementation at each world size, each world size one mpiexec job of rank processes."""
    mpiexec = Path(sys.executable).parent / "mpiexec"
    rows = []
    for n in ranks:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "rows.json"
            worker = ["-m", "benchmarks.zero", "--train-worker", str(out), "--model", model, "--batch", str(batch)]
            worker += ["--algorithms"]
            worker += algorithms
            worker += ["--warmup", str(warmup), "--repeats", str(repeats)]
            threads = max(1, (os.cpu_count() or 1) // n)  # the cores shared out; more ranks than cores share them
            env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
            cmd = [str(mpiexec) if mpiexec.exists() else "mpiexec", "-n", str(n), sys.executable, *worker]
            subprocess.run(cmd, check=True, cwd=Path(__file__).parent.parent, env=env, timeout=1800)
            found = json.loads(out.read_text())
        for row in found:
            ddp = next(r for r in found if r["impl"] == DDP and r["algorithm"] == row["algorithm"])
            row |= {"threads_per_rank": threads, "time_vs_ddp": row["median_ms"] / ddp["median_ms"]}
            row["memory_vs_ddp"] = row["optimizer_mb_per_rank"] / ddp["optimizer_mb_per_rank"]
        rows += found
    return rows


def plot_train(rows: list[dict], path: Path) -> None:
    """Step time (median, min-max) and optimizer memory per rank against the world size, per implementation."""
    fig, (ax_ms, ax_mb) = subplots(1, 2, figsize=(11, 4.2))
    algorithms = list(dict.fromkeys(r["algorithm"] for r in rows))
    for impl, algorithm in dict.fromkeys((r["impl"], r["algorithm"]) for r in rows):
        mine = [r for r in rows if r["impl"] == impl and r["algorithm"] == algorithm]
        ranks, median = [r["ranks"] for r in mine], [r["median_ms"] for r in mine]
        spread = [[m - r["min_ms"] for m, r in zip(median, mine)], [r["max_ms"] - m for m, r in zip(median, mine)]]
        style = "-" if algorithm == algorithms[0] else "--"
        ax_ms.errorbar(ranks, median, yerr=spread, marker="o", capsize=3, ls=style, label=f"{impl}, {algorithm}")
        if algorithm == algorithms[0]:  # the memory does not depend on the algorithm
            ax_mb.plot(ranks, [r["optimizer_mb_per_rank"] for r in mine], marker="o", label=impl)
    title = f"{describe(rows[0]['model'])}, {rows[0]['params']:,} parameters"
    ax_ms.set(xlabel="ranks", ylabel="training step (ms), median and min-max", title=title)
    ax_mb.set(xlabel="ranks", ylabel="optimizer state per rank (MiB)", yscale="log", title="optimizer memory")
    for ax in (ax_ms, ax_mb):
        ax.set_xticks(sorted({r["ranks"] for r in rows}))
        ax.legend(fontsize=8)
    fig.suptitle(f"torch {torch.__version__}, {machine()['cores']} cores shared by all ranks")
    save_figure(fig, path)
