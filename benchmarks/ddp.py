"""How fast is distrib's DDP? Training steps of a 21M-parameter MLP (7 tensors) or a 19.5M-parameter GPT (100
tensors) against torch's DDP over gloo, at 1, 2, 4 ranks.

python -m benchmarks.ddp [--model mlp|gpt|gpt-tiny] [--ranks 1 2 4] [--runs 5] [--json FILE] [--plot FILE.png]
                                                            (drives one mpiexec job per world size)
mpiexec -n N python -m benchmarks.ddp --worker ROWS.json    (one world size; torchrun works too, without the mpi rows)
Every implementation trains its own copy of the model from the same start; they take turns step by step (fresh
models each round, the order rotating) so background load hits all alike. A step's time is the slowest rank's.
Where the time goes: "no communication" (the plain module) is the compute; the exposed communication is the median,
over the timed steps, of a step minus the no-communication step taken moments before or after it (not the
difference of the two rows' medians, which moved by tens of ms with this machine's state); allreduce_ms is one
allreduce of all the gradients alone (84 MB, 78 MB), the communication to hide.
vs_plain is a step over the no-communication step; --runs N repeats everything and reports each ratio's median
over the runs (each ratio taken within its run), the rows of the last run beside them. Every row runs in the same
processes, after distrib.init(), so all share its malloc setting (distrib/memory.py; DISTRIB_KEEP_MEMORY=0 for
glibc's own policy).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks import gpt
from benchmarks.common import RESULTS, machine, print_table, save_figure, subplots
from benchmarks.ddp_breakdown import FIELDS, Breakdown

WIDTHS = (1024, 2048, 2048, 2048, 2048, 2048, 1024)  # 21.0M parameters
MODELS = ("mlp", *gpt.SIZES)
# Fixed, split over the ranks (strong scaling), as in the measurement; the GPT's are sequences of
# gpt.BLOCK tokens, about as much compute a step as the MLP's 256 samples.
GLOBAL_BATCH = {"mlp": 256, "gpt": 8, "gpt-tiny": 8}
PLAIN, TORCH = "no communication", "torch DDP gloo"
# Untimed steps of each fresh model: the first, after which DDP (torch's and distrib's) rebuilds its buckets in
# gradient order, and the second, the first in the new buckets, whose memory is touched for the first time.
WARMUP = 2
COLUMNS = {"ranks": "d", "impl": "", "median_ms": ".1f", "min_ms": ".1f", "max_ms": ".1f", "samples_per_s": ".0f"}
COLUMNS |= {"efficiency": ".2f", "vs_torch": ".2f", "vs_plain": ".3f", "exposed_comm_ms": ".1f", "allreduce_ms": ".1f"}
PARTS = {"impl": "", **{f"{name}_ms": ".1f" for name in FIELDS}}  # the breakdown's table, distrib's rows
RATIOS = {"ranks": "d", "impl": "", "vs_plain_median": ".3f", "vs_torch_median": ".3f"}
RATIOS |= {"exposed_vs_alone_median": ".2f"}


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    layers = [m for a, b in zip(WIDTHS, WIDTHS[1:]) for m in (nn.Linear(a, b), nn.ReLU())]
    return nn.Sequential(*layers[:-1])


def build(model: str) -> nn.Module:
    return mlp() if model == "mlp" else gpt.model(model)


def batch(model: str, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n inputs and targets for `model`: random points and values, or random token sequences."""
    return (torch.randn(n, WIDTHS[0]), torch.randn(n, WIDTHS[-1])) if model == "mlp" else gpt.batch(n)


