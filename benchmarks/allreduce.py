"""How fast is each allreduce? Every algorithm on every backend that runs here, timed like nccl-tests, checked.

    python -m launch -n 4 -- python -m benchmarks.allreduce [--max-size 1G] [--dtypes float32 bfloat16]
        [--verify off fingerprint] [--rounds 5] [--json FILE] [--plot FILE.png]

Under mpirun the MPI communicator and a gloo one (met through MPI) run side by side in one process, so both are
measured in the same run; under torchrun, gloo or NCCL alone. Calls are separated by a barrier, each checked
against the exact sum; a call's time is the slowest rank's. Columns as nccl-tests: algbw = bytes / time, busbw =
algbw * 2(n-1)/n. vs_peer: the backend library's own allreduce called directly (mpi4py's Allreduce,
torch.distributed.all_reduce), its time over this row's; of_copy: busbw over this host's memory-copy bandwidth.
--verify measures each algorithm under each check of the ranks' calls (distrib.comm.verify.MODES; default: the
one DISTRIB_VERIFY sets), the checks taking turns call by call, --rounds times, each round measuring every subject
once, in alternating order; vs_off is then the median, over every pair of calls made moments apart (one with the
check, one without), of their ratio, and check_us the median of their difference: what the check costs a call.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

import distrib
from benchmarks.common import human_bytes, machine, parse_bytes, print_table, save_figure, subplots
from distrib.comm.topology import place
from distrib.comm.verify import MODES
from distrib.env import read_world

PEER = "peer"  # the algorithm name of the library's own allreduce, called without distrib
DTYPES = {name: getattr(torch, name) for name in ("float32", "float64", "float16", "bfloat16", "int32", "int64")}
COPY_BYTES = 64 << 20  # far past any cache, so copies run at memory speed
COLUMNS = {"backend": "", "algorithm": "", "verify": "", "size": "", "count": "d", "dtype": "", "time_us": ".1f"}
COLUMNS |= {"min_us": ".1f", "max_us": ".1f", "algbw_gbps": ".2f", "busbw_gbps": ".2f", "vs_peer": ".2f"}
COLUMNS |= {"of_copy": ".2f", "vs_off": ".3f", "check_us": ".1f"}

COLORS = {PEER: "black", "naive": "tab:blue", "ring": "tab:orange", "native": "tab:green", "shm": "tab:red"}
COLORS |= {"halving_doubling": "tab:purple", "hierarchical": "tab:brown", "auto": "tab:gray"}
LINES = {"mpi": "-", "gloo": "--", "nccl": "-."}  # plots: a color per algorithm, a line style per backend

Call = Callable[[torch.Tensor], object]


def communicators(backends: list[str]) -> dict[str, distrib.Communicator]:
    """distrib.init()'s communicator first, then a torch.distributed one beside it when mpirun started us."""
    main = distrib.init()
    comms = {main.backend: main}
    for backend in backends:
        if backend in comms:
            continue
        if main.backend != "mpi" or backend not in ("gloo", "nccl") or len(comms) > 1:
            raise SystemExit(
                f"backend {backend!r} cannot run beside {', '.join(comms)}: under mpirun add gloo or nccl (one of "
                f"them), under torchrun there is only the launcher's backend"
            )
        from distrib.comm.torch_dist import TorchCommunicator, rendezvous

        local_rank = read_world().local_rank
        comms[backend] = TorchCommunicator(backend, main.rank, main.size, store=rendezvous(main), local_rank=local_rank)
    return comms


def peer(comm: distrib.Communicator, dtype: torch.dtype) -> Call | None:
    """The backend library's own allreduce, called directly (None where it has no such dtype, or no library)."""
    if comm.backend == "local":
        return None
    if comm.backend == "mpi":
        if dtype in (torch.float16, torch.bfloat16):
            return None  # MPI has no 16-bit float types
        from mpi4py import MPI

        return lambda t: MPI.COMM_WORLD.Allreduce(MPI.IN_PLACE, t.numpy())
    import torch.distributed as dist

    return lambda t: dist.all_reduce(t)


