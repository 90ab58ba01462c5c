"""Jobs across namespace hosts (tests/netns.py): their environment, and starting and finishing them with deadlines."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

from tests import netns
from tests.launching import ROOT

SSH = str(ROOT / "tests/scripts/two_hosts_ssh.py")


def job_env(hosts: netns.Cluster, **extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "OMP_NUM_THREADS": "1",
        # hydra starts the proxy on a host by running `ssh HOST ...`; ours enters that host's namespace instead.
        "HYDRA_LAUNCHER": "ssh",
        "HYDRA_LAUNCHER_EXEC": SSH,
        "DISTRIB_TEST_NETNS": hosts.mapping(),
        # The namespaces share /dev/shm and the boot id, so UCX would pass messages between "hosts" through shared
        # memory, which real hosts cannot; TCP only, so the traffic takes the link as it would between machines.
        "UCX_TLS": "tcp,self",
        "DISTRIB_TIMEOUT": "30",  # a peer that never comes fails the job in 30 s, not 300; ample for a slow start
        **extra,
    }


def start(command: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    """Start `command` in its own process group, its output going to `log`."""
    with open(log, "w") as out:
        return subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )


def finish(procs: list[subprocess.Popen], logs: list[Path], timeout: float) -> list[str]:
    """Wait for every process until a shared deadline, killing all their process groups if one is late."""
    deadline = time.monotonic() + timeout
    try:
        for proc in procs:
            proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
    except subprocess.TimeoutExpired:
        texts = "\n".join(log.read_text()[-3000:] for log in logs)
        raise AssertionError(f"hung past {timeout} s:\n{texts}") from None
    finally:
        for proc in procs:
            stop(proc)
    return [log.read_text() for log in logs]


def stop(proc: subprocess.Popen) -> None:
    """Kill `proc`'s whole process group if it is still running (the namespaces' teardown catches the rest)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
