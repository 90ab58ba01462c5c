"""Draw to PNG: a run's learning curves (`python -m distrib.cli.plot RUN_DIR`, also at a run's end), or a
collective benchmark's bus bandwidth against message size (`python -m distrib.cli.plot BENCHMARK.json`)."""

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


def plot_busbw(results: Path) -> Path:
    """busbw against bytes, one line per (backend, algorithm), log-log, from a benchmark's JSON rows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = json.loads(results.read_text())
    rows = data["rows"] if isinstance(data, dict) else data
    if not rows or "busbw_gbps" not in rows[0]:
        raise ValueError(f"{results} holds no benchmark rows with busbw_gbps")
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for key in sorted({(r["backend"], r["algorithm"]) for r in rows}):
        line = sorted((r["bytes"], r["busbw_gbps"]) for r in rows if (r["backend"], r["algorithm"]) == key)
        ax.plot(*zip(*line), marker="o", label=f"{key[1]} ({key[0]})")
    ax.set(xscale="log", yscale="log", xlabel="bytes", ylabel="busbw (GB/s)", title=results.stem)
    ax.legend()
    fig.tight_layout()
    path = results.with_suffix(".busbw.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(argv: list[str]) -> str:
    """The PNG drawn for argv's one path; raises ValueError naming what is wrong with it."""
    if len(argv) != 1:
        raise ValueError("name one RUN_DIR or BENCHMARK.json")
    target = Path(argv[0])
    if target.suffix == ".json" and target.is_file():
        try:
            return str(plot_busbw(target))
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise ValueError(f"{target} is not a benchmark's JSON ({type(error).__name__}: {error})") from error
    if (target / "metrics.jsonl").is_file():
        try:
            return str(plot_run(target))
        except (json.JSONDecodeError, KeyError) as error:
            raise ValueError(f"{target / 'metrics.jsonl'} is not a run's metrics ({error})") from error
    what = "no such file or directory" if not target.exists() else "has no metrics.jsonl, and is not a .json file"
    raise ValueError(f"{target}: {what}")


if __name__ == "__main__":
    try:
        print(main(sys.argv[1:]))
    except ValueError as error:
        print(f"python -m distrib.cli.plot: error: {error}\nusage: python -m distrib.cli.plot RUN_DIR | BENCHMARK.json",
              file=sys.stderr)  # fmt: skip
        sys.exit(2)
