"""Draw a run's learning curves to PNG: `python -m distrib.plot RUN_DIR` (train.py calls it at the end)."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def plot_run(run_dir: Path) -> Path:
    """Loss curves (training and validation) and every other validation metric per epoch, into RUN_DIR/curves.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    if not rows:
        raise ValueError(f"{run_dir / 'metrics.jsonl'} has no epochs to plot")
    epochs = [r["epoch"] + 1 for r in rows]
    losses = [k for k in rows[0] if k.endswith("loss") or k.startswith("train_loss")]
    others = [k for k in rows[0] if k.startswith("val_") and k not in losses and k != "val_count"]
    fig, axes = plt.subplots(1, 1 + bool(others), figsize=(5 + 5 * bool(others), 3.6), squeeze=False)
    for key in losses:
        axes[0][0].plot(epochs, [r[key] for r in rows], marker="o", label=key)
    axes[0][0].set(xlabel="epoch", ylabel="loss", title=run_dir.name)
    axes[0][0].legend()
    for key in others:
        axes[0][1].plot(epochs, [r[key] for r in rows], marker="o", label=key)
    if others:
        axes[0][1].set(xlabel="epoch", title="validation")
        axes[0][1].legend()
    fig.tight_layout()
    path = run_dir / "curves.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


if __name__ == "__main__":
    if len(sys.argv) != 2 or not (Path(sys.argv[1]) / "metrics.jsonl").is_file():
        print("usage: python -m distrib.plot RUN_DIR   (a directory holding metrics.jsonl)", file=sys.stderr)
        sys.exit(2)
    print(plot_run(Path(sys.argv[1])))