def loss(model: str, out: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(out, targets) if model == "mlp" else gpt.loss(out, targets)


def describe(model: str) -> str:
    return f"MLP {WIDTHS}" if model == "mlp" else gpt.describe(model)


def communicators() -> dict:
    """distrib's communicators by backend: mpi and gloo (the default group) under mpiexec, gloo under torchrun."""
    import distrib
    from distrib.comm.torch_dist import TorchCommunicator

    comm = distrib.init_process_group()  # under mpiexec: MPI for distrib, and gloo as torch's default group
    if comm.backend == "mpi":
        return {"mpi": comm, "gloo": TorchCommunicator("gloo", comm.rank, comm.size, timeout=comm.timeout)}
    return {comm.backend: comm}


def wrappers(comms: dict) -> dict:
    """Each implementation: a function that wraps a fresh model for it."""
    import distrib

    made = {PLAIN: lambda m: m, TORCH: torch.nn.parallel.DistributedDataParallel}
    for backend, comm in comms.items():
        for algorithm in distrib.ALGORITHMS:
            try:
                comm.check_algorithm(algorithm)
            except ValueError:
                continue  # an algorithm this backend lacks
            made[f"distrib {backend} {algorithm}"] = lambda m, c=comm, a=algorithm: distrib.DistributedDataParallel(
                m, comm=c, algorithm=a
            )
    return made


def allreduce_ms(comm, algorithm: str | None, numel: int, repeats: int) -> float:
    """Median time of one allreduce of `numel` floats, alone."""
    t = torch.ones(numel)
    times = []
    for _ in range(repeats + 1):
        comm.barrier()
        start = time.perf_counter()
        comm.allreduce(t, algorithm=algorithm)
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:]) * 1e3


def worker(out: Path, model_name: str, rounds: int, steps: int, only: list[str] | None) -> None:
    """One rank: every implementation trains `steps` timed steps (after WARMUP untimed) per round, taking turns."""
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    comms = communicators()
    comm = next(iter(comms.values()))
    wrap = {impl: f for impl, f in wrappers(comms).items() if impl in (PLAIN, TORCH) or not only or impl in only}
    per_rank = GLOBAL_BATCH[model_name] // comm.size
    x, y = batch(model_name, per_rank)
    times: dict[str, list[float]] = {impl: [] for impl in wrap}
    parts: dict[str, list[dict[str, float]]] = {impl: [] for impl in wrap}
    # torch's DDP is never freed (its C++ reducer keeps itself, and the gloo group, alive), so it is built once.
    kept = {TORCH: wrap[TORCH](build(model_name))}
    breakdown = Breakdown()
    with breakdown.measuring(*comms.values()):
        for r in range(rounds):
            names = list(wrap)
            order = names[r % len(names) :] + names[: r % len(names)]
            models = {impl: kept[impl] if impl in kept else wrap[impl](build(model_name)) for impl in order}
            optimizers = {impl: torch.optim.SGD(model.parameters(), lr=1e-3) for impl, model in models.items()}
            for s in range(WARMUP + steps):
                for impl in order:
                    model, optimizer = models[impl], optimizers[impl]
                    comm.barrier()
                    breakdown.take()
                    start = time.perf_counter()
                    loss(model_name, model(x), y).backward()
                    optimizer.step()
                    optimizer.zero_grad()
                    took = comm.allreduce(torch.tensor([time.perf_counter() - start]), op="max")
                    if s >= WARMUP:
                        times[impl].append(float(took))
                        parts[impl].append(breakdown.take())
            del models, optimizers, model, optimizer
            gc.collect()  # DDP wrappers sit in reference cycles; free their buffers before the next round's
    params = sum(p.numel() for p in build(model_name).parameters())
    alone = {TORCH: allreduce_ms(comms["gloo"], "native", params, steps)}
    # gloo first: torch's DDP keeps the gloo group, and its worker threads, alive into interpreter teardown, where
    # a worker still releasing a finished allreduce aborts the process; MPI's work afterwards gives it the time.
    for impl in sorted((i for i in wrap if i.startswith("distrib")), key=lambda i: " mpi " in i):
        _, backend, algorithm = impl.split()
        alone[impl] = allreduce_ms(comms[backend], algorithm, params, steps)
    rows = []
    for impl, samples in times.items():
        median = statistics.median(samples)
        exposed = statistics.median(t - plain for t, plain in zip(samples, times[PLAIN]))  # steps taken in turn
        row = {
            "ranks": comm.size,
            "impl": impl,
            "model": model_name,
            "params": params,
            "batch_per_rank": per_rank,
            "median_ms": median * 1e3,
            "min_ms": min(samples) * 1e3,
            "max_ms": max(samples) * 1e3,
            "samples_per_s": GLOBAL_BATCH[model_name] / median,
            "exposed_comm_ms": exposed * 1e3,
            "allreduce_ms": alone.get(impl),
            "steps_ms": [t * 1e3 for t in samples],  # in the order taken, step i beside every other row's step i
        }
        if impl.startswith("distrib"):  # every rank goes through the same rows, so the maxima meet
            row |= _breakdown(comm, parts[impl])
        rows.append(row)
    if comm.rank == 0:
        out.write_text(json.dumps(rows))
    comm.barrier()  # nobody tears its connections down while a peer still uses them


