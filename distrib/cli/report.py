"""What rank 0 tells the user about a run: an epoch line, where the time went, metrics.jsonl, TensorBoard."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tqdm import tqdm

from distrib.steps import Progress

# The loop's stages (time_<stage>_s in the stats), grouped as the epoch summary reports them.
_COMPUTE = ("forward", "backward", "step")
_DATA = ("collect", "data")


def where_time_went(stats: dict[str, float]) -> str:
    """One line: compute, communication not hidden by compute, waiting on the slowest rank, data, validation."""
    spent = {k[5:-2]: v for k, v in stats.items() if k.startswith("time_") and k.endswith("_s")}
    exposed = spent.pop("comm", 0.0)  # already inside the stages that blocked on it (backward, step)
    parts = {
        "compute": max(sum(spent.get(s, 0.0) for s in _COMPUTE) - exposed, 0.0),
        "communication not hidden": exposed,
        "waiting on the slowest rank": spent.get("wait", 0.0),
        "data": sum(spent.get(s, 0.0) for s in _DATA),
        "validation": spent.get("validation", 0.0),
    }
    total = sum(parts.values()) or 1.0
    return "  time: " + ", ".join(f"{name} {100 * s / total:.0f}%" for name, s in parts.items()) + f" of {total:.2f} s"


class Reporter:
    """Rank 0's output: progress bar, epoch lines, RUN_DIR/metrics.jsonl, and TensorBoard when asked for."""

    def __init__(self, out: Path, epochs: int, done: int, progress: bool, tensorboard: Path | None):
        self.out, self.epochs = out, epochs
        self.bar = tqdm(total=None, initial=done, disable=not progress, unit="step", leave=False)
        self.writer = None
        if tensorboard is not None:
            from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package: checked by the CLI

            self.writer = SummaryWriter(str(tensorboard))
        self.step_count = done

    def step(self, info: dict[str, Any], progress: Progress) -> None:
        if self.bar.total is None:  # known once the first epoch's data is
            self.bar.total = self.epochs * progress.steps
        self.bar.update()
        self.step_count += 1
        if self.writer is not None:
            for key in ("loss", "lr", "grad_norm"):
                if info.get(key) == info.get(key):  # skip NaN: no clipping means no norm was computed
                    self.writer.add_scalar(f"step/{key}", info[key], self.step_count)

    def epoch(self, stats: dict[str, float]) -> None:
        shown = "  ".join(
            f"{k} {v:.4g}" for k, v in stats.items() if k not in ("epoch", "val_count") and not k.startswith("time_")
        )
        tqdm.write(f"epoch {int(stats['epoch']) + 1}/{self.epochs}  {shown}")
        tqdm.write(where_time_went(stats))
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(stats) + "\n")
        if self.writer is not None:
            for key, value in stats.items():
                if key != "epoch":
                    self.writer.add_scalar(f"epoch/{key}", value, int(stats["epoch"]) + 1)
            spent = sum(v for k, v in stats.items() if k.startswith("time_") and k != "time_comm_s")
            share = stats.get("time_comm_s", 0.0) / (spent or 1.0)
            self.writer.add_scalar("epoch/comm_time_share", share, int(stats["epoch"]) + 1)
            self.writer.flush()

    def close(self) -> None:
        self.bar.close()
        if self.writer is not None:
            self.writer.close()
