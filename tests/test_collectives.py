"""Runs tests/ranks/test_collectives.py under real launchers at 1 to 4 ranks (3 catches chunking bugs)."""

from __future__ import annotations

import re

import pytest

from tests.launching import run_ranks

RUNS = [
    ("mpiexec", "mpi", 1),
    ("mpiexec", "mpi", 2),
    ("mpiexec", "mpi", 3),
    ("mpiexec", "mpi", 4),
    ("mpiexec", "gloo", 3),  # torch.distributed bootstrapped through MPI
    ("torchrun", "gloo", 2),
    ("torchrun", "gloo", 4),
]


@pytest.mark.parametrize("launcher,backend,ranks", RUNS, ids=lambda x: str(x))
def test_rank_suite(launcher, backend, ranks):
    env = {"DISTRIB_RANK_SUITE": "1", "DISTRIB_TEST_BACKEND": backend}
    args = ["-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/ranks/test_collectives.py"]
    result = run_ranks(launcher, ranks, args, timeout=420, env=env)
    # Ranks print at once, so summaries can share a line: find each one's "N passed[, M skipped] in S s".
    summaries = re.findall(r"(\d+ passed(?:, \d+ \w+)* in [\d.]+s)", result.stdout)
    assert result.returncode == 0 and len(summaries) == ranks, result.stdout[-4000:] + result.stderr[-4000:]
    assert all("failed" not in s and "error" not in s for s in summaries), summaries
