"""The alpha-beta cost model of allreduce, fitted to benchmarks/allreduce.py's rows and extrapolated.

time = a(n) * alpha + b(n) * bytes * beta: alpha is one message's latency, beta the seconds per byte of the link
(1 / bandwidth), and a(n), b(n) the number of messages and of tensor-sized byte loads on the critical path of
each algorithm over n ranks (SHAPES). The fit gives each measured algorithm its own alpha and beta; the
predictions put the textbook algorithms on stated networks at 8 .. 4096 ranks and find where one overtakes another.

    python -m benchmarks.model benchmarks/results/allreduce_2ranks.json benchmarks/results/allreduce_4ranks.json
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from benchmarks.common import human_bytes, parse_bytes, print_table

Shape = Callable[[int], tuple[float, float]]
SHAPES: dict[str, Shape] = {
    # everyone sends the whole tensor to rank 0, which sends the sum back: 2(n-1) messages of N through one rank
    "naive": lambda n: (2 * (n - 1), 2 * (n - 1)),
    # reduce-scatter then allgather around the ring: 2(n-1) messages of N/n, every rank sending at once
    "ring": lambda n: (2 * (n - 1), 2 * (n - 1) / n),
    # log2(n) exchanges of the whole tensor with a partner at distance 1, 2, 4 ...: MPICH's small-message choice
    "recursive doubling": lambda n: (math.log2(n), math.log2(n)),
    # Rabenseifner: reduce-scatter by recursive halving, allgather by doubling: MPICH's large-message choice
    "halving-doubling": lambda n: (2 * math.log2(n), 2 * (n - 1) / n),
    # one host's memory is the shared link: two waits per piece; n ranks each copy the tensor in and out
    "shm": lambda n: (2, n),
}
NATIVE_SHAPE = {"mpi": "halving-doubling", "gloo": "ring", "nccl": "ring"}  # what each library runs for large N
# Stated figures (alpha seconds, bandwidth bytes/s per direction), typical of each class of link.
NETWORKS = {
    "25 GbE (TCP)": (20e-6, 25e9 / 8),
    "100 Gb InfiniBand": (1.5e-6, 100e9 / 8),
    "NVLink-class": (2e-6, 250e9),
}
PREDICTED = ("naive", "ring", "recursive doubling", "halving-doubling")  # shm does not cross hosts


@dataclass(frozen=True)
class Fit:
    """An algorithm's fitted latency and bandwidth, and how far the fit misses its own measured points."""

    shape: str
    alpha: float  # seconds per message
    beta: float  # seconds per byte
    points: int
    median_error: float  # |predicted / measured - 1|
    max_error: float

    def time(self, n: int, nbytes: float) -> float:
        a, b = SHAPES[self.shape](n)
        return a * self.alpha + b * nbytes * self.beta


def fit(shape: str, points: list[tuple[int, int, float]]) -> Fit:
    """Least squares in relative error over (ranks, bytes, seconds), alpha and beta kept non-negative."""
    design = np.array([[*SHAPES[shape](n)] for n, _, _ in points]) * [[1, nbytes] for _, nbytes, _ in points]
    seconds = np.array([s for _, _, s in points])
    weighted = design / seconds[:, None]  # every point counts by its relative error, 4 KiB as much as 256 MiB
    coef = np.linalg.lstsq(weighted, np.ones(len(points)), rcond=None)[0]
    if (coef < 0).any():  # a negative latency or bandwidth means noise: fit the other term alone
        keep = int(np.argmax(coef))
        coef = np.zeros(2)
        coef[keep] = np.linalg.lstsq(weighted[:, [keep]], np.ones(len(points)), rcond=None)[0][0]
    errors = np.abs(design @ coef / seconds - 1)
    return Fit(shape, float(coef[0]), float(coef[1]), len(points), float(np.median(errors)), float(errors.max()))


def crossover(first: Fit, second: Fit, n: int) -> float | None:
    """Bytes at which `first` and `second` take equal time at n ranks (None if one is faster at every size)."""
    (a1, b1), (a2, b2) = SHAPES[first.shape](n), SHAPES[second.shape](n)
    latency, per_byte = a2 * second.alpha - a1 * first.alpha, b1 * first.beta - b2 * second.beta
    if per_byte == 0 or latency / per_byte <= 0:
        return None
    return latency / per_byte


def network_fits(alpha: float, bandwidth: float) -> dict[str, Fit]:
    return {name: Fit(name, alpha, 1 / bandwidth, 0, 0.0, 0.0) for name in PREDICTED}


def fits_of(rows: list[dict]) -> dict[tuple[str, str], Fit]:
    """One fit per (backend, algorithm) of the float32 rows, over every world size measured."""
    groups: dict[tuple[str, str], list] = {}
    for row in rows:
        if row["dtype"] == "float32":
            groups.setdefault((row["backend"], row["algorithm"]), []).append(row)
    out = {}
    for (backend, algorithm), mine in groups.items():
        shape = algorithm if algorithm in SHAPES else NATIVE_SHAPE.get(backend, "ring")
        out[backend, algorithm] = fit(shape, [(r["ranks"], r["bytes"], r["time_us"] * 1e-6) for r in mine])
    return out


