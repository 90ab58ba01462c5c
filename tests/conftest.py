"""The multi-rank suites under tests/ranks run only under a launcher: with --with-mpi (pytest-mpi, under mpiexec),
or when tests/launching.py starts them (DISTRIB_RANK_SUITE, also under torchrun). Tests marked heavy (benchmark-
sized) run only when asked for. MPICH's shared memory left by the jobs the tests kill is removed at the end."""

import glob
import os
from pathlib import Path

import pytest

RANKS = Path(__file__).parent / "ranks"
MPICH_SHM = "/dev/shm/mpich_shm_*"  # MPICH's segment of a job's ranks on one host
_before: set[str] = set()


def pytest_sessionstart(session: pytest.Session) -> None:
    _before.update(glob.glob(MPICH_SHM))


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """MPICH leaves a job's segment in /dev/shm when its ranks are killed or aborted, as the failure tests do on
    purpose (about 60 MB a suite): remove those made during this session that no process maps any more."""
    if os.environ.get("DISTRIB_RANK_SUITE") or getattr(session.config.option, "with_mpi", False):
        return  # a rank suite's session: its job's own segment may still be in use
    mapped = set()
    for maps in glob.glob("/proc/[0-9]*/maps"):
        try:
            with open(maps) as f:
                mapped.update(line.split()[-1] for line in f if "/dev/shm/mpich_shm_" in line)
        except OSError:  # the process ended while we looked
            continue
    for path in set(glob.glob(MPICH_SHM)) - _before - mapped:
        Path(path).unlink(missing_ok=True)


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
