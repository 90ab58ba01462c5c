"""Runs tests/ranks/test_collectives.py under real launchers at 1 to 4 ranks (3 catches chunking bugs); each backend
under each launcher once, not at every size: the launcher only starts the ranks."""

from __future__ import annotations

import pytest

from tests.launching import run_rank_suite

RUNS = [
    ("mpiexec", "mpi", 1),
    ("mpiexec", "mpi", 2),
    ("mpiexec", "mpi", 3),
    ("mpiexec", "mpi", 4),
    ("mpiexec", "gloo", 3),  # torch.distributed bootstrapped through MPI
    ("torchrun", "gloo", 4),
]


@pytest.mark.parametrize("launcher,backend,ranks", RUNS, ids=lambda x: str(x))
def test_rank_suite(launcher, backend, ranks):
    run_rank_suite(launcher, backend, ranks, "tests/ranks/test_collectives.py", timeout=600)
