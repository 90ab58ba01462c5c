"""The alpha-beta cost model of allreduce (distrib/comm/auto.py's), fitted to measured rows, checked on rows left out
of the fit, and extrapolated to 4096 ranks.

    python -m benchmarks.model benchmarks/results/shaped_allreduce.json [--hold-out-sizes 16K 256K 4M]
        [--hold-out-layouts 3x1 2x2] [--save FILE] [--json FILE] [--plot FILE.png]

Each algorithm gets one (alpha, beta) per link: "intra" from the runs on one host, then "inter" from the runs
across hosts with the intra figures held fixed, each fitted to the relative error (a 4 KiB call counts as much as
a 16 MiB one), absolute rather than squared so that the few runs a busy machine slowed down do not pull the line,
and kept non-negative. The schedules' counts come from distrib.comm.auto.shape, so the figures mean what
algorithm="auto" reads. Rows of the held-out sizes and layouts are not fitted: their error says how well
the model predicts what it has not seen. --save writes the figures as DISTRIB_COST_MODEL reads them.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import numpy as np

from benchmarks.common import human_bytes, parse_bytes, print_table, save_figure, subplots
from distrib.comm import auto

SKIP = ("peer", "auto")  # the library called directly, and a pick among the others: not algorithms to fit
EXTRAPOLATE = [8, 64, 512, 4096]  # ranks, in hosts of PER_HOST
PER_HOST = 8
SIZES = [4 << 10, 64 << 10, 1 << 20, 16 << 20, 256 << 20, 1 << 30]


def layout(row: dict) -> tuple[int, int]:
    """(hosts, ranks per host) of a row; rows of a one-host benchmark have no "hosts"."""
    hosts = row.get("hosts", 1)
    return hosts, row["ranks"] // hosts


def name(row: dict) -> str:
    hosts, per_host = layout(row)
    return f"{hosts}x{per_host}"


def _fit_pair(design: np.ndarray, target: np.ndarray, measured: np.ndarray) -> tuple[float, float]:
    """(alpha, beta), both >= 0, minimising the sum of |design @ (alpha, beta) - target| / measured: the relative
    error of the whole prediction when `target` is what is left of `measured` once the fixed part is taken off.

    Absolute, not squared, errors (iteratively reweighted least squares): on a shared machine a few points run
    several times slower than the rest, and squares would let them pull the line; the median error is the goal.
    """
    weighted, rhs = design / measured[:, None], target / measured
    weights = np.ones(len(rhs))
    for _ in range(50):
        coef = _nonnegative(weighted * weights[:, None], rhs * weights)
        weights = 1 / np.sqrt(np.maximum(np.abs(weighted @ coef - rhs), 1e-4))
    return float(coef[0]), float(coef[1])


def _nonnegative(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Least squares of a @ x = b with x >= 0, for two unknowns: where the free fit goes negative, the other alone."""
    coef = np.linalg.lstsq(a, b, rcond=None)[0]
    if (coef < 0).any():
        keep = int(np.argmax(coef))
        coef = np.zeros(2)
        coef[keep] = max(np.linalg.lstsq(a[:, [keep]], b, rcond=None)[0][0], 0.0)
    return coef


def fit(rows: list[dict], backend: str = "mpi") -> dict:
    """{algorithm: {"intra": {"alpha", "beta"}, "inter": {...}}} from float32 rows of measured times."""
    model: dict = {}
    for algorithm in sorted({r["algorithm"] for r in rows} - set(SKIP)):
        mine = [r for r in rows if r["algorithm"] == algorithm]
        pairs = {}
        for link, here in (
            ("intra", [r for r in mine if layout(r)[0] == 1]),
            ("inter", [r for r in mine if layout(r)[0] > 1]),
        ):
            if not here:
                continue
            shapes = [auto.shape(algorithm, *layout(r), backend) for r in here]
            measured = np.array([r["time_us"] * 1e-6 for r in here])
            target = measured
            if link == "inter" and "intra" in pairs:  # what the host's own part takes, as fitted on one host
                target = measured - [
                    auto.Shape(s.a_intra, s.b_intra).time(pairs, r["bytes"]) for s, r in zip(shapes, here)
                ]
            a = [s.a_intra if link == "intra" else s.a_inter for s in shapes]
            b = [(s.b_intra if link == "intra" else s.b_inter) * r["bytes"] for s, r in zip(shapes, here)]
            if not any(a) and not any(b):
                continue
            alpha, beta = _fit_pair(np.array([a, b]).T, target, measured)
            pairs[link] = {"alpha": alpha, "beta": beta}
        if pairs:
            model[algorithm] = pairs
    return model