def _breakdown(comm, steps: list[dict[str, float]]) -> dict[str, float]:
    """Each part's median over the timed steps, the largest over the ranks (the slowest rank sets the step)."""
    mine = torch.tensor([statistics.median(step[f] for step in steps) for f in FIELDS], dtype=torch.float64)
    largest = comm.allreduce(mine, op="max")
    return {f"{f}_ms": float(v) for f, v in zip(FIELDS, largest)}


def drive(model: str, ranks: list[int], rounds: int, steps: int, threads: int, only: list[str] | None) -> list[dict]:
    """Rows for every world size, each one mpiexec job; adds scaling efficiency and the ratio to torch's DDP."""
    mpiexec = Path(sys.executable).parent / "mpiexec"
    rows: list[dict] = []
    for n in ranks:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "rows.json"
            cmd = [
                str(mpiexec) if mpiexec.exists() else "mpiexec",
                "-n",
                str(n),
                sys.executable,
                "-m",
                "benchmarks.ddp",
            ]
            cmd += ["--worker", str(out), "--model", model, "--rounds", str(rounds), "--steps", str(steps)]
            cmd += ["--impls", *only] if only else []
            env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
            subprocess.run(cmd, check=True, cwd=Path(__file__).parent.parent, env=env, timeout=3600)
            rows += json.loads(out.read_text())
    for row in rows:
        same = {r["ranks"]: r for r in rows if r["impl"] == row["impl"]}
        torch_ddp = next(r for r in rows if r["impl"] == TORCH and r["ranks"] == row["ranks"])
        row["vs_torch"] = row["median_ms"] / torch_ddp["median_ms"]
        plain = next(r for r in rows if r["impl"] == PLAIN and r["ranks"] == row["ranks"])
        row["vs_plain"] = row["median_ms"] / plain["median_ms"]
        row["exposed_vs_alone"] = row["exposed_comm_ms"] / row["allreduce_ms"] if row["allreduce_ms"] else None
        one = same.get(1)
        row["efficiency"] = row["samples_per_s"] / (row["ranks"] * one["samples_per_s"]) if one else None
    return rows


def across(runs: list[list[dict]]) -> list[dict]:
    """The last run's rows, each with its ratios in every run and their medians (ratios taken within a run)."""
    rows = runs[-1]
    for row in rows:
        same = [next(r for r in run if (r["impl"], r["ranks"]) == (row["impl"], row["ranks"])) for run in runs]
        for ratio in ("vs_plain", "vs_torch", "exposed_vs_alone"):
            values = [r[ratio] for r in same if r[ratio] is not None]
            row[f"{ratio}_runs"] = values
            row[f"{ratio}_median"] = statistics.median(values) if values else None
    return rows


