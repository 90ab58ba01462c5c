"""A few SGD steps of a tiny model with distrib, for comparing runs across hosts with a run on one.

Each rank checks an allreduce of known values with naive, ring and native (with --check-all: every algorithm
that runs across hosts, "auto" included, and reduce-scatter and allgather too), then trains: it computes
gradients on its equal shard of a fixed global batch, averages them with `comm.allreduce(grad, op="avg")`, and
steps; rank 0 saves the weights to OUT. With equal shards the average is the full batch's gradient, so any world
size trains the same weights. Every rank prints one line naming its rank and network namespace; with --picks,
rank 0 first prints what algorithm "auto" runs at each size, as `auto SIZE -> ALGORITHM`.

Usage: two_hosts_train.py BACKEND OUT [--steps N] [--pause SECONDS] [--algorithm NAME] [--check-all]
    [--picks BYTES ...]
"""

import argparse
import os
import time

import torch

import distrib
from distrib.comm import auto

GLOBAL_BATCH = 32
ALGORITHMS = ("naive", "ring", "native")
EVERY = ("naive", "ring", "native", "halving_doubling", "hierarchical", "auto")  # all that cross hosts (not shm)
CHECK_SIZE = 100_000  # float64 elements: 800 kB, so the check's traffic is easy to tell from wire-up chatter


def check_allreduce(comm: distrib.Communicator, algorithms: tuple[str, ...], collectives: bool) -> None:
    """Rank r gives (r + 1) * [0, 1, ...]; the sum is size (size + 1) / 2 times that, exact in float64. With
    `collectives`, also a reduce-scatter (each rank's rows of that sum) and an allgather (rank r's rows all r)."""
    total = comm.size * (comm.size + 1) // 2
    for numel in (CHECK_SIZE, 3, 1001) if collectives else (CHECK_SIZE,):
        base = torch.arange(numel, dtype=torch.float64)
        for algorithm in algorithms:
            t = base * (comm.rank + 1)
            comm.allreduce(t, op="sum", algorithm=algorithm)
            torch.testing.assert_close(t, base * total, rtol=0, atol=0, msg=f"{algorithm} allreduce of {numel}")
            if not collectives:
                continue
            rows = torch.arange(comm.size * numel, dtype=torch.float64).view(comm.size, numel)
            part = comm.reduce_scatter(rows * (comm.rank + 1), algorithm=algorithm)
            assert torch.equal(part, rows[comm.rank : comm.rank + 1] * total), f"{algorithm} reduce_scatter {numel}"
            everyone = comm.allgather(torch.full((numel,), float(comm.rank), dtype=torch.float64), algorithm=algorithm)
            expected = torch.arange(comm.size, dtype=torch.float64).repeat_interleave(numel)
            assert torch.equal(everyone, expected), f"{algorithm} allgather of {numel}"


def train(comm: distrib.Communicator, steps: int, pause: float) -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    data = torch.Generator().manual_seed(1)
    inputs = torch.randn(GLOBAL_BATCH, 8, generator=data)
    targets = inputs.sum(dim=1, keepdim=True).sin()
    if GLOBAL_BATCH % comm.size:
        raise ValueError(f"the global batch of {GLOBAL_BATCH} does not split evenly over {comm.size} ranks")
    mine = slice(comm.rank * GLOBAL_BATCH // comm.size, (comm.rank + 1) * GLOBAL_BATCH // comm.size)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(steps):
        loss = torch.nn.functional.mse_loss(model(inputs[mine]), targets[mine])
        optimizer.zero_grad()
        loss.backward()
        for parameter in model.parameters():
            comm.allreduce(parameter.grad, op="avg")
        optimizer.step()
        if comm.rank == 0 and pause:
            print(f"step {step}", flush=True)  # the link-cut test waits for this before cutting
        time.sleep(pause)
    return model


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("backend")
    parser.add_argument("out")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--pause", type=float, default=0.0, help="seconds to sleep after each step")
    parser.add_argument("--algorithm", default="native", help="the gradients' allreduce")
    parser.add_argument("--check-all", action="store_true", help="every algorithm, and every collective")
    parser.add_argument("--picks", type=int, nargs="*", default=[], help="sizes to report auto's choice at")
    args = parser.parse_args()
    comm = distrib.init(args.backend, algorithm=args.algorithm)
    for nbytes in args.picks:
        pick = auto.choose(comm, "auto", nbytes)
        if comm.rank == 0:
            print(f"auto {nbytes} -> {pick}", flush=True)
    check_allreduce(comm, EVERY if args.check_all else ALGORITHMS, args.check_all)
    model = train(comm, args.steps, args.pause)
    if comm.rank == 0:
        torch.save(model.state_dict(), args.out)
    netns = os.readlink("/proc/self/ns/net")
    print(f"rank {comm.rank} of {comm.size} in {netns}: allreduce and training done", flush=True)


if __name__ == "__main__":
    main()
