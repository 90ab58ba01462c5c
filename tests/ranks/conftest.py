"""The rank suites: every test runs on every rank of one job, each marked with pytest-mpi's `mpi` mark.

Under MPI, as pytest-mpi has it:  mpiexec -n 3 python -m pytest --with-mpi tests/ranks
Under torchrun (pytest-mpi, which reads MPI's world, set aside; the marks' min_size is checked here instead):
    DISTRIB_TEST_BACKEND=gloo torchrun --standalone --nproc-per-node 2 -m pytest -p no:pytest_mpi tests/ranks
The backend comes from DISTRIB_TEST_BACKEND (default: the launcher's).
"""

import os

import pytest

import distrib


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "mpi(min_size=N): runs on every rank of a job of at least N ranks")


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.config.pluginmanager.has_plugin("pytest_mpi"):
        return  # pytest-mpi checks min_size against MPI's world
    size = int(os.environ.get("WORLD_SIZE", "1"))
    for mark in item.iter_markers(name="mpi"):
        if size < mark.kwargs.get("min_size", 1):
            pytest.skip(f"needs {mark.kwargs['min_size']} ranks, this job has {size}")


@pytest.fixture(scope="session")
def comm() -> distrib.Communicator:
    return distrib.init(os.environ.get("DISTRIB_TEST_BACKEND") or None, timeout=60)