def subjects(
    comms: dict, backends: list[str], algorithms: list[str], checks: list[str], dtype: torch.dtype
) -> dict[tuple, Call]:
    """(backend, algorithm, check) -> a call that reduces a tensor in place, for every one that runs here (the
    peer's check is "-": distrib checks nothing there)."""
    calls: dict[tuple, Call] = {}
    for backend in backends:
        comm = comms[backend]
        if (call := peer(comm, dtype)) is not None:
            calls[backend, PEER, "-"] = call
        for algorithm in algorithms:
            try:
                comm.check_algorithm(algorithm)
            except ValueError:
                continue  # e.g. shm on gloo: not an algorithm this backend has
            for check in checks:
                calls[backend, algorithm, check] = lambda t, c=comm, a=algorithm: c.allreduce(t, algorithm=a)
    return calls


def barrier(comm: distrib.Communicator) -> Callable[[], object]:
    """The barrier between a backend's timed calls. MPI's own spins: distrib's waits give the core away after a
    while, and on a busy host a rank that gave it away just before a timed call starts that late. The others
    block: a spinning barrier would take the core from the library's own threads (gloo's I/O)."""
    if comm.backend == "mpi":
        from mpi4py import MPI

        return MPI.COMM_WORLD.Barrier
    return comm.barrier


def device_of(backend: str) -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def slowest(main: distrib.Communicator, times: dict) -> dict:
    """Each timed call's time on the slowest rank."""
    everyone = main.allgather_object(times)
    return {key: [max(call) for call in zip(*(ranks[key] for ranks in everyone))] for key in times}