def errors(model: dict, rows: list[dict], backend: str = "mpi") -> list[dict]:
    """Each row's measured and predicted time and |predicted / measured - 1| (rows the model cannot predict: none)."""
    out = []
    for r in rows:
        if r["algorithm"] in SKIP:
            continue
        predicted = auto.predict(model, r["algorithm"], r["bytes"], *layout(r), backend)
        if predicted is None:
            continue
        measured = r["time_us"] * 1e-6
        hosts, per_host = layout(r)
        out.append({"layout": f"{hosts}x{per_host}", "algorithm": r["algorithm"], "size": human_bytes(r["bytes"])}
                   | {"bytes": r["bytes"], "measured_us": measured * 1e6, "predicted_us": predicted * 1e6,
                      "error": abs(predicted / measured - 1)})  # fmt: skip
    return out


def summary(errs: list[dict]) -> list[dict]:
    """Median and largest error per algorithm, and over all."""
    groups = {a: [e["error"] for e in errs if e["algorithm"] == a] for a in dict.fromkeys(e["algorithm"] for e in errs)}
    groups["all"] = [e["error"] for e in errs]
    return [{"algorithm": a, "points": len(v), "median_err": statistics.median(v), "max_err": max(v)}
            for a, v in groups.items() if v]  # fmt: skip


def extrapolate(model: dict, ranks: list[int], sizes: list[int], per_host: int = PER_HOST) -> dict:
    """Predicted ms per algorithm at each world size (hosts of `per_host`), the crossovers, and auto's choices."""
    table, crossovers, choices = [], [], []
    for n in ranks:
        hosts, local = max(1, n // per_host), min(n, per_host)
        names = [a for a in auto.options(hosts, local, shm=True) if auto.predict(model, a, 1, hosts, local) is not None]
        for a in names:
            table.append(
                {"ranks": n, "algorithm": a}
                | {human_bytes(s): auto.predict(model, a, s, hosts, local) * 1e3 for s in sizes}
            )
        lines = {a: (auto.predict(model, a, 0, hosts, local), auto.predict(model, a, 1, hosts, local)) for a in names}
        for i, first in enumerate(names):
            for second in names[i + 1 :]:
                (c1, d1), (c2, d2) = lines[first], lines[second]
                slope1, slope2 = d1 - c1, d2 - c2
                if slope1 != slope2 and 1 <= (at := (c2 - c1) / (slope1 - slope2)) <= 1 << 40:
                    small, large = (first, second) if c1 < c2 else (second, first)
                    crossovers.append({"ranks": n, "below": small, "above": large, "bytes": at, "size": _approx(at)})
        choices.append(
            {"ranks": n} | {human_bytes(s): auto.fastest(model, names, s, hosts, local, "mpi") for s in sizes}
        )
    return {"predicted_ms": table, "crossovers": crossovers, "auto": choices}


def _approx(nbytes: float) -> str:
    """A byte count to three digits in the largest binary unit below it: 98304.0 -> '96K'."""
    for unit, scale in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.3g}{unit}"
    return f"{nbytes:.3g}B"