def plot(rows: list[dict], path: Path) -> None:
    """Step time (median, min-max) against the world size per implementation, and the ratio to torch's DDP."""
    fig, (ax_ms, ax_ratio) = subplots(1, 2, figsize=(12, 4.5))
    for impl in dict.fromkeys(r["impl"] for r in rows):
        mine = [r for r in rows if r["impl"] == impl]
        ranks, median = [r["ranks"] for r in mine], [r["median_ms"] for r in mine]
        spread = [[m - r["min_ms"] for m, r in zip(median, mine)], [r["max_ms"] - m for m, r in zip(median, mine)]]
        style = "--" if impl in (PLAIN, TORCH) else "-"
        ax_ms.errorbar(ranks, median, yerr=spread, marker="o", capsize=3, linestyle=style, label=impl)
        ax_ratio.plot(ranks, [r["vs_torch"] for r in mine], marker="o", linestyle=style, label=impl)
    model = rows[0]["model"]
    ax_ms.set(xlabel="ranks", ylabel="training step (ms), median and min-max", title=describe(model))
    ax_ratio.set(xlabel="ranks", ylabel="step time / torch DDP's", title=f"global batch {GLOBAL_BATCH[model]}")
    for ax in (ax_ms, ax_ratio):
        ax.set_xticks(sorted({r["ranks"] for r in rows}))
        ax.legend(fontsize=7)
    fig.suptitle(f"torch {torch.__version__}, {machine()['cores']} cores shared by all ranks")
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4], help="world sizes")
    parser.add_argument("--rounds", type=int, default=5, help="turns each implementation takes, a fresh model each")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per round (after WARMUP untimed)")
    parser.add_argument("--runs", type=int, default=1, help="whole runs; ratios are reported as their medians")
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS per rank")
    parser.add_argument("--model", choices=MODELS, default="mlp", help="a few large tensors, or a GPT's many")
    parser.add_argument("--json", type=Path, help="all rows (default: results/ddp.json, ddp_gpt.json for the GPT)")
    parser.add_argument("--plot", type=Path, help="PNG figure (default: beside the JSON)")
    parser.add_argument(
        "--impls", nargs="+", help="only these distrib rows, e.g. 'distrib mpi ring' (and the baselines)"
    )
    parser.add_argument("--worker", type=Path, help="run one world size under a launcher, rows to this file")
    args = parser.parse_args(argv)
    if min(args.ranks) < 1 or min(args.rounds, args.steps, args.threads, args.runs) < 1:
        parser.error("--ranks, --rounds, --steps, --threads and --runs must all be >= 1")
    if args.worker:
        worker(args.worker, args.model, args.rounds, args.steps, args.impls)
        return
    args.json = args.json or RESULTS / ("ddp.json" if args.model == "mlp" else f"ddp_{args.model}.json")
    args.plot = args.plot or args.json.with_suffix(".png")
    stamp = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    load = os.getloadavg()[0]
    runs = []
    for run in range(args.runs):
        runs.append(drive(args.model, args.ranks, args.rounds, args.steps, args.threads, args.impls))
        print(f"run {run + 1} of {args.runs} done, load average {os.getloadavg()[0]:.1f}", flush=True)
    rows = across(runs)
    title = (
        f"Training step of {describe(args.model)} ({rows[0]['params']:,} parameters), "
        f"global batch {GLOBAL_BATCH[args.model]}, "
        f"{args.threads} thread(s) per rank, {args.rounds * args.steps} timed steps (slowest rank)"
    )
    print_table(title + (f", the last of {args.runs} runs" if args.runs > 1 else ""), rows, COLUMNS)
    if args.runs > 1:
        print_table(f"Ratios, median over {args.runs} runs (each a ratio within its run)", rows, RATIOS)
    for n in args.ranks:
        mine = [r for r in rows if r["ranks"] == n and r["impl"].startswith("distrib")]
        print_table(f"Where distrib's step goes at {n} rank(s), ms a step (benchmarks/ddp_breakdown.py)", mine, PARTS)
    settings = {"ranks": args.ranks, "rounds": args.rounds, "steps": args.steps, "threads": args.threads}
    settings |= {"runs": args.runs, "warmup_steps": WARMUP}
    settings |= {"model": args.model, "global_batch": GLOBAL_BATCH[args.model], "optimizer": "SGD"}
    settings |= {"widths": WIDTHS} if args.model == "mlp" else {"gpt": gpt.describe(args.model)}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    command = " ".join(["python -m benchmarks.ddp", *(sys.argv[1:] if argv is None else argv)])
    result = {"date": stamp, "command": command}
    result |= {"machine": machine(), "settings": settings, "load_average": {"start": load, "end": os.getloadavg()[0]}}
    args.json.write_text(json.dumps(result | {"rows": rows}, indent=1) + "\n")
    plot(rows, args.plot)
    print(f"\nwrote {args.json} and {args.plot}")


if __name__ == "__main__":
    main()
