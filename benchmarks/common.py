"""Helpers the benchmarks share: sizes written as 4K or 256M, the machine's description, fixed-width tables,
figures written to PNG."""

from __future__ import annotations

import argparse
import os
import platform
from pathlib import Path
from typing import Any

import torch

from distrib.memory import wanted

RESULTS = Path(__file__).parent / "results"
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def parse_bytes(text: str) -> int:
    """'4K', '256M', '1G' or a plain number of bytes (binary units: K = 1024)."""
    value = text.strip().upper().removesuffix("B").removesuffix("I")
    unit = value[-1:] if value[-1:] in _UNITS and value[-1:] else ""
    try:
        number = float(value[: len(value) - len(unit)]) * _UNITS[unit]
    except ValueError:
        raise argparse.ArgumentTypeError(f"a size is bytes, e.g. 4096, 4K, 256M or 1G; got {text!r}") from None
    if number < 1 or number != int(number):
        raise argparse.ArgumentTypeError(f"a size must be a whole number of bytes >= 1, got {text!r}")
    return int(number)


def human_bytes(n: int) -> str:
    """4096 -> '4K', 3 << 20 -> '3M': the largest binary unit that divides n."""
    for unit in ("G", "M", "K"):
        if n % _UNITS[unit] == 0:
            return f"{n // _UNITS[unit]}{unit}"
    return str(n)


def machine() -> dict:
    """What the numbers were measured on."""
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    models = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    affinity = getattr(os, "sched_getaffinity", None)
    return {
        "cpu": models[0] if models else platform.processor(),
        "cores": len(affinity(0)) if affinity else os.cpu_count(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "keep_freed_memory": wanted(),  # distrib.init()'s malloc setting (distrib/memory.py), for every row alike
    }


def print_table(title: str, rows: list[dict], columns: dict[str, str]) -> None:
    """A fixed-width table of the given row keys; columns maps key -> format spec, blank where absent."""
    cells = [[_cell(row.get(key), spec) for key, spec in columns.items()] for row in rows]
    widths = [max([len(key), *(len(line[i]) for line in cells)]) for i, key in enumerate(columns)]
    print(f"\n{title}")
    for line in [list(columns), *cells]:
        print("  ".join(cell.rjust(width) for cell, width in zip(line, widths)))


def _cell(value: object, spec: str) -> str:
    return "" if value is None else format(value, spec)


def subplots(*args: Any, **kwargs: Any) -> tuple[Any, Any]:
    """matplotlib's subplots, drawn for files only (imported here, so a run that plots nothing needs no matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(*args, **kwargs)


def save_figure(fig: Any, path: Path) -> None:
    """Lay `fig` out, write it to `path` as PNG (making the folder) and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
