"""A collective never hangs: timeouts, crashes and mismatched calls end the job with a message naming them."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.launching import MPIEXEC, ROOT, TORCHRUN, run, run_ranks

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
    assert "rank 0 waited 3 s for rank(s) [1]: rank 1 has not called it: it is alive, busy elsewhere" in text, text
    assert "rank 1's Python stack (main thread):" in text and "time.sleep(600)" in text, text[-3000:]
    assert "raise DISTRIB_TIMEOUT if it is only slow" in text  # rank 1 may only be slow: the advice fits
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


def each_algorithm(launches: list[tuple[str, str]]) -> list[tuple[str, str, str]]:
    """(launcher, backend, algorithm) for every algorithm each backend has ("shm" is the mpi backend's)."""
    algorithms = ["native", "ring", "naive", "shm"]
    return [(la, b, a) for la, b in launches for a in algorithms if a != "shm" or b == "mpi"]


@pytest.mark.parametrize(
    "launcher,backend,algorithm,check",
    # gloo under torchrun only: the check is the backend's and the algorithm's, not the launcher's
    [(*launch, "fingerprint") for launch in each_algorithm([("mpiexec", "mpi"), ("torchrun", "gloo")])]
    + [("mpiexec", "mpi", "ring", "all")],
)
def test_calls_that_differ_after_the_first_eight_fail_on_every_rank(launcher, backend, algorithm, check):
    """The 9th call: 1000 against 1001 elements, then float32 against int32 (the same bytes). Native MPI used to
    return rank 1's tail unreduced, ring and naive an MPI_ERROR, gloo a C++ terminate; now every rank raises the
    CollectiveError naming both calls, and the uncaught second one ends the job. DISTRIB_VERIFY=all: the same."""
    start = time.monotonic()
    args = [SCENARIOS, "late_mismatch", backend, "20", algorithm]
    result = run_ranks(launcher, 2, args, timeout=90, env={"DISTRIB_VERIFY": check})
    text = result.stdout + result.stderr
    assert result.returncode != 0, text[-3000:]
    assert time.monotonic() - start < 60
    call = rf"call #{{n}} allreduce\(op='sum', algorithm='{algorithm}'\) on"
    for n, theirs in ((9, "float32 (1001,)"), (10, "int32 (1000,)")):
        calls = rf"\(rank 0: {call.format(n=n)} float32 \(1000,\); rank 1: {call.format(n=n)} {re.escape(theirs)}\)"
        for rank in (0, 1):
            assert re.search(rf"rank {rank} caught: collective calls differ across ranks {calls}", result.stdout), text
    assert "CollectiveError: collective calls differ" in result.stderr
    assert "returned" not in result.stdout and "MPI_ERROR" not in text and "terminate called" not in text


@pytest.mark.parametrize(
    "launcher,backend,algorithm,ranks",
    [("torchrun", "gloo", a, 2) for a in ("native", "ring", "naive")]
    + [("torchrun", "gloo", "native", 3), ("mpiexec", "mpi", "native", 2)],
)
def test_a_call_one_rank_started_before_the_others_refused_it_fails_on_every_rank(launcher, backend, algorithm, ranks):
    """Rank 0 enters first and, under gloo, starts the call before the others are in it; they come with other calls
    (another size; an allreduce against its allgather; 5 elements against its empty tensor, which it cannot start).
    Every rank raises the CollectiveError naming each rank's call, none returns, and the next call sums right on
    every rank: the ranks that refused took part in the call rank 0 had started, so nothing was left in flight.
    Under MPI (no early start) the same."""
    result = run_ranks(launcher, ranks, [SCENARIOS, "started_mismatch", backend, "20", algorithm], timeout=90)
    text = result.stdout + result.stderr
    assert result.returncode == 0, text[-3000:]
    first = [
        f"rank {r}: call #1 allreduce(op='sum', algorithm='{algorithm}') on float32 ({1000 + r},)" for r in range(ranks)
    ]
    second = [f"rank 0: call #3 allgather(op='', algorithm='{algorithm}') on float32 (6,)"]
    second += [
        f"rank {r}: call #3 allreduce(op='sum', algorithm='{algorithm}') on float32 (12,)" for r in range(1, ranks)
    ]
    third = [f"rank 0: call #5 allreduce(op='sum', algorithm='{algorithm}') on float32 (0,)"]
    third += [
        f"rank {r}: call #5 allreduce(op='sum', algorithm='{algorithm}') on float32 (5,)" for r in range(1, ranks)
    ]
    for rank in range(ranks):
        for calls in (first, second, third):
            assert f"rank {rank} caught: collective calls differ across ranks ({'; '.join(calls)})" in text, text[
                -3000:
            ]
        assert text.count(f"rank {rank} next: [{ranks}.0, {ranks}.0, {ranks}.0]") == 3, text[-3000:]
    assert "returned" not in text and "terminate called" not in text


def reports(text: str) -> dict[int, str]:
    """Each rank's report of a failed wait, by the rank that wrote it (its first line)."""
    found = re.findall(r"Collective(?:Timeout|Error): (.*?\(call #\d+\): rank (\d) .*?)(?:\n(?!  )|\Z)", text, re.S)
    return {int(rank): report for report, rank in found}


STOPS = each_algorithm([("mpiexec", "mpi")]) + [("torchrun", "gloo", "native"), ("torchrun", "gloo", "ring")]


@pytest.mark.parametrize("launcher,backend,algorithm", STOPS)
def test_a_stopped_rank_is_named_by_every_survivor(launcher, backend, algorithm):
    """3 ranks; rank 2 stops (SIGSTOP) in call #6, an allreduce labelled bucket 3: each survivor prints one report
    naming rank 2, stopped in that call, never the other survivor, and no advice to wait longer; the first line of
    the failure names rank 2, and under torchrun so does its root cause (rank 2 is ended first)."""
    start = time.monotonic()
    result = run_ranks(launcher, 3, [SCENARIOS, "stopped", backend, "3", algorithm], timeout=90)
    elapsed, text = time.monotonic() - start, result.stdout + result.stderr
    assert result.returncode != 0, text[-3000:]
    assert elapsed < 45, f"{elapsed:.0f} s for a 3 s timeout"
    found = reports(text)
    assert set(found) == {0, 1}, text[-4000:]
    for rank, report in found.items():  # a survivor cut off by the other's exit stops waiting before its deadline
        named = rf"rank {rank} (waited 3 s|stops waiting) for rank\(s\) \[2\]: rank 2 is stopped \(pid "
        assert re.search(named, report), report
        assert "in call #6" in report and "bucket 3" in report and "DISTRIB_TIMEOUT" not in report, report
    first = next(line for line in text.splitlines() if line.startswith("distrib: "))
    assert first.startswith("distrib: rank(s) [2] of 3 stopped the job"), text[-3000:]
    if launcher == "torchrun":
        root = r"Root Cause \(first observed failure\):\n\[0\]:\n.*\n.*\n  rank      : 2 "
        assert re.search(root, text), text[-2000:]


@pytest.mark.parametrize("launcher,backend,algorithm", [("mpiexec", "mpi", "native"), ("torchrun", "gloo", "ring")])
def test_uneven_step_counts_say_a_rank_finished(launcher, backend, algorithm):
    """Rank 0 takes 13 steps, rank 1 10: rank 0's 11th call ends at once (no timeout to wait out) saying rank 1
    finished after call #10, with each rank's step, and without advice to raise DISTRIB_TIMEOUT."""
    start = time.monotonic()
    result = run_ranks(launcher, 2, [SCENARIOS, "uneven", backend, "30", algorithm], timeout=90)
    elapsed, text = time.monotonic() - start, result.stdout + result.stderr
    assert result.returncode != 0, text[-3000:]
    assert elapsed < 25, f"{elapsed:.0f} s: rank 0 waited out its 30 s timeout"
    report = reports(text)[0]
    assert "(call #11): rank 0 stops waiting for rank(s) [1]: rank 1 finished: it closed its communicator after call" \
        " #10" in report, report  # fmt: skip
    assert "step 11 for" in report and "step 10 ended" in report and "DISTRIB_TIMEOUT" not in report, report


def two_hosts(launcher: str, args: list[str], folders: list[Path], timeout: float) -> str:
    """Ranks 0-1 on one "host", rank 2 (mpiexec) or ranks 2-3 (torchrun) on another: one machine, but each host's
    flight recorder slots in its own folder (DISTRIB_FLIGHT_DIR), so neither sees the other's: only the store does.
    Returns everything the job printed."""
    if launcher == "mpiexec":  # MPMD: the same program, another environment for the last rank
        part = [sys.executable, SCENARIOS, *args]
        cmd = [MPIEXEC, "-n", "2", "-env", "DISTRIB_FLIGHT_DIR", str(folders[0]), *part]
        cmd += [":", "-n", "1", "-env", "DISTRIB_FLIGHT_DIR", str(folders[1]), *part]
        result = run(cmd, timeout)
        return result.stdout + result.stderr
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    agents = [
        subprocess.Popen(
            [
                TORCHRUN,
                "--nnodes",
                "2",
                "--node-rank",
                str(h),
                "--nproc-per-node",
                "2",
                "--master-addr",
                "127.0.0.1",
                "--master-port",
                str(port),
                SCENARIOS,
                *args,
            ],
            cwd=ROOT,
            env={**env, "DISTRIB_FLIGHT_DIR": str(folders[h])},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        for h in (0, 1)
    ]
    try:
        return "".join(agent.communicate(timeout=timeout)[0] for agent in agents)
    finally:
        for agent in agents:
            agent.kill()


@pytest.mark.parametrize("launcher,backend", [("mpiexec", "mpi"), ("torchrun", "gloo")])
def test_across_hosts_the_store_carries_each_rank_s_record(launcher, backend, tmp_path):
    """Where ranks span hosts, each rank's record also goes to a store (torchrun's; under MPI one met through MPI)
    and the call check to a 16-byte allreduce: a stopped rank on the other host is still named, with its call, and
    a rank busy elsewhere on the other host still sends its stack."""
    folders = [tmp_path / "host0", tmp_path / "host1"]
    for folder in folders:
        folder.mkdir()
    stopped = two_hosts(launcher, ["stopped", backend, "3", "ring"], folders, timeout=90)
    last = 2 if launcher == "mpiexec" else 3
    assert f"waited 3 s for rank(s) [{last}]: rank {last} entered call #6 but has not answered for" in stopped, stopped
    assert f"rank {last} (pid " in stopped and ", another host): in call #6 allreduce(" in stopped, stopped
    busy = two_hosts(launcher, ["timeout", backend, "3"], folders, timeout=90)
    report = reports(busy)[2]  # rank 2: on the other host from rank 1, which sleeps
    assert "rank 1 has not called it: it is alive, busy elsewhere" in report and "time.sleep(600)" in report, report
    assert not [p for folder in folders for p in folder.iterdir()], "slot files left behind"
