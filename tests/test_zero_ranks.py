"""Runs tests/ranks/test_zero.py under real launchers at 1 to 4 ranks (3: a padded last shard), MPI and gloo."""

from __future__ import annotations

import pytest

from tests.launching import run_rank_suite

RUNS = [
    ("mpiexec", "mpi", 1),
    ("mpiexec", "mpi", 2),
    ("mpiexec", "mpi", 3),
    ("torchrun", "gloo", 4),
]


@pytest.mark.parametrize("launcher,backend,ranks", RUNS, ids=lambda x: str(x))
def test_zero_rank_suite(launcher, backend, ranks):
    run_rank_suite(launcher, backend, ranks, "tests/ranks/test_zero.py", timeout=240)
