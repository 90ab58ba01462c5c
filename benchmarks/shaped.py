"""Allreduce between hosts on shaped links: benchmarks.allreduce on namespace hosts (tests/netns.py) whose links run
at a set rate and delay, each layout's run interleaved with the others', repeated; medians over the repeats.

    python -m benchmarks.shaped [--layouts 1x2 2x1 3x1 4x1 2x2] [--gbit 1] [--delay-us 100] [--repeats 3]
        [--sizes 4K 16K ... 16M] [--json FILE] [--plot FILE.png]

A layout HxL is H hosts of L ranks, MPI over TCP between hosts (as between machines; tests/hostjobs.py's
environment). Needs root (network namespaces) and tc; the links are those of tests/netns.py: tbf paces each
host's rate both ways, a relay adds the delay. Columns as nccl-tests, from the median time; spread: the slowest
repeat's median over the fastest's; vs_peer: MPI_Allreduce's time over this row's, in the same runs.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

from benchmarks.common import RESULTS, human_bytes, machine, parse_bytes, print_table, save_figure, subplots
from tests import netns
from tests.hostjobs import finish, job_env, start

ALGORITHMS = ["naive", "ring", "native", "halving_doubling", "hierarchical", "shm"]
COLUMNS = {"layout": "", "algorithm": "", "size": "", "time_us": ".1f", "algbw_gbps": ".3f", "busbw_gbps": ".3f"}
COLUMNS |= {"vs_peer": ".2f", "spread": ".2f", "repeats": "d"}
RUN_SECONDS = 900


def parse_layout(text: str) -> tuple[int, int]:
    try:
        hosts, per_host = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a layout is HOSTSxRANKS, e.g. 2x2; got {text!r}") from None
    if hosts < 1 or per_host < 1:
        raise argparse.ArgumentTypeError(f"a layout needs at least 1 host of 1 rank; got {text!r}")
    return hosts, per_host


def run_layout(hosts: int, per_host: int, link: netns.Link, bench: list[str], scratch: Path) -> dict:
    """One run of benchmarks.allreduce on `hosts` shaped hosts of `per_host` ranks; its JSON."""
    out, log = scratch / f"{hosts}x{per_host}.json", scratch / f"{hosts}x{per_host}.log"
    with netns.cluster(hosts, link) as made:
        launch = [sys.executable, "-m", "launch", "-n", str(hosts * per_host), "--hosts", made.hosts_arg(per_host)]
        command = [*made.exec_prefix(0), *launch, "--", "python", "-m", "benchmarks.allreduce", *bench]
        proc = start([*command, "--json", str(out)], job_env(made, DISTRIB_TIMEOUT="120"), log)
        (text,) = finish([proc], [log], RUN_SECONDS)
    if proc.returncode:
        raise SystemExit(f"benchmarks.allreduce failed on {hosts}x{per_host}:\n{text[-4000:]}")
    return json.loads(out.read_text())


def merge(runs: list[dict]) -> list[dict]:
    """One row per layout, algorithm and size: the median over the repeats' medians, nccl-tests columns from it."""
    groups: dict[tuple, list[dict]] = {}
    for run in runs:
        for row in run["rows"]:
            groups.setdefault((run["layout"], row["algorithm"], row["bytes"]), []).append(row)
    out = []
    for (layout, algorithm, nbytes), rows in groups.items():
        seconds = statistics.median(r["time_us"] for r in rows) * 1e-6
        n = rows[0]["ranks"]
        row = {"layout": layout, "hosts": rows[0]["hosts"], "per_host": n // rows[0]["hosts"], "ranks": n}
        row |= {"algorithm": algorithm, "bytes": nbytes, "size": human_bytes(nbytes), "dtype": rows[0]["dtype"]}
        row |= {"time_us": seconds * 1e6, "algbw_gbps": nbytes / seconds / 1e9}
        row |= {"busbw_gbps": nbytes / seconds / 1e9 * 2 * (n - 1) / n, "repeats": len(rows)}
        row |= {"spread": max(r["time_us"] for r in rows) / min(r["time_us"] for r in rows)}
        row |= {"times_us": [r["time_us"] for r in rows], "backend": rows[0]["backend"]}
        peers = [r.get("vs_peer") for r in rows if r.get("vs_peer") is not None]
        row["vs_peer"] = statistics.median(peers) if peers else None
        out.append(row)
    return sorted(out, key=lambda r: (r["hosts"], r["per_host"], r["algorithm"], r["bytes"]))


def plot(rows: list[dict], title: str, path: Path) -> None:
    """busbw against size, a panel per layout, a line per algorithm."""
    from benchmarks.allreduce import COLORS

    layouts = list(dict.fromkeys(r["layout"] for r in rows))
    fig, axes = subplots(1, len(layouts), figsize=(4.2 * len(layouts), 4.2), sharey=True, squeeze=False)
    for ax, layout in zip(axes[0], layouts):
        mine = [r for r in rows if r["layout"] == layout]
        for algorithm in dict.fromkeys(r["algorithm"] for r in mine):
            line = [r for r in mine if r["algorithm"] == algorithm]
            style = {"color": COLORS.get(algorithm, "black"), "marker": "o", "markersize": 3}
            ax.loglog([r["bytes"] for r in line], [r["busbw_gbps"] for r in line], label=algorithm, **style)
        sizes = sorted({r["bytes"] for r in mine})
        ax.set_xticks(sizes, [human_bytes(s) for s in sizes], rotation=45)
        ax.set(title=f"{layout} (hosts x ranks)", xlabel="bytes per rank")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=6)
    axes[0][0].set_ylabel("busbw (GB/s), median")
    fig.suptitle(title, fontsize=10)
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layouts", type=parse_layout, nargs="+", default=[(1, 2), (2, 1), (3, 1), (4, 1), (2, 2)])
    parser.add_argument("--gbit", type=float, default=1.0, help="each host's rate, each way")
    parser.add_argument("--delay-us", type=float, default=100.0, help="one way, between two hosts")
    parser.add_argument("--repeats", type=int, default=3, help="runs of every layout, interleaved")
    parser.add_argument("--sizes", type=parse_bytes, nargs="+", default=[4 << (2 * k) << 10 for k in range(7)])
    parser.add_argument("--algorithms", nargs="+", default=ALGORITHMS)
    parser.add_argument("--iters", type=int, default=6)
    parser.add_argument("--json", type=Path, default=RESULTS / "shaped_allreduce.json")
    parser.add_argument("--plot", type=Path, default=RESULTS / "shaped_allreduce.png")
    args = parser.parse_args(argv)
    if (reason := netns.unavailable(shaped=True)) is not None:
        raise SystemExit(f"shaped hosts cannot be made here: {reason}")
    link = netns.Link(gbit=args.gbit, delay_us=args.delay_us)
    sizes = [human_bytes(s) for s in args.sizes]
    bench = ["--backends", "mpi", "--algorithms", *args.algorithms, "--sizes", *sizes]
    bench += ["--iters", str(args.iters), "--warmup", "1"]
    stamp = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    runs, loads = [], []
    with tempfile.TemporaryDirectory() as scratch:
        for repeat in range(args.repeats):
            order = args.layouts[repeat % len(args.layouts) :] + args.layouts[: repeat % len(args.layouts)]
            for hosts, per_host in order:  # interleaved, each repeat starting one layout later
                load = os.getloadavg()[0]
                result = run_layout(hosts, per_host, link, bench, Path(scratch))
                result["layout"], result["repeat"] = f"{hosts}x{per_host}", repeat
                loads.append({"layout": result["layout"], "repeat": repeat, "start": load, "end": os.getloadavg()[0]})
                print(f"repeat {repeat + 1}/{args.repeats}, {result['layout']}: load {load:.1f}", flush=True)
                runs.append(result)
    rows = merge(runs)
    print_table(f"allreduce on shaped links ({link.describe()}), medians of {args.repeats} runs", rows, COLUMNS)
    result = {"date": stamp, "command": "python -m benchmarks.shaped " + " ".join(argv or sys.argv[1:])}
    result |= {"link": {"gbit": link.gbit, "delay_us": link.delay_us, "mtu": link.mtu, "describe": link.describe()}}
    result |= {"machine": machine(), "load_average": loads, "repeats": args.repeats, "rows": rows}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1) + "\n")
    title = f"allreduce busbw on shaped links, {link.describe()}, {stamp[:10]}"
    plot(rows, title, args.plot)
    print(f"wrote {args.json} and {args.plot}")


if __name__ == "__main__":
    main()
