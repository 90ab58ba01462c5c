"""A collective never hangs: timeouts, crashes and mismatched calls end the job with a message naming them."""

from __future__ import annotations

import re
import time

import pytest

from tests.launching import run_ranks

SCENARIOS = "tests/ranks/scenarios.py"
LAUNCHES = [("mpiexec", "mpi"), ("mpiexec", "gloo"), ("torchrun", "gloo")]


@pytest.mark.parametrize("launcher,backend", LAUNCHES)
def test_missing_peer_times_out_naming_it(launcher, backend):
    start = time.monotonic()
    result = run_ranks(launcher, 2, [SCENARIOS, "timeout", backend, "3"], timeout=90)
    elapsed = time.monotonic() - start
    assert result.returncode != 0
    text = result.stdout + result.stderr
    assert "CollectiveTimeout: allreduce" in text, text[-3000:]
    assert "rank 0 waited 3 s for rank(s) [1]" in text, text[-3000:]
    assert elapsed < 60, f"the job took {elapsed:.0f} s to go down after a 3 s timeout"


@pytest.mark.parametrize("launcher,backend", LAUNCHES)
def test_crash_on_one_rank_takes_the_job_down(launcher, backend):
    start = time.monotonic()
    result = run_ranks(launcher, 3, [SCENARIOS, "crash", backend, "120"], timeout=90)
    elapsed = time.monotonic() - start
    text = result.stdout + result.stderr
    assert result.returncode != 0
    assert "rank 1 of 3 failed" in text and "boom on purpose" in text, text[-3000:]
    assert elapsed < 60, f"{elapsed:.0f} s: the others waited out their 120 s timeout instead of going down"


@pytest.mark.parametrize("launcher,backend", LAUNCHES)
@pytest.mark.parametrize("scenario,detail", [("mismatch", "float32 (3,)"), ("dtype_mismatch", "float64 (4,)")])
def test_mismatched_calls_fail_on_every_rank(launcher, backend, scenario, detail):
    result = run_ranks(launcher, 2, [SCENARIOS, scenario, backend, "30"], timeout=90)
    assert result.returncode == 0, result.stderr[-3000:]
    for rank in (0, 1):  # ranks print concurrently, so look for each one's whole message anywhere
        pattern = rf"rank {rank} caught: collective calls differ across ranks \(rank 0: .*?; rank 1: .*?\); every"
        found = re.search(pattern, result.stdout)
        assert found, result.stdout
        assert detail in found.group().replace("torch.", ""), found.group()


@pytest.mark.parametrize("launcher,backend", LAUNCHES)
def test_ddp_parameter_unused_on_one_rank_ends_the_job_naming_it(launcher, backend):
    start = time.monotonic()
    result = run_ranks(launcher, 2, [SCENARIOS, "ddp_unused_on_one_rank", backend, "120"], timeout=90)
    elapsed = time.monotonic() - start
    text = result.stdout + result.stderr
    assert result.returncode != 0
    assert "rank 1 of 2 failed" in text and "Expected to have finished reduction in the prior iteration" in text, text
    assert "Parameter indices which did not receive grad for rank 1: 2 3" in text, text[-3000:]
    assert elapsed < 60, f"{elapsed:.0f} s: rank 0 waited out its 120 s timeout instead of going down"
