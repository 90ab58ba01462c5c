"""The multi-rank suites under tests/ranks run only under a launcher: with --with-mpi (pytest-mpi, under mpiexec),
or when tests/launching.py starts them (DISTRIB_RANK_SUITE, also under torchrun). Tests marked heavy (benchmark-
sized) run only when asked for."""

import os
from pathlib import Path

import pytest

RANKS = Path(__file__).parent / "ranks"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "heavy: benchmark-sized runs, skipped unless DISTRIB_HEAVY=1 or -m heavy")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.environ.get("DISTRIB_HEAVY") == "1" or "heavy" in (config.option.markexpr or ""):
        return
    skip = pytest.mark.skip(reason="heavy: run with DISTRIB_HEAVY=1 or -m heavy")
    for item in items:
        if "heavy" in item.keywords:
            item.add_marker(skip)


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    if RANKS not in (collection_path, *collection_path.parents):
        return None
    launched = os.environ.get("DISTRIB_RANK_SUITE") or getattr(config.option, "with_mpi", False)
    return None if launched else True