def copy_bandwidth(main: distrib.Communicator, device: torch.device, ranks: int, repeats: int = 5) -> float:
    """GB/s of memory read plus written while ranks 0 .. ranks-1 each copy COPY_BYTES at once (the others wait)."""
    src = torch.ones(COPY_BYTES // 4, device=device)
    dst = src.clone()
    times, wait = [], barrier(main)
    for _ in range(repeats):
        wait()
        start = time.perf_counter()
        if main.rank < ranks:
            dst.copy_(src)
            sync(device)
        times.append(time.perf_counter() - start)
    return ranks * 2 * COPY_BYTES / statistics.median(slowest(main, {"copy": times})["copy"]) / 1e9


def measure(comms: dict, calls: dict, nbytes: int, dtype: torch.dtype, warmup: int, iters: int) -> dict[tuple, list]:
    """Seconds per call of every subject on the slowest rank.

    Each algorithm makes its warm-up and timed calls in a row, as an application calling one allreduce does:
    interleaved call by call, one algorithm's buffers evict another's (shm ran 3x slower after ring and MPI
    calls than in a row on its own). The checks of one algorithm (--verify) take turns call by call, in alternating
    order, on the same buffers: their ratio then compares calls made moments apart (gloo's times drift by 10-20%
    between runs of the same call here, which subjects measured one after the other took for the check's cost).
    """
    main = next(iter(comms.values()))
    n, rank, count = main.size, main.rank, nbytes // dtype.itemsize
    total = n * (n + 1) // 2  # rank r contributes (r+1) * pattern, small integers every dtype sums exactly
    exact = 3 * total <= (2 / torch.finfo(dtype).eps if dtype.is_floating_point else torch.iinfo(dtype).max)
    data = {}
    for device in {device_of(backend) for backend, _, _ in calls}:
        pattern = (torch.arange(count, device=device) % 3 + 1).to(dtype)
        data[device] = (pattern, pattern * total, torch.empty_like(pattern))
    times: dict[tuple, list] = {key: [] for key in calls}
    groups: dict[tuple, list[str]] = {}  # (backend, algorithm) -> its checks, in the order given
    for backend, algorithm, check in calls:
        groups.setdefault((backend, algorithm), []).append(check)
    for (backend, algorithm), checks in groups.items():
        device = device_of(backend)
        pattern, expected, t = data[device]
        for i in range(warmup + iters):
            for check in checks if i % 2 == 0 else reversed(checks):
                if check != "-":
                    comms[backend].verify = check  # on every rank: subjects run in the same order everywhere
                torch.mul(pattern, rank + 1, out=t)
                sync(device)
                barrier(comms[backend])()
                start = time.perf_counter()
                calls[backend, algorithm, check](t)
                sync(device)
                elapsed = time.perf_counter() - start
                ok = torch.equal(t, expected) if exact else torch.allclose(t, expected, rtol=n * torch.finfo(dtype).eps)
                if not ok:
                    wrong = int((t != expected).nonzero()[0])
                    raise RuntimeError(
                        f"{backend} {algorithm} allreduce of {count} {dtype} is wrong on rank {rank}: element "
                        f"{wrong} is {t[wrong].item()}, expected {expected[wrong].item()}"
                    )
                if i >= warmup:
                    times[backend, algorithm, check].append(elapsed)
    return slowest(main, times)


def rows(
    rounds: list[dict[tuple, list]], nbytes: int, dtype: torch.dtype, n: int, hosts: int, limits: dict
) -> list[dict]:
    """One row per subject, over every round: nccl-tests' columns, the ratio to its backend's peer, to the copy
    bandwidth, and (vs_off, check_us) to the same algorithm without the check, call by call (see the module's text)."""
    out = []
    for key in rounds[0]:
        backend, algorithm, check = key
        seconds = [s for times in rounds for s in times[key]]
        median = statistics.median(seconds)
        algbw = nbytes / median / 1e9
        busbw = algbw * 2 * (n - 1) / n
        row = {"backend": backend, "algorithm": algorithm, "verify": check, "ranks": n, "hosts": hosts}
        row |= {
            "bytes": nbytes,
            "size": human_bytes(nbytes),
            "count": nbytes // dtype.itemsize,
            "dtype": str(dtype).removeprefix("torch."),
        }
        row |= {"time_us": median * 1e6, "min_us": min(seconds) * 1e6, "max_us": max(seconds) * 1e6}
        row |= {"calls": len(seconds), "algbw_gbps": algbw, "busbw_gbps": busbw}
        row["of_copy"] = busbw / limits[device_of(backend).type]
        if (peer_key := (backend, PEER, "-")) in rounds[0]:
            row["vs_peer"] = statistics.median(s for times in rounds for s in times[peer_key]) / median
        if check not in ("-", "off") and (off := (backend, algorithm, "off")) in rounds[0]:
            pairs = [(on, plain) for times in rounds for on, plain in zip(times[key], times[off])]
            row["vs_off"] = statistics.median(on / plain for on, plain in pairs)
            row["check_us"] = statistics.median(on - plain for on, plain in pairs) * 1e6
            row["vs_off_rounds"] = [statistics.median(times[key]) / statistics.median(times[off]) for times in rounds]
        out.append(row)
    return out


def plot(rows: list[dict], limits: dict[str, float], title: str, path: Path) -> None:
    """busbw against size, one line per backend and algorithm, log-log, with the copy bandwidth drawn across; with
    --verify, a second panel: each algorithm's time with the check over its time without (vs_off)."""
    checked = [r for r in rows if "vs_off" in r]
    fig, axes = subplots(1, 2 if checked else 1, figsize=(15 if checked else 9, 5.5), squeeze=False)
    ax, sizes = axes[0][0], sorted({r["bytes"] for r in rows})
    for dtype in dict.fromkeys(r["dtype"] for r in rows):
        for subject in dict.fromkeys((r["backend"], r["algorithm"], r["verify"]) for r in rows):
            mine = [r for r in rows if (r["backend"], r["algorithm"], r["verify"], r["dtype"]) == (*subject, dtype)]
            backend, algorithm, check = subject
            label = f"{backend} {algorithm}" + (f" {dtype}" if dtype != "float32" else "")
            label += f" (check {check})" if check not in ("-", MODES[0]) else ""
            style = {"color": COLORS[algorithm], "linestyle": LINES.get(backend, ":"), "marker": "o", "label": label}
            style["alpha"] = 0.4 if check == "off" else 1.0
            ax.loglog([r["bytes"] for r in mine], [r["busbw_gbps"] for r in mine], **style)
    for device, gbps in limits.items():
        ax.axhline(gbps, linestyle="--", color="gray", label=f"{device} memory copy (read+write)")
    ax.set_xticks(sizes, [human_bytes(s) for s in sizes])
    ax.set(xlabel="bytes per rank", ylabel="busbw (GB/s), median", title=title)
    ax.legend(fontsize=7, loc="best")
    ax.grid(True, which="both", alpha=0.3)
    if checked:
        ax = axes[0][1]
        for subject in dict.fromkeys((r["backend"], r["algorithm"], r["verify"], r["dtype"]) for r in checked):
            mine = [r for r in checked if (r["backend"], r["algorithm"], r["verify"], r["dtype"]) == subject]
            style = {"color": COLORS[subject[1]], "linestyle": LINES.get(subject[0], ":"), "marker": "o"}
            ax.semilogx([r["bytes"] for r in mine], [r["vs_off"] for r in mine], label=" ".join(subject[:3]), **style)
        ax.axhline(1.03, linestyle="--", color="gray", label="+3%")
        ax.axhline(1.0, color="black", linewidth=0.5)
        ax.set_xticks(sizes, [human_bytes(s) for s in sizes])
        ax.set(xlabel="bytes per rank", ylabel="time with the check / without (median over pairs of calls)")
        ax.set_title("what checking every call costs")
        ax.legend(fontsize=7, loc="best")
        ax.grid(True, which="both", alpha=0.3)
    save_figure(fig, path)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=parse_bytes, nargs="+", help="bytes per rank (default: 4K, 16K ... max)")
    parser.add_argument("--max-size", type=parse_bytes, default=256 << 20, help="largest of the default sizes")
    parser.add_argument("--dtypes", nargs="+", choices=DTYPES, default=["float32"])
    parser.add_argument("--backends", nargs="+", help="default: the launcher's, plus gloo (nccl on GPUs) under mpirun")
    parser.add_argument("--algorithms", nargs="+", choices=distrib.ALGORITHMS, default=list(distrib.ALGORITHMS))
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls per subject and size")
    parser.add_argument("--iters", type=int, default=10, help="timed calls (more for small sizes, up to 20x)")
    parser.add_argument("--verify", nargs="+", choices=MODES, help="the checks of the ranks' calls to compare")
    parser.add_argument("--rounds", type=int, default=1, help="times every subject is measured, in alternating order")
    parser.add_argument("--json", type=Path, help="write every row and the settings here")
    parser.add_argument("--plot", type=Path, help="draw busbw against size here (PNG)")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    if args.warmup < 1 or args.iters < 1 or args.rounds < 1:
        raise SystemExit(
            f"--warmup, --iters and --rounds must be at least 1, got {args.warmup}, {args.iters} and {args.rounds}"
        )
    sizes = args.sizes or [4 << (2 * k) << 10 for k in range(16) if 4 << (2 * k) << 10 <= args.max_size]
    world = read_world()
    backends = args.backends or (["mpi", "nccl" if torch.cuda.is_available() else "gloo"] if world.is_mpi else [])
    comms = communicators(backends)
    main = next(iter(comms.values()))
    backends = backends or [main.backend]
    n, info = main.size, machine()
    hosts = main.allgather_object(place())  # hostname and network namespace: a namespace host counts as one
    local = hosts.count(hosts[main.rank])
    if "OMP_NUM_THREADS" not in os.environ:  # ranks on one host share its cores
        torch.set_num_threads(max(1, info["cores"] // local))
    info["threads"] = torch.get_num_threads()
    if "mpi" in comms:
        from mpi4py import MPI

        info["mpi"] = " ".join(MPI.Get_library_version().split()[:3])  # e.g. "MPICH Version: 5.0.2"
    limits = {"cpu": copy_bandwidth(main, torch.device("cpu"), local)}
    alone = copy_bandwidth(main, torch.device("cpu"), 1)
    if "nccl" in backends:
        limits["cuda"] = copy_bandwidth(main, device_of("nccl"), n)
    say = print if main.rank == 0 else (lambda *a, **k: None)
    stamp = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    command = shlex.join(["python", "-m", "benchmarks.allreduce", *(sys.argv[1:] if argv is None else argv)])
    say(f"allreduce benchmark {stamp}: {n} ranks on {len(set(hosts))} host(s); {info['cpu']}, {info['cores']} cores")
    say(f"  torch {info['torch']}, {info['threads']} thread(s) per rank; {info.get('mpi') or 'no MPI'}")
    say(
        f"  memory copy (of_copy's limit): {limits['cpu']:.1f} GB/s read+written by {local} ranks copying at once, "
        f"{alone:.1f} GB/s by one rank alone"
    )
    say(f"  {PEER}: each library's own allreduce called directly (mpi4py Allreduce, torch.distributed.all_reduce)")
    oversubscribed = local > info["cores"]
    if oversubscribed:
        say(f"  note: {local} ranks on {info['cores']} cores is oversubscribed: ranks take turns on the cores")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    if load is not None:
        say(f"  load average at start: {load:.1f} (runnable processes; above the core count, others share the cores)")
    table = []
    for name in args.dtypes:
        dtype = DTYPES[name]
        calls = subjects(comms, backends, args.algorithms, args.verify or [main.verify], dtype)
        for nbytes in sizes:
            if nbytes < dtype.itemsize:
                continue
            iters = max(args.iters, min(20 * args.iters, (16 << 20) // nbytes))
            rounds = []
            for r in range(args.rounds):  # alternating order, so that drifting load falls on every subject alike
                order = dict(calls.items() if r % 2 == 0 else reversed(calls.items()))
                rounds.append(measure(comms, order, nbytes, dtype, args.warmup, iters))
            size_rows = rows(rounds, nbytes, dtype, n, len(set(hosts)), limits)
            if main.rank == 0:
                print_table(f"{human_bytes(nbytes)} {name}, {args.rounds} x {iters} timed calls", size_rows, COLUMNS)
            table += size_rows
    order = [PEER, *distrib.ALGORITHMS]
    checks = ["-", *MODES]
    table.sort(
        key=lambda r: (
            r["dtype"],
            backends.index(r["backend"]),
            order.index(r["algorithm"]),
            checks.index(r["verify"]),
            r["bytes"],
        )
    )
    if main.rank != 0:
        return
    print_table(f"all rows, {n} ranks (times in us, bandwidths in GB/s)", table, COLUMNS)
    result = {"date": stamp, "command": command, "ranks": n, "hosts": len(set(hosts)), "machine": info}
    result |= {"copy_gbps": limits, "copy_one_rank_gbps": alone, "oversubscribed": oversubscribed}
    result |= {"load_average": {"start": load, "end": os.getloadavg()[0] if load is not None else None}}
    result |= {"settings": {"warmup": args.warmup, "iters": args.iters, "rounds": args.rounds, "sizes": sizes}}
    result["rows"] = table
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.json}")
    if args.plot:
        plot(
            table, limits, f"allreduce busbw, {n} ranks, {info['cpu']} ({info['cores']} cores), {stamp[:10]}", args.plot
        )
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
