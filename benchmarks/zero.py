"""How fast is ZeRO-Offload? Section cpu_adam: the CPU optimizer step against torch.optim.Adam and DRAM.
Section train (benchmarks/zero_train.py): a training step and the optimizer memory per rank of ZeRO-Offload against
DDP+Adam, 1-4 ranks, on a 20M-parameter MLP (--model mlp) or GPT (--model gpt).

python -m benchmarks.zero [--sections cpu_adam train] [--sizes 1e6 1e7 1e8] [--threads N] [--ranks 1 2 4]
                          [--model mlp|gpt|gpt-tiny]
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from benchmarks import common, zero_train
from benchmarks.common import RESULTS, print_table, save_figure, subplots
from distrib.comm import ALGORITHMS
from distrib.zero.cpu_adam import adam_step_

BYTES_PER_PARAM = 28  # read param, grad, exp_avg, exp_avg_sq (16) + write param, exp_avg, exp_avg_sq (12)
COPY_ELEMENTS = 10**8  # 400 MB a side, far past any cache, so copy_ runs at DRAM speed
HYPER = {"lr": 1e-3, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.01}
OURS, FUSED = "distrib adam_step_", "torch fused=True"
CPU_ADAM_COLUMNS = {"params": ",d", "impl": "", "median_ms": ".3f", "min_ms": ".3f", "max_ms": ".3f"}
CPU_ADAM_COLUMNS |= {"gbps": ".1f", "speed_vs_torch_fused": ".2f", "of_copy_bandwidth": ".2f"}


def timed(fn: Callable[[], object], warmup: int, repeats: int) -> list[float]:
    """Seconds per call of fn, after warmup calls that are not counted."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def summary(section: str, impl: str, params: int, times: list[float], nbytes: int) -> dict:
    """One result row: median and spread in ms, bandwidth in GB/s of nbytes moved per call."""
    median = statistics.median(times)
    return {
        "section": section,
        "impl": impl,
        "params": params,
        "median_ms": median * 1e3,
        "min_ms": min(times) * 1e3,
        "max_ms": max(times) * 1e3,
        "gbps": nbytes / median / 1e9,
    }


def _steppers(n: int) -> dict[str, Callable[[], None]]:
    """One Adam step per implementation, all on the same param and grad, each with its own moments."""
    param = torch.randn(n, requires_grad=True)
    param.grad = torch.randn(n)
    exp_avg, exp_avg_sq, steps = torch.zeros(n), torch.zeros(n), itertools.count(1)

    def ours() -> None:
        adam_step_(param.detach(), param.grad, exp_avg, exp_avg_sq, step=next(steps), adamw=False, **HYPER)

    hyper = {"lr": HYPER["lr"], "betas": (HYPER["beta1"], HYPER["beta2"]), "eps": HYPER["eps"]}
    flags = {"torch foreach=False": {"foreach": False}, "torch foreach=True": {"foreach": True}}
    flags[FUSED] = {"fused": True}
    optimizers = {
        name: torch.optim.Adam([param], weight_decay=HYPER["weight_decay"], **hyper, **kw) for name, kw in flags.items()
    }
    return {OURS: ours, **{name: opt.step for name, opt in optimizers.items()}}


def cpu_adam(sizes: list[int], warmup: int, repeats: int) -> list[dict]:
    """Rows for our CPU Adam and torch.optim.Adam's three paths at each size, plus the memory bound.

    The bound is dst.copy_(src) of COPY_ELEMENTS floats, counting 4 B read + 4 B written each. copy_ also
    pays a read-for-ownership of dst lines that the 8 B leave out, while Adam only writes lines it has just
    read, so Adam's counted GB/s can exceed it. Everything takes turns step by step (the copy once per
    round, the order rotating), so background load on a shared machine and cold caches hit all alike.
    """
    src, dst = torch.randn(COPY_ELEMENTS), torch.empty(COPY_ELEMENTS)

    def copy() -> None:
        dst.copy_(src)

    timed(copy, warmup, 0)
    copy_times: list[float] = []
    rows = []
    for n in sizes:
        steppers = _steppers(n)
        times: dict[str, list[float]] = {name: [] for name in steppers}
        for step in steppers.values():
            timed(step, warmup, 0)  # the first torch step allocates the moments
        names = list(steppers)
        for i in range(repeats):
            for name in names[i % len(names) :] + names[: i % len(names)]:  # rotate who runs on cold caches
                times[name] += timed(steppers[name], 0, 1)
            copy_times += timed(copy, 0, 1)
        del steppers  # free this size's state before the next size allocates its own
        size_rows = [summary("cpu_adam", name, n, t, BYTES_PER_PARAM * n) for name, t in times.items()]
        fused_ms = next(r["median_ms"] for r in size_rows if r["impl"] == FUSED)
        for row in size_rows:
            row["speed_vs_torch_fused"] = fused_ms / row["median_ms"]
        rows += size_rows
    bound = summary("cpu_adam", "copy_ (memory bound)", COPY_ELEMENTS, copy_times, 8 * COPY_ELEMENTS)
    for row in rows:
        row["of_copy_bandwidth"] = row["gbps"] / bound["gbps"]
    return [bound, *rows]


