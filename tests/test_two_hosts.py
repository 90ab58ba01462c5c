"""Two hosts for real: a 2x2-rank job across two network namespaces joined by a bridge.

The job runs through `python -m launch` over MPICH (mpiexec starts host B's proxy through a stand-in for ssh)
and over torchrun (one per host, meeting at a c10d rendezvous on host A). Its allreduces must give known values
and its trained weights those of the same job on one host; cutting the link mid-job must end the job on both
hosts, naming a lost rank, within the collective timeout.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from distrib.comm.local import LocalCommunicator
from tests import netns
from tests.hostjobs import SSH, finish, job_env, start, stop
from tests.launching import MPIEXEC, run
from tests.scripts.two_hosts_train import CHECK_SIZE, train

TRAIN = "tests/scripts/two_hosts_train.py"
LAYOUT = f"{netns.address(0)}:2,{netns.address(1)}:2"
RDZV = f"{netns.address(0)}:29500"  # a fresh namespace: no other run can hold the port
LAUNCH = [sys.executable, "-m", "launch", "-n", "4", "--hosts", LAYOUT]
JOB_SECONDS = 120  # outer deadline of one job; a healthy one takes seconds
# The naive check alone sends ranks 2 and 3's CHECK_SIZE float64s to rank 0 and back over the link.
CROSSING_BYTES = 4 * CHECK_SIZE * 8
DONE = re.compile(r"rank (\d) of 4 in (net:\[\d+\]): allreduce and training done")


@pytest.fixture
def hosts():
    reason = netns.unavailable()
    if reason:
        pytest.skip(f"two hosts need network namespaces: {reason}")
    with netns.two_hosts() as made:
        yield made


@pytest.fixture(scope="module")
def one_host(tmp_path_factory) -> dict[str, torch.Tensor]:
    """The weights the same job trains with 4 ranks on this host, under plain mpiexec."""
    out = tmp_path_factory.mktemp("one_host") / "weights.pt"
    result = run([MPIEXEC, "-n", "4", sys.executable, TRAIN, "mpi", str(out)], JOB_SECONDS)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return torch.load(out)


def assert_ran_across(hosts: netns.Cluster, text: str, crossed: int) -> None:
    """Four ranks finished, two in each namespace (ranks 0-1 on one, 2-3 on the other), and data took the link."""
    where = {int(rank): ns for rank, ns in DONE.findall(text)}
    assert sorted(where) == [0, 1, 2, 3], text[-3000:]
    assert where[0] == where[1] and where[2] == where[3], where
    assert {where[0], where[2]} == {hosts.netns_id(0), hosts.netns_id(1)}, where
    assert crossed >= CROSSING_BYTES, f"only {crossed} bytes crossed the link; the ranks did not talk over it"


def assert_same_weights(path: Path, expected: dict[str, torch.Tensor]) -> None:
    weights = torch.load(path)
    assert weights.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(weights[name], expected[name], rtol=1e-6, atol=1e-7, msg=name)


def test_ssh_stand_in_refuses_a_host_it_does_not_know():
    env = {**os.environ, "DISTRIB_TEST_NETNS": "10.77.0.1=some-ns"}
    result = subprocess.run([SSH, "-x", "10.9.9.9", "true"], env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode != 0
    assert "host '10.9.9.9' is not in DISTRIB_TEST_NETNS='10.77.0.1=some-ns'" in result.stderr, result.stderr


def test_one_host_trains_like_one_process(one_host):
    """The reference itself: averaged shard gradients on 4 ranks step like the full batch in one process."""
    model = train(LocalCommunicator(), steps=5, pause=0.0)
    for name, value in model.state_dict().items():
        torch.testing.assert_close(one_host[name], value, rtol=1e-6, atol=1e-7, msg=name)


@pytest.mark.parametrize("backend", ["mpi", "gloo"], ids=["mpi-backend", "gloo-backend"])  # pytest-mpi skips id "mpi"
def test_mpiexec_across_two_hosts(hosts, one_host, backend, tmp_path):
    """mpiexec runs in host A (its proxies call back to it there); gloo finds rank 0's address itself."""
    out, log = tmp_path / "weights.pt", tmp_path / "job.log"
    before = hosts.link_bytes()
    proc = start([*hosts.exec_prefix(0), *LAUNCH, "--", "python", TRAIN, backend, str(out)], job_env(hosts), log)
    (text,) = finish([proc], [log], JOB_SECONDS)
    assert proc.returncode == 0, text[-4000:]
    assert_ran_across(hosts, text, hosts.link_bytes() - before)
    assert_same_weights(out, one_host)


