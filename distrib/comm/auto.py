"""algorithm="auto": for each call, the algorithm an alpha-beta cost model predicts fastest, the same on every rank.

The model (alpha: seconds per message, beta: seconds per byte) has one pair per algorithm and link, "intra"
between ranks of one host and "inter" between hosts. A call of N bytes on H hosts of L ranks costs
    a_intra * alpha_intra + b_intra * N * beta_intra + a_inter * alpha_inter + b_inter * N * beta_inter
where a and b count, along the algorithm's schedule, the steps and the bytes (in units of N) on the busiest link
of each step: a step with any flow between hosts is paced by the busiest host link (the bytes leaving or entering
one host at once), any other by the busiest rank. Ranks are taken to sit on hosts in consecutive runs, as mpirun
--hosts and torchrun place them. Reduce-scatter and allgather are each one half of an allreduce in every algorithm
here, so they take the allreduce's ranking.

The pairs come from the JSON file DISTRIB_COST_MODEL names (written by `python -m benchmarks.model --save FILE`
from measured runs), else from DEFAULT_MODEL. The inputs (size, world, hosts, model file) are the same on every
rank, so every rank picks the same algorithm; the cross-rank check compares the pick too.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

ENV = "DISTRIB_COST_MODEL"
LINKS = ("intra", "inter")
Flows = list[tuple[int, int, float]]  # (source rank, destination rank, bytes in units of the tensor's N)


def _pairs(intra_us: float, intra_gbps: float, inter_us: float, inter_gbps: float) -> dict:
    return {
        "intra": {"alpha": intra_us * 1e-6, "beta": 1e-9 / intra_gbps},
        "inter": {"alpha": inter_us * 1e-6, "beta": 1e-9 / inter_gbps},
    }


# Stated, not measured: a host's memory at 5 GB/s, 25 GbE between hosts (3.1 GB/s, 20 us), and ~15 us of Python
# per message for the algorithms written here. Measure your own with benchmarks.model --save.
DEFAULT_MODEL = {
    "native": _pairs(5, 5, 20, 3.1),
    "naive": _pairs(15, 5, 35, 3.1),
    "ring": _pairs(15, 5, 35, 3.1),
    "halving_doubling": _pairs(15, 5, 35, 3.1),
    "hierarchical": _pairs(15, 5, 35, 3.1),
    "shm": {"intra": {"alpha": 10e-6, "beta": 1e-9 / 10}},
}


@dataclass(frozen=True)
class Shape:
    """What one algorithm's schedule costs on H hosts of L ranks: steps and bytes (in units of N) per link."""

    a_intra: float = 0.0
    b_intra: float = 0.0
    a_inter: float = 0.0
    b_inter: float = 0.0

    def time(self, pairs: dict[str, dict[str, float]], nbytes: float) -> float | None:
        """Predicted seconds for N = nbytes, or None when `pairs` lacks a link this schedule uses."""
        total = 0.0
        for link, a, b in (("intra", self.a_intra, self.b_intra), ("inter", self.a_inter, self.b_inter)):
            if a or b:
                if link not in pairs:
                    return None
                total += a * pairs[link]["alpha"] + b * nbytes * pairs[link]["beta"]
        return total