def plot_cpu_adam(rows: list[dict], path: Path) -> None:
    """Step time and GB/s against parameter count, one line per implementation, the copy_ bound dashed."""
    bound = next(r for r in rows if r["impl"].startswith("copy_"))
    fig, (ax_ms, ax_bw) = subplots(1, 2, figsize=(11, 4.2))
    for impl in dict.fromkeys(r["impl"] for r in rows if r is not bound):
        mine = [r for r in rows if r["impl"] == impl]
        params = [r["params"] for r in mine]
        median = [r["median_ms"] for r in mine]
        spread = [
            [m - r["min_ms"] for m, r in zip(median, mine)],
            [r["max_ms"] - m for m, r in zip(median, mine)],
        ]
        ax_ms.errorbar(params, median, yerr=spread, marker="o", capsize=3, label=impl)
        ax_bw.semilogx(params, [r["gbps"] for r in mine], marker="o", label=impl)
    ax_bw.axhline(bound["gbps"], linestyle="--", color="gray", label="copy_ bandwidth")
    ax_ms.set(xscale="log", yscale="log", xlabel="parameters", ylabel="step time (ms), median and min-max")
    ax_ms.set_title("CPU Adam step")
    ax_bw.set(xlabel="parameters", ylabel=f"GB/s ({BYTES_PER_PARAM} B per parameter)", title="bandwidth")
    ax_bw.legend(fontsize=8)
    fig.suptitle(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    save_figure(fig, path)


def machine() -> dict:
    """What the numbers were measured on, with the threads and vector instructions the CPU Adam kernel used."""
    return common.machine() | {
        "threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }


def _size(text: str) -> int:
    n = int(float(text))
    if n < 1:
        raise argparse.ArgumentTypeError(f"a size is a parameter count >= 1, got {text!r}")
    return n


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", nargs="+", choices=("cpu_adam", "train"), default=["cpu_adam", "train"])
    parser.add_argument("--sizes", type=_size, nargs="+", default=[10**6, 10**7, 10**8], help="parameter counts")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per implementation")
    parser.add_argument("--repeats", type=int, default=11, help="timed steps per implementation")
    parser.add_argument("--json", type=Path, default=RESULTS / "zero_cpu_adam.json", help="all rows")
    parser.add_argument("--plot", type=Path, default=RESULTS / "zero_cpu_adam.png", help="PNG figure")
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4], help="train: world sizes")
    parser.add_argument("--model", choices=zero_train.MODELS, default="mlp", help="train: the model trained")
    parser.add_argument("--batch", type=int, help="train: samples per rank and step (mlp 16, gpt 4 sequences)")
    parser.add_argument("--algorithms", nargs="+", choices=ALGORITHMS, default=["native", "ring"], help="train")
    parser.add_argument("--train-json", type=Path, help="train rows (default: zero_train.json, zero_train_gpt.json)")
    parser.add_argument("--train-plot", type=Path, help="train PNG figure (default: beside the train JSON)")
    parser.add_argument("--train-worker", type=Path, help=argparse.SUPPRESS)  # set by train() for each rank
    args = parser.parse_args(argv)
    args.batch = zero_train.BATCH[args.model] if args.batch is None else args.batch
    args.train_json = args.train_json or RESULTS / f"zero_train{'' if args.model == 'mlp' else '_' + args.model}.json"
    args.train_plot = args.train_plot or args.train_json.with_suffix(".png")
    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    if args.warmup < 1 or args.repeats < 1:
        parser.error(f"--warmup and --repeats must be >= 1, got {args.warmup} and {args.repeats}")
    if min(args.ranks) < 1 or args.batch < 1:
        parser.error(f"--ranks and --batch must be >= 1, got {args.ranks} and {args.batch}")
    if args.train_worker:
        zero_train.train_worker(args.train_worker, args.model, args.algorithms, args.batch, args.warmup, args.repeats)
        return

    info = machine()
    print(f"{info['cpu']}, torch {info['torch']} ({info['cpu_capability']}), {info['threads']} threads")
    settings = {"sizes": args.sizes, "warmup": args.warmup, "repeats": args.repeats}
    if "cpu_adam" in args.sections:
        rows = cpu_adam(args.sizes, args.warmup, args.repeats)
        title = f"CPU Adam step, {args.repeats} timed steps, GB/s at {BYTES_PER_PARAM} B/param"
        print_table(title, rows, CPU_ADAM_COLUMNS)
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"machine": info, "settings": settings, "rows": rows}, indent=1) + "\n")
        plot_cpu_adam(rows, args.plot)
        print(f"\nwrote {args.json} and {args.plot}")
    if "train" in args.sections:
        rows = zero_train.train(args.model, args.ranks, args.algorithms, args.batch, args.warmup, args.repeats)
        title = f"Training step, {zero_train.describe(args.model)}, batch {args.batch} per rank, {args.repeats} timed "
        print_table(title + "steps (slowest rank)", rows, zero_train.TRAIN_COLUMNS)
        settings = {"ranks": args.ranks, "algorithms": args.algorithms, "batch": args.batch, "model": args.model}
        settings |= {"widths": zero_train.WIDTHS} if args.model == "mlp" else {"gpt": zero_train.describe(args.model)}
        settings["warmup"] = args.warmup
        settings |= {"repeats": args.repeats, "ddp": "flat allreduce(avg) + torch.optim.Adam(fused=True)"}
        args.train_json.parent.mkdir(parents=True, exist_ok=True)
        args.train_json.write_text(json.dumps({"machine": info, "settings": settings, "rows": rows}, indent=1) + "\n")
        zero_train.plot_train(rows, args.train_plot)
        print(f"\nwrote {args.train_json} and {args.train_plot}")


if __name__ == "__main__":
    main()
