"""The multi-rank suites under tests/ranks run only under a launcher: with --with-mpi (pytest-mpi, under mpiexec),
or when tests/launching.py starts them (DISTRIB_RANK_SUITE, also under torchrun)."""

import os
from pathlib import Path

import pytest

RANKS = Path(__file__).parent / "ranks"


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    if RANKS not in (collection_path, *collection_path.parents):
        return None
    launched = os.environ.get("DISTRIB_RANK_SUITE") or getattr(config.option, "with_mpi", False)
    return None if launched else True
