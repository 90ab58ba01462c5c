"""Two "hosts" on this machine: network namespaces joined by a veth pair, for multi-host tests.

Host A is 10.77.0.1 on veth-a, host B 10.77.0.2 on veth-b; each also has its own loopback. Only these
addresses are used. Names carry the pid and a counter, so parallel runs never meet.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

ADDRESSES = ("10.77.0.1", "10.77.0.2")
LINKS = ("veth-a", "veth-b")
_count = itertools.count()


def _ip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], check=False, capture_output=True, text=True, timeout=10)


@dataclass(frozen=True)
class Hosts:
    """Two namespaces: `names[i]` has address `ADDRESSES[i]` on link `LINKS[i]`."""

    names: tuple[str, str]

    def exec_prefix(self, host: int) -> list[str]:
        """The words that run a command inside host `host` (0 or 1)."""
        return ["ip", "netns", "exec", self.names[host]]

    def netns_id(self, host: int) -> str:
        """The namespace as /proc/PID/ns/net names it inside that host, e.g. 'net:[4026532246]'."""
        return f"net:[{os.stat(f'/run/netns/{self.names[host]}').st_ino}]"

    def link_bytes(self) -> int:
        """Bytes host A's veth has sent plus received: all traffic between the hosts."""
        out = _ip("-n", self.names[0], "-s", "-j", "link", "show", LINKS[0])
        stats = json.loads(out.stdout)[0]["stats64"]
        return stats["rx"]["bytes"] + stats["tx"]["bytes"]

    def pids(self, host: int) -> list[int]:
        """The processes still running inside host `host`."""
        return [int(pid) for pid in _ip("netns", "pids", self.names[host]).stdout.split()]

    def cut(self) -> None:
        """Take the link down, as if the cable between the hosts were pulled."""
        _check(_ip("-n", self.names[0], "link", "set", LINKS[0], "down"))

    def mapping(self) -> str:
        """`10.77.0.1=nsA,10.77.0.2=nsB`: the form tests/scripts/two_hosts_ssh.py reads from DISTRIB_TEST_NETNS."""
        return ",".join(f"{address}={name}" for address, name in zip(ADDRESSES, self.names))


def unavailable() -> str | None:
    """Why namespaces cannot be made here, or None when they can."""
    if shutil.which("ip") is None:
        return "no `ip` command (iproute2) to make network namespaces"
    if os.geteuid() != 0:
        return "making network namespaces needs root"
    probe = f"distrib-probe-{os.getpid()}-{next(_count)}"
    made = _ip("netns", "add", probe)
    if made.returncode:
        return f"cannot make a network namespace: {made.stderr.strip()}"
    _ip("netns", "delete", probe)
    return None


@contextmanager
def two_hosts() -> Iterator[Hosts]:
    """Make the two namespaces and their link; afterwards kill everything left inside them and delete them."""
    tag = f"{os.getpid()}-{next(_count)}"
    hosts = Hosts((f"distrib-a-{tag}", f"distrib-b-{tag}"))
    try:
        for name in hosts.names:
            _check(_ip("netns", "add", name))
            _check(_ip("-n", name, "link", "set", "lo", "up"))
        # Both ends are made inside their namespaces, so the link names never meet another run's.
        a, b = hosts.names
        _check(_ip("link", "add", LINKS[0], "netns", a, "type", "veth", "peer", "name", LINKS[1], "netns", b))
        for name, link, address in zip(hosts.names, LINKS, ADDRESSES):
            _check(_ip("-n", name, "addr", "add", f"{address}/24", "dev", link))
            _check(_ip("-n", name, "link", "set", link, "up"))
        yield hosts
    finally:
        for host, name in enumerate(hosts.names):
            for pid in hosts.pids(host):  # all started by this test, inside its own namespaces
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            _ip("netns", "delete", name)  # also removes the veth pair


def _check(result: subprocess.CompletedProcess) -> None:
    if result.returncode:
        raise RuntimeError(f"`ip {' '.join(result.args[1:])}` failed: {result.stderr.strip()}")