def plot(errs: list[dict], held: set[tuple], title: str, path: Path) -> None:
    """Predicted against measured, log-log: hollow the fitted points, filled the held-out ones, the ±20% band."""
    from benchmarks.allreduce import COLORS

    fig, ax = subplots(figsize=(6.5, 6))
    for algorithm in dict.fromkeys(e["algorithm"] for e in errs):
        for kind in ("fitted", "held out"):
            pts = [
                e
                for e in errs
                if e["algorithm"] == algorithm and ((e["layout"], e["bytes"]) in held) == (kind == "held out")
            ]
            if pts:
                color = COLORS.get(algorithm, "black")
                face = color if kind == "held out" else "none"
                ax.scatter([e["measured_us"] for e in pts], [e["predicted_us"] for e in pts], s=22, edgecolors=color,
                           facecolors=face, label=f"{algorithm} ({kind})")  # fmt: skip
    low = min(e["measured_us"] for e in errs) / 2
    high = max(e["measured_us"] for e in errs) * 2
    for factor, style in ((1.0, "-"), (1.2, ":"), (0.8, ":")):
        ax.plot([low, high], [low * factor, high * factor], style, color="gray", linewidth=1)
    ax.set(xscale="log", yscale="log", xlabel="measured (us, median)", ylabel="predicted (us)", title=title)
    ax.legend(fontsize=7, ncol=2)
    ax.grid(True, which="both", alpha=0.3)
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", type=Path, nargs="+", help="JSON of benchmarks.shaped or benchmarks.allreduce")
    parser.add_argument("--hold-out-sizes", type=parse_bytes, nargs="*", default=[16 << 10, 256 << 10, 4 << 20])
    parser.add_argument("--hold-out-layouts", nargs="*", default=["3x1", "2x2"], help="HOSTSxRANKS")
    parser.add_argument("--ranks", type=int, nargs="+", default=EXTRAPOLATE, help="world sizes to extrapolate to")
    parser.add_argument("--sizes", type=parse_bytes, nargs="+", default=SIZES)
    parser.add_argument("--save", type=Path, help="write the fitted figures here, as DISTRIB_COST_MODEL reads them")
    parser.add_argument("--json", type=Path, help="write every table here")
    parser.add_argument("--plot", type=Path, help="draw predicted against measured here (PNG)")
    args = parser.parse_args(argv)
    runs = [json.loads(path.read_text()) for path in args.results]
    rows = [r for run in runs for r in run["rows"] if r.get("dtype", "float32") == "float32" and r["backend"] == "mpi"]
    held = {
        (name(r), r["bytes"]) for r in rows if name(r) in args.hold_out_layouts or r["bytes"] in args.hold_out_sizes
    }
    fitted = [r for r in rows if (name(r), r["bytes"]) not in held]
    model = fit(fitted)
    figures = [
        {"algorithm": a, "link": link, "alpha_us": p["alpha"] * 1e6, "gbps": 1e-9 / p["beta"] if p["beta"] else None}
        for a, links in model.items()
        for link, p in links.items()
    ]
    print_table("fitted per algorithm and link (alpha: per message; bandwidth: 1/beta)", figures,
                {"algorithm": "", "link": "", "alpha_us": ".1f", "gbps": ".3f"})  # fmt: skip
    errs = errors(model, rows)
    out_of_fit = [e for e in errs if (e["layout"], e["bytes"]) in held]
    columns = {"algorithm": "", "points": "d", "median_err": ".3f", "max_err": ".3f"}
    print_table(
        "error on the fitted points", summary([e for e in errs if (e["layout"], e["bytes"]) not in held]), columns
    )
    print_table("error on the held-out points (sizes and layouts not fitted)", summary(out_of_fit), columns)
    print_table("held-out points", out_of_fit, {"layout": "", "algorithm": "", "size": "", "measured_us": ".0f",
                                                 "predicted_us": ".0f", "error": ".3f"})  # fmt: skip
    ahead = extrapolate(model, args.ranks, args.sizes)
    print_table(f"predicted ms, hosts of {PER_HOST} (extrapolated)", ahead["predicted_ms"],
                {"ranks": "d", "algorithm": ""} | {human_bytes(s): ".3f" for s in args.sizes})  # fmt: skip
    print_table(
        "crossovers: `below` is faster under `size`",
        ahead["crossovers"],
        {"ranks": "d", "below": "", "above": "", "size": ""},
    )
    print_table("what auto would choose", ahead["auto"], {"ranks": "d"} | {human_bytes(s): "" for s in args.sizes})
    link = runs[0].get("link", {}).get("describe", "one host")
    sizes = sorted({r["bytes"] for r in rows})
    choices = {
        f"{hosts}x{local}": {str(s): auto.fastest(model, auto.options(hosts, local, shm=True), s, hosts, local, "mpi")
                             for s in sizes}
        for hosts, local in sorted({layout(r) for r in rows})
    }  # fmt: skip
    saved = {"format": 1, "link": link, "fitted_from": [str(p) for p in args.results], "algorithms": model}
    if args.save:
        args.save.write_text(json.dumps(saved | {"choices": choices}, indent=1) + "\n")
        print(f"wrote {args.save} (DISTRIB_COST_MODEL={args.save} makes algorithm='auto' use it)")
    if args.json:
        result = saved | {"held_out": {"sizes": args.hold_out_sizes, "layouts": args.hold_out_layouts}}
        result |= {"errors": errs, "held_out_summary": summary(out_of_fit), "extrapolation": ahead, "choices": choices}
        args.json.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.json}")
    if args.plot:
        plot(errs, held, f"allreduce time, predicted against measured ({link})", args.plot)
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