def test_torchrun_across_two_hosts(hosts, one_host, tmp_path):
    """One torchrun per host; host A serves the c10d rendezvous and tells the workers its own address."""
    out = tmp_path / "weights.pt"
    before = hosts.link_bytes()
    procs, logs = [], []
    for host in (0, 1):
        # torch takes a host for the rendezvous server only if the endpoint is its hostname's address, which a
        # namespace's is not: say so (is_host), and give the address workers reach it at (local_addr).
        env = job_env(hosts, PET_RDZV_CONF=f"is_host={int(host == 0)}", PET_LOCAL_ADDR=netns.address(host))
        command = [*LAUNCH, "--via", "torchrun", "--node-rank", str(host), "--rdzv-endpoint", RDZV]
        command += ["--", "python", TRAIN, "gloo", str(out)]
        logs.append(tmp_path / f"host{host}.log")
        procs.append(start([*hosts.exec_prefix(host), *command], env, logs[-1]))
    texts = finish(procs, logs, JOB_SECONDS)
    assert [proc.returncode for proc in procs] == [0, 0], "\n".join(text[-3000:] for text in texts)
    assert_ran_across(hosts, "".join(texts), hosts.link_bytes() - before)
    assert_same_weights(out, one_host)


def test_cut_link_ends_the_job_naming_a_lost_rank(hosts, tmp_path):
    """Mid-training, take the link down: ranks time out after 5 s naming a rank across it (a rank of their own
    host they name is one held up in the call before, said so), and the whole job goes, on both hosts."""
    log = tmp_path / "job.log"
    # Hosts alternate along the ring (`A:1,B:1` places ranks 0, 2 on A and 1, 3 on B), so every rank waits on
    # a peer across the link and whichever times out first names a lost rank; the ring's timeouts name the peer
    # waited for, where a native MPI collective cannot.
    layout = f"{netns.address(0)}:1,{netns.address(1)}:1"
    command = [MPIEXEC, "-launcher", "ssh", "-launcher-exec", SSH, "-hosts", layout, "-n", "4", sys.executable]
    command += [TRAIN, "mpi", str(tmp_path / "w.pt"), "--algorithm", "ring", "--steps", "100000", "--pause", "0.05"]
    proc = start([*hosts.exec_prefix(0), *command], job_env(hosts, DISTRIB_TIMEOUT="5"), log)
    try:
        deadline = time.monotonic() + JOB_SECONDS
        while "step 3\n" not in log.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, f"never started:\n{log.read_text()[-3000:]}"
            time.sleep(0.1)
        cut = time.monotonic()
        hosts.cut()
        (text,) = finish([proc], [log], 60)
        ended = time.monotonic() - cut
        while hosts.pids(1) and time.monotonic() - cut < 30:  # host B hears nothing from A: it must go by itself
            time.sleep(0.2)
        left_on_b = hosts.pids(1)
    finally:
        stop(proc)
    assert proc.returncode != 0, text[-3000:]
    reports = re.findall(r"rank [02] waited 5 s for rank\(s\) \[([\d, ]+)\]([^\n]*)", text)  # host A's ranks
    assert any(set(ranks.split(", ")) & {"1", "3"} for ranks, _ in reports), text[-3000:]
    for ranks, why in reports:  # a rank of host A they name is held up in the call before, not blamed as busy
        for r in set(ranks.split(", ")) - {"1", "3"}:
            assert re.search(rf"rank {r} has not called it: it (is still|gave up) in call", why), text[-3000:]
    assert ended < 20, f"mpiexec took {ended:.0f} s to end the job after the link was cut (timeout 5 s)"
    assert not left_on_b, f"host B's processes {left_on_b} were still running 30 s after the link was cut"


def test_hosts_of_a_killed_run_are_deleted_by_the_next():
    reason = netns.unavailable()
    if reason:
        pytest.skip(f"two hosts need network namespaces: {reason}")
    # A run killed outright (SIGKILL) runs no finally: its namespaces stay until the next cluster() is made.
    code = "import os, signal; from tests import netns\nwith netns.two_hosts(): os.kill(os.getpid(), signal.SIGKILL)"
    killed = subprocess.Popen([sys.executable, "-c", code], cwd=Path(__file__).parent.parent)
    assert killed.wait(timeout=60) == -9
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
    orphans = [name for name in listed if f"-{killed.pid}-" in name]
    assert len(orphans) == 3, listed  # two hosts and their switch
    with netns.two_hosts() as made:
        left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
        assert not set(orphans) & set(left), left
        assert all(name in left for name in (*made.names, made.switch))
