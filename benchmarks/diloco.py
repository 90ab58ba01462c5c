"""Time to a target validation loss on slow links: DDP against DiLoCo (local SGD, H = 10 and 50), 4 hosts x 1 rank.

    python -m benchmarks.diloco [--gbit 1] [--delay-us 100] [--widths 128 1024] [--repeats 2] [--targets 0.2 0.1]
        [--json FILE] [--plot FILE.png]

The default task's data (classify: 8-d points, 8 classes; 12,800 training points so that an epoch is 100 global
batches of 128) and its MLP, at the default width of 128 hidden units (18K parameters, a 72 KB gradient) and
widened (1024: 1.1M parameters, 4.3 MB), so that sending the gradient is a cost worth saving. Every variant uses
Adam at lr 3e-3 on each rank; DDP averages gradients every step, DiLoCo runs H steps per rank and then the outer
Nesterov SGD (lr 0.7, momentum 0.9) on the averaged deltas. Validation (not timed) is of the one model the
ranks share: every 10 steps for DDP, after every sync (every H steps) for DiLoCo. Runs are interleaved: every
variant once, then again. Bytes per step: what a rank sends by the analysis (a ring sends 2(n-1)/n of the
tensor), and what host 0's link carried, measured.

Needs root (network namespaces) and tc: the hosts and links of tests/netns.py.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import RESULTS, machine, print_table, save_figure, subplots

EVAL_EVERY = 10  # DDP's steps between validations; DiLoCo validates at its syncs. An epoch is 100 steps.
VARIANTS = {"ddp": None, "diloco-h10": 10, "diloco-h50": 50}
HOSTS = 4
RUN_SECONDS = 600


def worker(variant: str, width: int, epochs: int, out: Path) -> None:
    """One rank of one run: train, validate whenever the ranks share one model, rank 0 writes the curve to `out`."""
    import torch
    from torch import nn

    import distrib
    from distrib.local_sgd import LocalSGD
    from distrib.loop import LoopConfig, fit, validate
    from distrib.tasks.classify import Classify

    torch.set_num_threads(1)
    comm = distrib.init()
    task = Classify(seed=0, train_size=12_800)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 8))
    params = sum(p.numel() for p in net.parameters())
    if VARIANTS[variant] is None:
        model = distrib.DistributedDataParallel(net, comm=comm)
        optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    else:
        model = net
        optimizer = LocalSGD(torch.optim.Adam(net.parameters(), lr=3e-3), comm, VARIANTS[variant], 0.7, 0.9)
    curve, clock = [], {"steps": 0, "eval": 0.0, "start": time.perf_counter()}

    def on_step(info: dict) -> None:
        clock["steps"] += 1
        if clock["steps"] % (VARIANTS[variant] or EVAL_EVERY):
            return
        began = time.perf_counter()
        stats = validate(task, {"model": model}, comm)
        model.train()
        trained = began - clock["start"] - clock["eval"]  # validation so far not counted
        clock["eval"] += time.perf_counter() - began
        curve.append({"step": clock["steps"], "seconds": trained, "val_loss": stats["val_loss"]})

    fit(task, {"model": model}, {"model": optimizer}, comm, LoopConfig(epochs, 128), on_step=on_step)
    if comm.rank == 0:
        grad = params * 4
        sends = grad * 2 * (comm.size - 1) / comm.size  # one ring allreduce of every parameter
        vote = (comm.size + 1) * 8  # the loop's per-step agreement: a few bytes, every step, in every variant
        every = VARIANTS[variant] or 1
        result = {"variant": variant, "width": width, "parameters": params, "ranks": comm.size, "curve": curve}
        result |= {"bytes_per_step": sends / every + vote, "steps": clock["steps"]}
        out.write_text(json.dumps(result))


def run(variant: str, width: int, epochs: int, made, scratch: Path) -> dict:
    from tests.hostjobs import finish, job_env, start

    out, log = scratch / f"{variant}-{width}.json", scratch / f"{variant}-{width}.log"
    launch = [sys.executable, "-m", "launch", "-n", str(HOSTS), "--hosts", made.hosts_arg(1)]
    command = [*launch, "--", "python", "-m", "benchmarks.diloco", "--worker", variant, "--width", str(width)]
    command += ["--epochs", str(epochs), "--out", str(out)]
    before = made.link_bytes(0)
    proc = start([*made.exec_prefix(0), *command], job_env(made, OMP_NUM_THREADS="1"), log)
    (text,) = finish([proc], [log], RUN_SECONDS)
    if proc.returncode:
        raise SystemExit(f"{variant} (width {width}) failed:\n{text[-4000:]}")
    result = json.loads(out.read_text())
    result["link_bytes_per_step"] = (made.link_bytes(0) - before) / 2 / result["steps"]  # sent + received, halved
    return result


def time_to(curve: list[dict], target: float) -> float | None:
    """Seconds of training until the validation loss first reached `target` (None: it did not)."""
    return next((p["seconds"] for p in curve if p["val_loss"] <= target), None)


def summarise(results: list[dict], widths: list[int], targets: list[float]) -> list[dict]:
    """Per target, width and variant, medians over the repeats: time to the target, time per step, bytes per step."""
    summary = []
    for target, width, variant in ((t, w, v) for t in targets for w in widths for v in VARIANTS):
        mine = [r for r in results if (r["variant"], r["width"]) == (variant, width)]
        reached = [s for r in mine if (s := time_to(r["curve"], target)) is not None]
        row = {"target": target, "width": width, "variant": variant, "runs": len(mine), "reached": len(reached)}
        row["time_to_target_s"] = statistics.median(reached) if reached else None
        row["ms_per_step"] = statistics.median(r["curve"][-1]["seconds"] / r["curve"][-1]["step"] * 1e3 for r in mine)
        row["final_val_loss"] = statistics.median(r["curve"][-1]["val_loss"] for r in mine)
        row["bytes_per_step"] = mine[0]["bytes_per_step"]
        row["link_bytes_per_step"] = statistics.median(r["link_bytes_per_step"] for r in mine)
        summary.append(row)
    for row in summary:
        ddp = next(
            r for r in summary if (r["target"], r["width"], r["variant"]) == (row["target"], row["width"], "ddp")
        )
        if row["time_to_target_s"] and ddp["time_to_target_s"]:
            row["speedup"] = ddp["time_to_target_s"] / row["time_to_target_s"]
    return summary


def plot(results: list[dict], targets: list[float], title: str, path: Path) -> None:
    widths = sorted({r["width"] for r in results})
    fig, axes = subplots(1, len(widths), figsize=(5.5 * len(widths), 4.2), squeeze=False)
    colors = {"ddp": "black", "diloco-h10": "tab:orange", "diloco-h50": "tab:green"}
    for ax, width in zip(axes[0], widths):
        for r in (r for r in results if r["width"] == width):
            label = r["variant"] if r["repeat"] == 0 else None
            xs, ys = [p["seconds"] for p in r["curve"]], [p["val_loss"] for p in r["curve"]]
            ax.plot(xs, ys, marker="o", markersize=3, color=colors[r["variant"]], alpha=0.8, label=label)
        for target in targets:
            ax.axhline(target, linestyle="--", color="gray", linewidth=1)
        params = next(r["parameters"] for r in results if r["width"] == width)
        ax.set(xscale="log", yscale="log", xlabel="training seconds (validation not counted)", ylabel="val loss",
               title=f"MLP width {width} ({params / 1e6:.2g}M parameters)")  # fmt: skip
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--width", type=int, default=128, help=argparse.SUPPRESS)
    parser.add_argument("--widths", type=int, nargs="+", default=[128, 1024])
    parser.add_argument("--epochs", type=int, default=6, help="of 100 steps each")
    parser.add_argument("--gbit", type=float, default=1.0)
    parser.add_argument("--delay-us", type=float, default=100.0)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--targets", type=float, nargs="+", default=[0.2, 0.1], help="validation losses to reach")
    parser.add_argument("--json", type=Path, default=RESULTS / "diloco.json")
    parser.add_argument("--plot", type=Path, default=RESULTS / "diloco.png")
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args.worker, args.width, args.epochs, args.out)
    from tests import netns

    if (reason := netns.unavailable(shaped=True)) is not None:
        raise SystemExit(f"shaped hosts cannot be made here: {reason}")
    link = netns.Link(gbit=args.gbit, delay_us=args.delay_us)
    stamp = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    results, loads = [], []
    with tempfile.TemporaryDirectory() as scratch, netns.cluster(HOSTS, link) as made:
        for repeat in range(args.repeats):
            for width in args.widths:
                for variant in VARIANTS:
                    load = os.getloadavg()[0]
                    result = run(variant, width, args.epochs, made, Path(scratch)) | {"repeat": repeat}
                    loads.append({"variant": variant, "width": width, "start": load, "end": os.getloadavg()[0]})
                    print(f"repeat {repeat + 1}, width {width}, {variant}: load {load:.1f}", flush=True)
                    results.append(result)
    summary = summarise(results, args.widths, args.targets)
    columns = {
        "target": "g",
        "width": "d",
        "variant": "",
        "runs": "d",
        "reached": "d",
        "time_to_target_s": ".2f",
        "speedup": ".2f",
    }
    columns |= {"ms_per_step": ".2f", "final_val_loss": ".4f", "bytes_per_step": ".0f", "link_bytes_per_step": ".0f"}
    print_table(
        f"time to val loss {args.targets} on {HOSTS} hosts x 1 rank, {link.describe()} (medians)",
        summary,
        columns,
    )
    result = {"date": stamp, "command": "python -m benchmarks.diloco " + " ".join(argv or sys.argv[1:])}
    result |= {"link": link.describe(), "targets": args.targets, "machine": machine(), "load_average": loads}
    result |= {"summary": summary, "runs": results}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1) + "\n")
    title = f"DDP against DiLoCo, {HOSTS} hosts x 1 rank, {link.describe()}, {stamp[:10]}"
    plot(results, args.targets, title, args.plot)
    print(f"wrote {args.json} and {args.plot}")


if __name__ == "__main__":
    main()
