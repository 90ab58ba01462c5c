"""Run commands under real launchers (mpiexec, torchrun) with an outer deadline, for the tests."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
MPIEXEC = str(BIN / "mpiexec") if (BIN / "mpiexec").exists() else "mpiexec"
TORCHRUN = str(BIN / "torchrun") if (BIN / "torchrun").exists() else "torchrun"
ERROR = "python -m distrib.train: error: "  # how the CLI begins its one line about a bad input


def launcher_command(launcher: str, n: int, args: list[str]) -> list[str]:
    """The command that starts `python args...` on n ranks through mpiexec or torchrun."""
    if launcher == "mpiexec":
        return [MPIEXEC, "-n", str(n), sys.executable, *args]
    if launcher == "torchrun":
        return [TORCHRUN, "--standalone", "--nproc-per-node", str(n), *args]
    raise ValueError(launcher)


def run(cmd: list[str], timeout: float, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run cmd from the repository root; a hang past `timeout` fails the test instead of freezing it."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **(env or {})}
    try:
        return subprocess.run(cmd, check=False, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as error:
        out = (error.stdout or b"").decode() if isinstance(error.stdout, bytes) else (error.stdout or "")
        err = (error.stderr or b"").decode() if isinstance(error.stderr, bytes) else (error.stderr or "")
        raise AssertionError(f"hung past {timeout} s: {' '.join(cmd)}\n{out[-3000:]}\n{err[-3000:]}") from None


def run_ranks(launcher: str, n: int, args: list[str], timeout: float, env: dict[str, str] | None = None):
    return run(launcher_command(launcher, n, args), timeout, env)


def run_rank_suite(launcher: str, backend: str, ranks: int, suite: str, timeout: float = 240) -> None:
    """Run the pytest suite `suite` (under tests/ranks) on `ranks` ranks; every rank must pass all of it."""
    env = {"DISTRIB_RANK_SUITE": "1", "DISTRIB_TEST_BACKEND": backend}
    # Under mpiexec as an MPI user runs them (pytest-mpi); under torchrun the suite's conftest checks the marks.
    mpi = ["--with-mpi"] if launcher == "mpiexec" else ["-p", "no:pytest_mpi"]
    result = run_ranks(launcher, ranks, ["-m", "pytest", "-q", "-p", "no:cacheprovider", *mpi, suite], timeout, env)
    # Ranks print at once, so summaries can share a line: find each one's "N passed[, M skipped] in S s".
    summaries = re.findall(r"(\d+ passed(?:, \d+ \w+)* in [\d.]+s)", result.stdout)
    assert result.returncode == 0 and len(summaries) == ranks, result.stdout[-4000:] + result.stderr[-4000:]
    assert all("failed" not in s and "error" not in s for s in summaries), summaries