def scaling(rows: list[dict], fits: dict, sizes: list[int]) -> list[dict]:
    """Measured time at the largest world size over the smallest, against the model's ratio, at the given sizes."""
    out = []
    for (backend, algorithm), f in fits.items():
        mine = [r for r in rows if (r["backend"], r["algorithm"], r["dtype"]) == (backend, algorithm, "float32")]
        ranks = sorted({r["ranks"] for r in mine})
        if len(ranks) < 2:
            continue
        lo, hi = ranks[0], ranks[-1]
        measured = {(r["ranks"], r["bytes"]): r["time_us"] for r in mine}
        for nbytes in [s for s in sizes if (lo, s) in measured and (hi, s) in measured]:
            t = {n: measured[n, nbytes] for n in (lo, hi)}
            row = {"backend": backend, "algorithm": algorithm, "size": human_bytes(nbytes), "ranks": f"{lo}->{hi}"}
            out.append(row | {"measured": t[hi] / t[lo], "model": f.time(hi, nbytes) / f.time(lo, nbytes)})
    return out


def predictions(fits: dict[str, Fit], ranks: list[int], sizes: list[int]) -> tuple[list[dict], list[str]]:
    """Predicted milliseconds per algorithm and size at each world size, and where one algorithm overtakes another."""
    table, notes = [], []
    for n in ranks:
        table += [
            {"ranks": n, "algorithm": name} | {human_bytes(s): f.time(n, s) * 1e3 for s in sizes}
            for name, f in fits.items()
        ]
        names, found = list(fits), []
        for i, first in enumerate(names):
            for second in names[i + 1 :]:
                at = crossover(fits[first], fits[second], n)
                if at is None or not 1 <= at <= 1 << 40:
                    continue
                below = fits[first].time(n, at / 2) < fits[second].time(n, at / 2)
                small, large = (first, second) if below else (second, first)
                found.append(f"{small} beats {large} below {_approx(at)}")
        notes.append(f"  {n} ranks: " + ("; ".join(found) or "no crossovers: one algorithm is fastest at every size"))
    return table, notes


def print_predictions(title: str, fits: dict[str, Fit], ranks: list[int], sizes: list[int]) -> None:
    table, notes = predictions(fits, ranks, sizes)
    print_table(title, table, {"ranks": "d", "algorithm": ""} | {human_bytes(s): ".3f" for s in sizes})
    print("\n".join(notes))


def _approx(nbytes: float) -> str:
    """A byte count to three digits in the largest binary unit below it: 98304.0 -> '96.0K'."""
    for unit, scale in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.3g}{unit}"
    return f"{nbytes:.3g}B"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", type=Path, nargs="+", help="JSON files written by benchmarks.allreduce --json")
    parser.add_argument("--ranks", type=int, nargs="+", default=[8, 64, 512, 4096], help="world sizes to predict")
    parser.add_argument(
        "--sizes", type=parse_bytes, nargs="+", default=[4 << 10, 1 << 20, 64 << 20, 256 << 20, 1 << 30]
    )
    args = parser.parse_args(argv)
    runs = [json.loads(path.read_text()) for path in args.results]
    rows = [row for run in runs for row in run["rows"]]
    crowded = [f"{run['ranks']} ranks on {run['machine']['cores']} cores" for run in runs if run.get("oversubscribed")]
    if crowded:
        print(
            f"note: {', '.join(crowded)}: oversubscribed; the model gives each rank a core, so expect such runs slower"
        )
    fits = fits_of(rows)
    table = [
        {
            "backend": b,
            "algorithm": a,
            "shape": f.shape,
            "alpha_us": f.alpha * 1e6,
            "gbps": 1e-9 / f.beta if f.beta else None,
        }
        | {"points": f.points, "median_err": f.median_error, "max_err": f.max_error}
        for (b, a), f in fits.items()
    ]
    columns = {"backend": "", "algorithm": "", "shape": "", "alpha_us": ".2f", "gbps": ".2f", "points": "d"}
    print_table(
        "fitted per algorithm (errors are |predicted/measured - 1| on its own points)",
        table,
        columns | {"median_err": ".2f", "max_err": ".2f"},
    )
    print_table(
        "time at the largest world size over the smallest: measured, and the model's",
        scaling(rows, fits, args.sizes),
        {"backend": "", "algorithm": "", "size": "", "ranks": "", "measured": ".2f", "model": ".2f"},
    )
    for name, (alpha, bandwidth) in NETWORKS.items():
        title = f"predicted ms on {name}: alpha {alpha * 1e6:g} us, {bandwidth / 1e9:g} GB/s"
        print_predictions(title, network_fits(alpha, bandwidth), args.ranks, args.sizes)
    for backend in dict.fromkeys(b for b, _ in fits):
        here = {a: f for (b, a), f in fits.items() if b == backend and a in ("naive", "ring")}
        title = f"predicted ms with the {backend} figures fitted on this host (as if more ranks had them)"
        print_predictions(title, here, args.ranks, args.sizes)


if __name__ == "__main__":
    main()
