"""Time to a target validation loss on slow links: DDP against DiLoCo (local SGD, H = 10 and 50), 4 hosts x 1 rank.

    python -m benchmarks.diloco [--gbit 1] [--delay-us 100] [--settings lm classify-128 classify-1024]
        [--repeats 2] [--json FILE] [--plot FILE.png]

Settings (SETTINGS): `lm`, the lm task as it comes (a 0.45M-parameter byte-level GPT on the standard library's
source, windows of 128 bytes, 32 a global batch, 8 epochs of 128 steps, Adam at lr 2e-3), in validation bits per
byte; and `classify-W`, the default task's data (12,800 training points, 100 global batches of 128 an epoch) with
its MLP at W hidden units (128 as the task builds it: 18K parameters; 1024: 1.1M), Adam at lr 3e-3, 6 epochs, in
validation loss. DDP averages gradients every step; DiLoCo runs H steps of the same optimizer on each rank, then
the outer Nesterov SGD (lr 0.7, momentum 0.9) on the averaged deltas. No schedule: the learning rates stay constant.
Validation (not timed) is of the one model the ranks share: every few steps for DDP, after each sync for DiLoCo.
Runs are interleaved: every setting and variant once, then again. Bytes per step: what a rank sends by the
analysis (a ring sends 2(n-1)/n of the tensor), and what host 0's link carried, measured.

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
from dataclasses import dataclass
from pathlib import Path

from benchmarks.common import RESULTS, machine, print_table, save_figure, subplots

VARIANTS = {"ddp": None, "diloco-h10": 10, "diloco-h50": 50}
HOSTS = 4
RUN_SECONDS = 900


@dataclass(frozen=True)
class Setting:
    """What one curve trains: the task, its global batch, lr and length, what is validated, and the targets."""

    task: str
    batch: int
    lr: float
    epochs: int
    every: int  # DDP's steps between validations
    metric: str
    targets: tuple[float, ...]
    width: int = 0  # classify's hidden units


SETTINGS = {
    "lm": Setting("lm", 32, 2e-3, 8, 16, "val_bits_per_byte", (3.5, 3.0)),
    "classify-128": Setting("classify", 128, 3e-3, 6, 10, "val_loss", (0.2, 0.1), width=128),
    "classify-1024": Setting("classify", 128, 3e-3, 6, 10, "val_loss", (0.2, 0.1), width=1024),
}


def build(setting: Setting):
    """The task and its model."""
    import torch
    from torch import nn

    from distrib import tasks
    from distrib.tasks.classify import Classify

    if setting.task == "lm":
        task = tasks.load("lm", seed=0)
        return task, task.build()["model"]
    task = Classify(seed=0, train_size=12_800)
    torch.manual_seed(0)
    w = setting.width
    return task, nn.Sequential(nn.Linear(8, w), nn.ReLU(), nn.Linear(w, w), nn.ReLU(), nn.Linear(w, 8))


def worker(name: str, variant: str, epochs: int | None, out: Path) -> None:
    """One rank of one run: train, validate whenever the ranks share one model, rank 0 writes the curve to `out`."""
    import torch

    import distrib
    from distrib.local_sgd import LocalSGD
    from distrib.loop import LoopConfig, fit, validate

    torch.set_num_threads(1)
    setting, comm = SETTINGS[name], distrib.init()
    task, net = build(setting)
    params = sum(p.numel() for p in net.parameters())
    if VARIANTS[variant] is None:
        model = distrib.DistributedDataParallel(net, comm=comm)
        optimizer = torch.optim.Adam(model.parameters(), lr=setting.lr)
    else:
        model = net
        optimizer = LocalSGD(torch.optim.Adam(net.parameters(), lr=setting.lr), comm, VARIANTS[variant], 0.7, 0.9)
    curve, clock = [], {"steps": 0, "eval": 0.0, "start": time.perf_counter()}

    def on_step(info: dict) -> None:
        clock["steps"] += 1
        shared = optimizer.since == 0 if isinstance(optimizer, LocalSGD) else clock["steps"] % setting.every == 0
        if not shared:
            return
        began = time.perf_counter()
        stats = validate(task, {"model": model}, comm)
        model.train()
        trained = began - clock["start"] - clock["eval"]  # validation so far not counted
        clock["eval"] += time.perf_counter() - began
        curve.append({"step": clock["steps"], "seconds": trained, "value": stats[setting.metric]})

    config = LoopConfig(epochs or setting.epochs, setting.batch)
    fit(task, {"model": model}, {"model": optimizer}, comm, config, on_step=on_step)
    if comm.rank == 0:
        sends = params * 4 * 2 * (comm.size - 1) / comm.size  # one ring allreduce of every parameter
        vote = (comm.size + 1) * 8  # the loop's per-step agreement: a few bytes, every step, in every variant
        result = {"setting": name, "variant": variant, "parameters": params, "ranks": comm.size, "curve": curve}
        result |= {"bytes_per_step": sends / (VARIANTS[variant] or 1) + vote, "steps": clock["steps"]}
        out.write_text(json.dumps(result))


def run(name: str, variant: str, epochs: int | None, made, scratch: Path) -> dict:
    from tests.hostjobs import finish, job_env, start

    out, log = scratch / f"{name}-{variant}.json", scratch / f"{name}-{variant}.log"
    launch = [sys.executable, "-m", "launch", "-n", str(HOSTS), "--hosts", made.hosts_arg(1)]
    command = [*launch, "--", "python", "-m", "benchmarks.diloco", "--worker", name, variant, "--out", str(out)]
    command += ["--epochs", str(epochs)] if epochs else []
    before = made.link_bytes(0)
    proc = start([*made.exec_prefix(0), *command], job_env(made, OMP_NUM_THREADS="1"), log)
    (text,) = finish([proc], [log], RUN_SECONDS)
    if proc.returncode:
        raise SystemExit(f"{name} {variant} failed:\n{text[-4000:]}")
    result = json.loads(out.read_text())
    result["link_bytes_per_step"] = (made.link_bytes(0) - before) / 2 / result["steps"]  # sent + received, halved
    return result


def time_to(curve: list[dict], target: float) -> float | None:
    """Seconds of training until the validated value first reached `target` (None: it did not)."""
    return next((p["seconds"] for p in curve if p["value"] <= target), None)


def summarise(results: list[dict], names: list[str]) -> list[dict]:
    """Per setting, target and variant, medians over the repeats: time to target, time per step, bytes per step."""
    summary = []
    for name in names:
        for target in SETTINGS[name].targets:
            for variant in VARIANTS:
                mine = [r for r in results if (r["setting"], r["variant"]) == (name, variant)]
                reached = [s for r in mine if (s := time_to(r["curve"], target)) is not None]
                row = {"setting": name, "target": target, "variant": variant, "runs": len(mine)}
                row |= {"reached": len(reached), "time_to_target_s": statistics.median(reached) if reached else None}
                row["ms_per_step"] = statistics.median(r["curve"][-1]["seconds"] / r["curve"][-1]["step"] * 1e3
                                                       for r in mine)  # fmt: skip
                row["final"] = statistics.median(r["curve"][-1]["value"] for r in mine)
                row["bytes_per_step"] = mine[0]["bytes_per_step"]
                row["link_bytes_per_step"] = statistics.median(r["link_bytes_per_step"] for r in mine)
                summary.append(row)
    for row in summary:
        ddp = next(
            r for r in summary if (r["setting"], r["target"], r["variant"]) == (row["setting"], row["target"], "ddp")
        )
        if row["time_to_target_s"] and ddp["time_to_target_s"]:
            row["speedup"] = ddp["time_to_target_s"] / row["time_to_target_s"]
    return summary


def plot(results: list[dict], names: list[str], title: str, path: Path) -> None:
    fig, axes = subplots(1, len(names), figsize=(5.5 * len(names), 4.2), squeeze=False)
    colors = {"ddp": "black", "diloco-h10": "tab:orange", "diloco-h50": "tab:green"}
    for ax, name in zip(axes[0], names):
        setting = SETTINGS[name]
        for r in (r for r in results if r["setting"] == name):
            label = r["variant"] if r["repeat"] == 0 else None
            xs, ys = [p["seconds"] for p in r["curve"]], [p["value"] for p in r["curve"]]
            ax.plot(xs, ys, marker="o", markersize=2.5, color=colors[r["variant"]], alpha=0.8, label=label)
        for target in setting.targets:
            ax.axhline(target, linestyle="--", color="gray", linewidth=1)
        params = next(r["parameters"] for r in results if r["setting"] == name)
        ax.set(xscale="log", yscale="log", xlabel="training seconds (validation not counted)",
               ylabel=setting.metric.replace("_", " "), title=f"{name} ({params / 1e6:.2g}M parameters)")  # fmt: skip
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", nargs=2, metavar=("SETTING", "VARIANT"), help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--settings", nargs="+", choices=SETTINGS, default=list(SETTINGS))
    parser.add_argument("--gbit", type=float, default=1.0)
    parser.add_argument("--delay-us", type=float, default=100.0)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=None, help="instead of each setting's (a smoke run)")
    parser.add_argument("--json", type=Path, default=RESULTS / "diloco.json")
    parser.add_argument("--plot", type=Path, default=RESULTS / "diloco.png")
    args = parser.parse_args(argv)
    if args.worker:
        return worker(*args.worker, args.epochs, args.out)
    from tests import netns

    if (reason := netns.unavailable(shaped=True)) is not None:
        raise SystemExit(f"shaped hosts cannot be made here: {reason}")
    link = netns.Link(gbit=args.gbit, delay_us=args.delay_us)
    stamp = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    results, loads = [], []
    with tempfile.TemporaryDirectory() as scratch, netns.cluster(HOSTS, link) as made:
        for repeat in range(args.repeats):
            for name in args.settings:
                for variant in VARIANTS:
                    load = os.getloadavg()[0]
                    results.append(run(name, variant, args.epochs, made, Path(scratch)) | {"repeat": repeat})
                    loads.append({"setting": name, "variant": variant, "start": load, "end": os.getloadavg()[0]})
                    print(f"repeat {repeat + 1}, {name}, {variant}: load {load:.1f}", flush=True)
    summary = summarise(results, args.settings)
    columns = {"setting": "", "target": "g", "variant": "", "runs": "d", "reached": "d", "time_to_target_s": ".2f"}
    columns |= {"speedup": ".2f", "ms_per_step": ".2f", "final": ".4f", "bytes_per_step": ".0f"}
    columns |= {"link_bytes_per_step": ".0f"}
    print_table(f"time to target on {HOSTS} hosts x 1 rank, {link.describe()} (medians)", summary, columns)
    result = {"date": stamp, "command": "python -m benchmarks.diloco " + " ".join(argv or sys.argv[1:])}
    result |= {"link": link.describe(), "machine": machine(), "load_average": loads}
    result |= {"settings": {n: vars(SETTINGS[n]) for n in args.settings}, "summary": summary, "runs": results}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1) + "\n")
    plot(
        results,
        args.settings,
        f"DDP against DiLoCo, {HOSTS} hosts x 1 rank, {link.describe()}, {stamp[:10]}",
        args.plot,
    )
    print(f"wrote {args.json} and {args.plot}")


if __name__ == "__main__":
    main()