def _account(steps: Iterable[tuple[int, Flows]], per_host: int) -> Shape:
    """Sum each step's cost: a step that crosses hosts is paced by its busiest host link, others by the busiest rank."""
    a = {"intra": 0.0, "inter": 0.0}
    b = {"intra": 0.0, "inter": 0.0}
    for repeat, flows in steps:
        load: dict[tuple[str, int], float] = {}
        crossing = any(src // per_host != dst // per_host for src, dst, _ in flows)
        for src, dst, part in flows:
            if crossing and src // per_host == dst // per_host:
                continue  # inside a host, beside the slower link: hidden
            ends = [("up", src // per_host), ("down", dst // per_host)] if crossing else [("out", src), ("in", dst)]
            for end in ends:
                load[end] = load.get(end, 0.0) + part
        link = "inter" if crossing else "intra"
        a[link] += repeat
        b[link] += repeat * max(load.values(), default=0.0)
    return Shape(a["intra"], b["intra"], a["inter"], b["inter"])


def _ring(ranks: list[int], part: float, rounds: int) -> list[tuple[int, Flows]]:
    """`rounds` steps around the ring `ranks`, each sending `part` to the next."""
    n = len(ranks)
    return [(rounds, [(ranks[i], ranks[(i + 1) % n], part) for i in range(n)])] if n > 1 and rounds else []


def _halving_doubling(groups: list[list[int]], part: float) -> list[tuple[int, Flows]]:
    """Fold, recursive halving, recursive doubling, unfold of a tensor of `part`, in every group of ranks at once."""
    n = len(groups[0])
    p = 1 << (n.bit_length() - 1)
    rem = n - p
    players = [2 * j + 1 if j < rem else j + rem for j in range(p)]
    fold = [(g[2 * i], g[2 * i + 1], part) for g in groups for i in range(rem)]
    steps = [(1, fold)] if fold else []
    d = p // 2
    while d:
        steps.append((1, [(g[players[j]], g[players[j ^ d]], part * d / p) for g in groups for j in range(p)]))
        d //= 2
    steps += steps[len(fold) > 0 :][::-1]  # the doubling walks the halving's pairs backwards
    if fold:
        steps.append((1, [(dst, src, size) for src, dst, size in fold]))
    return steps


def _tree(ranks: list[int], inward: bool) -> list[tuple[int, Flows]]:
    """A binomial tree over `ranks` rooted at the first: a reduce (inward) or a broadcast of the whole tensor."""
    steps, d = [], 1
    while d < len(ranks):
        pairs = [(ranks[i + d], ranks[i], 1.0) for i in range(0, len(ranks) - d, 2 * d)]
        steps.append((1, pairs if inward else [(dst, src, part) for src, dst, part in pairs]))
        d *= 2
    return steps if inward else steps[::-1]


def _leaders(hosts: int, per_host: int) -> list[tuple[int, Flows]]:
    """Reduce to each host's first rank, halving-doubling among those leaders, broadcast inside each host."""
    inside = [list(range(h * per_host, (h + 1) * per_host)) for h in range(hosts)]
    reduce = [
        (1, [f for ranks in inside for f in _tree(ranks, True)[k][1]]) for k in range(len(_tree(inside[0], True)))
    ]
    spread = [(1, [f for ranks in inside for f in _tree(ranks, False)[k][1]]) for k in range(len(reduce))]
    return reduce + _halving_doubling([[ranks[0] for ranks in inside]], 1.0) + spread


@functools.lru_cache(maxsize=256)
def shape(algorithm: str, hosts: int, per_host: int, backend: str = "mpi") -> Shape:
    """The allreduce schedule's cost of `algorithm` on `hosts` hosts of `per_host` ranks each."""
    n = hosts * per_host
    world = list(range(n))
    if n == 1:
        return Shape()
    if algorithm == "native":  # what the library runs for large tensors: MPICH halving-doubling, gloo/NCCL rings
        algorithm = "halving_doubling" if backend == "mpi" else "ring"
        if backend == "mpi" and hosts > 1 and per_host > 1:  # MPICH's node-aware composition: a host leader each
            return _account(_leaders(hosts, per_host), per_host)
    if algorithm == "ring":
        steps = _ring(world, 1 / n, 2 * (n - 1))
    elif algorithm == "halving_doubling":
        steps = _halving_doubling([world], 1.0)
    elif algorithm == "naive":  # rank 0 receives from each rank in turn, then sends the sum to all at once
        steps = [(1, [(src, 0, 1.0)]) for src in range(1, n)] + [(1, [(0, dst, 1.0) for dst in range(1, n)])]
    elif algorithm == "shm":  # two waits per piece; every rank reads and writes its share of every other's
        return Shape(a_intra=2, b_intra=2 * (n - 1) / n)
    elif algorithm == "hierarchical":
        inside = [list(range(h * per_host, (h + 1) * per_host)) for h in range(hosts)]
        across = [[h * per_host + local for h in range(hosts)] for local in range(per_host)]
        ring = [step for ranks in inside for step in _ring(ranks, 1 / per_host, per_host - 1)]
        host_stage = [(per_host - 1, [f for _, flows in ring for f in flows])] if ring else []
        cross = _halving_doubling(across, 1 / per_host) if hosts > 1 else []
        steps = host_stage + cross + host_stage
    else:
        raise ValueError(f"no cost model for algorithm {algorithm!r}")
    return _account(steps, per_host)


def predict(
    model: dict, algorithm: str, nbytes: float, hosts: int, per_host: int, backend: str = "mpi"
) -> float | None:
    """Predicted seconds of one allreduce, or None when the model has no figures for it."""
    if algorithm not in model:
        return None
    return shape(algorithm, hosts, per_host, backend).time(model[algorithm], nbytes)


def fastest(model: dict, options: Iterable[str], nbytes: float, hosts: int, per_host: int, backend: str) -> str:
    """The option predicted fastest (the first of equals); "native" when the model predicts none of them."""
    times = {a: predict(model, a, nbytes, hosts, per_host, backend) for a in options}
    known = {a: t for a, t in times.items() if t is not None}
    return min(known, key=known.__getitem__) if known else "native"


def options(hosts: int, per_host: int, *, even: bool = True, shm: bool = False) -> list[str]:
    """What can run on `hosts` hosts of `per_host` ranks: hierarchical on several even hosts of several ranks (else
    it is one of the others), shm on one host where the transport offers it."""
    found = ["native", "naive", "ring", "halving_doubling"]
    if even and hosts > 1 and per_host > 1:
        found.append("hierarchical")
    if shm and hosts == 1:
        found.append("shm")
    return found


def choose(comm, algorithm: str, nbytes: int) -> str:
    """The algorithm a collective of `nbytes` on `comm` runs: "auto" becomes the one the model predicts fastest,
    from rank-independent inputs only; any other name stays."""
    if algorithm != "auto" or comm.size == 1:
        return algorithm
    topo = comm._hosts()
    hosts = len(topo.hosts)
    allowed = options(hosts, topo.per_host, even=topo.even, shm=not comm._shm_unavailable())
    return fastest(load(os.environ.get(ENV, "")), allowed, nbytes, hosts, topo.per_host, comm.backend)


@functools.lru_cache(maxsize=8)
def load(path: str) -> dict:
    """The model in `path` ({algorithm: {link: {"alpha": s, "beta": s/byte}}} under "algorithms"), or the default."""
    if not path:
        return DEFAULT_MODEL
    fix = "write one with python -m benchmarks.model --save FILE, or unset it for the built-in defaults"
    try:
        model = json.loads(Path(path).read_text())["algorithms"]
        for algorithm, links in model.items():
            for link, pair in links.items():
                if link not in LINKS or set(pair) != {"alpha", "beta"} or min(pair.values()) < 0:
                    raise ValueError(f"{algorithm} {link}: {pair}")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise ValueError(f"{ENV}={path} is not a cost model ({type(error).__name__}: {error}); {fix}") from None
    return model
