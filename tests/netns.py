"""Hosts on this machine: network namespaces joined through a switch namespace, for multi-host tests and benchmarks.

Host h is a namespace whose link `uplink` has address 10.77.0.{h+1}/24; its loopback is its own. Only these
addresses are used. The switch is one more namespace:
- unshaped (`link=None`): a bridge, each host's uplink one end of a veth pair whose other end is on the bridge;
- shaped (a `Link`): tests/wire.py relays packets between hosts after the link's delay, and tc shapes each host's
  rate both ways: tbf on the uplink for what the host sends, tbf on an ifb that the uplink's ingress is
  redirected to for what it receives, as a switch port would limit it.
Frames are 64 KB (so the relay keeps up), and tbf lets one frame's worth pass at once: a message of up to a
frame leaves without waiting its serialisation time, longer ones are paced at the rate. Names carry the pid and a
counter, so parallel runs never meet; everything goes when the context ends, even when
the test inside it fails, and `leftovers(cluster)` says whether anything stayed. A run killed outright (SIGKILL:
no `finally` runs) leaves its namespaces behind; the next `cluster()` deletes those whose pid is gone.
"""

from __future__ import annotations

import itertools
import json
import os
import select
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

LINK = "uplink"  # each host's link to the switch
WIRE = Path(__file__).with_name("wire.py")
READY_SECONDS = 20
_count = itertools.count()


def address(host: int) -> str:
    return f"10.77.0.{host + 1}"


@dataclass(frozen=True)
class Link:
    """Each host's link: its rate each way, and the delay one way between two hosts."""

    gbit: float = 1.0
    delay_us: float = 100.0
    mtu: int = 64000  # large frames, so the relay's per-packet work stays small beside the link's pace

    def describe(self) -> str:
        return f"{self.gbit:g} Gbit/s, {self.delay_us:g} us"


def _ip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], check=False, capture_output=True, text=True, timeout=10)


def _tc(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["tc", *args], check=False, capture_output=True, text=True, timeout=10)


@dataclass(frozen=True)
class Cluster:
    """Namespaces `names[h]` (host h at `address(h)`) and `switch` between them."""

    names: tuple[str, ...]
    switch: str
    link: Link | None

    @property
    def addresses(self) -> list[str]:
        return [address(h) for h in range(len(self.names))]

    def exec_prefix(self, host: int) -> list[str]:
        """The words that run a command inside host `host`."""
        return ["ip", "netns", "exec", self.names[host]]

    def netns_id(self, host: int) -> str:
        """The namespace as /proc/PID/ns/net names it inside that host, e.g. 'net:[4026532246]'."""
        return f"net:[{os.stat(f'/run/netns/{self.names[host]}').st_ino}]"

    def link_bytes(self, host: int = 0) -> int:
        """Bytes host `host`'s uplink has sent plus received: all its traffic with the other hosts."""
        out = _ip("-n", self.names[host], "-s", "-j", "link", "show", LINK)
        stats = json.loads(out.stdout)[0]["stats64"]
        return stats["rx"]["bytes"] + stats["tx"]["bytes"]

    def pids(self, host: int) -> list[int]:
        """The processes still running inside host `host`."""
        return [int(pid) for pid in _ip("netns", "pids", self.names[host]).stdout.split()]

    def cut(self, host: int = 0) -> None:
        """Take host `host`'s link down, as if its cable were pulled."""
        _check(_ip("-n", self.names[host], "link", "set", LINK, "down"))

    def qdiscs(self, host: int) -> list[str]:
        """The kinds of the shaping qdiscs on host `host` (tbf on the uplink and on its ifb)."""
        out = _tc("-n", self.names[host], "-j", "qdisc", "show")
        return sorted(q["kind"] for q in json.loads(out.stdout or "[]") if q["kind"] == "tbf")

    def mapping(self) -> str:
        """`10.77.0.1=nsA,...`: the form tests/scripts/two_hosts_ssh.py reads from DISTRIB_TEST_NETNS."""
        return ",".join(f"{address(h)}={name}" for h, name in enumerate(self.names))

    def hosts_arg(self, per_host: int) -> str:
        """mpiexec's and launch's --hosts for `per_host` ranks on every host: `10.77.0.1:2,10.77.0.2:2`."""
        return ",".join(f"{a}:{per_host}" for a in self.addresses)


def unavailable(shaped: bool = False) -> str | None:
    """Why namespaces (and, if `shaped`, shaped links) cannot be made here, or None when they can."""
    need = ["ip", "tc"] if shaped else ["ip"]
    missing = [tool for tool in need if shutil.which(tool) is None]
    if missing:
        return f"no {' or '.join(missing)} command (iproute2) to make network namespaces"
    if os.geteuid() != 0:
        return "making network namespaces needs root"
    if shaped and not os.path.exists("/dev/net/tun"):
        return "no /dev/net/tun for the relay between hosts"
    probe = f"distrib-probe-{os.getpid()}-{next(_count)}"
    made = _ip("netns", "add", probe)
    if made.returncode:
        return f"cannot make a network namespace: {made.stderr.strip()}"
    _ip("netns", "delete", probe)
    return None


@contextmanager
def cluster(hosts: int, link: Link | None = None) -> Iterator[Cluster]:
    """Make `hosts` namespace hosts and their switch; afterwards kill everything left inside and delete them."""
    _delete_orphans()
    tag = f"{os.getpid()}-{next(_count)}"
    made = Cluster(tuple(f"distrib-h{h}-{tag}" for h in range(hosts)), f"distrib-sw-{tag}", link)
    relay = None
    try:
        for name in (made.switch, *made.names):
            _check(_ip("netns", "add", name))
            _check(_ip("-n", name, "link", "set", "lo", "up"))
        if link is None:
            _bridge(made)
        else:
            relay = _relay(made, link)
        yield made
        if relay is not None and relay.poll() is not None:
            raise RuntimeError(f"the relay between hosts died during the test: {relay.stdout.read()[-2000:]}")
    finally:
        for name in (*made.names, made.switch):
            pids = _ip("netns", "pids", name).stdout.split()
            for pid in pids:  # all started by this test, inside its own namespaces
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass
        if relay is not None:
            relay.kill()
            relay.wait()
            relay.stdout.close()
        for name in (*made.names, made.switch):
            _ip("netns", "delete", name)  # also removes its links, and with them their qdiscs


@contextmanager
def two_hosts() -> Iterator[Cluster]:
    """Two unshaped hosts."""
    with cluster(2) as made:
        yield made


def leftovers(made: Cluster) -> list[str]:
    """What of `made` still exists after its context ended: namespaces, and (never expected) links or qdiscs of ours
    in this namespace."""
    tag = made.switch.removeprefix("distrib-sw-")
    left = [name for name in _ip("netns", "list").stdout.split() if name.endswith(tag)]
    links = json.loads(_ip("-j", "link", "show").stdout or "[]")
    left += [f"link {x['ifname']}" for x in links if tag in x["ifname"]]
    qdiscs = json.loads(_tc("-j", "qdisc", "show").stdout or "[]")
    left += [f"qdisc {q['kind']} on {q.get('dev')}" for q in qdiscs if tag in str(q.get("dev"))]
    return left


def _delete_orphans() -> None:
    """Delete namespaces of ours (distrib-h0-PID-N, distrib-sw-PID-N) whose maker PID no longer runs."""
    for name in _ip("netns", "list").stdout.split():
        parts = name.split("-")
        if len(parts) == 4 and parts[0] == "distrib" and parts[2].isdigit() and not Path(f"/proc/{parts[2]}").exists():
            for pid in _ip("netns", "pids", name).stdout.split():
                os.kill(int(pid), signal.SIGKILL)
            _ip("netns", "delete", name)


def _bridge(made: Cluster) -> None:
    """The switch as a bridge; host h reaches it through a veth pair (uplink in h, p{h} on the bridge)."""
    sw = made.switch
    _check(_ip("-n", sw, "link", "add", "br0", "type", "bridge"))
    _check(_ip("-n", sw, "link", "set", "br0", "up"))
    for h, name in enumerate(made.names):
        # Both ends are made inside their namespaces, so the link names never meet another run's.
        _check(_ip("link", "add", LINK, "netns", name, "type", "veth", "peer", "name", f"p{h}", "netns", sw))
        _check(_ip("-n", sw, "link", "set", f"p{h}", "master", "br0", "up"))
        _check(_ip("-n", name, "addr", "add", f"{address(h)}/24", "dev", LINK))
        _check(_ip("-n", name, "link", "set", LINK, "up"))


def _relay(made: Cluster, link: Link) -> subprocess.Popen:
    """Start tests/wire.py in the switch, move its devices into the hosts, shape each host's rate both ways."""
    command = ["ip", "netns", "exec", made.switch, sys.executable, str(WIRE), str(len(made.names)), str(link.delay_us)]
    relay = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    ready, _, _ = select.select([relay.stdout], [], [], READY_SECONDS)
    line = relay.stdout.readline() if ready else ""
    if line.strip() != "ready":
        relay.kill()
        raise RuntimeError(f"the relay between hosts did not start: {line}{relay.stdout.read()[-2000:]}")
    # tbf paces at `rate` but lets a burst through at once; peakrate just above it (with a bucket of one frame)
    # serialises every frame at the rate, as a real link does.
    shape = ["tbf", "rate", f"{link.gbit * 1000:g}mbit", "burst", str(2 * link.mtu), "latency", "100ms"]
    shape += ["peakrate", f"{link.gbit * 1001:g}mbit", "mtu", str(link.mtu + 100)]
    for h, name in enumerate(made.names):
        _check(_ip("-n", made.switch, "link", "set", f"h{h}", "netns", name))
        _check(_ip("-n", name, "link", "set", f"h{h}", "name", LINK))
        _check(_ip("-n", name, "addr", "add", f"{address(h)}/24", "dev", LINK))
        _check(_ip("-n", name, "link", "set", LINK, "mtu", str(link.mtu), "txqueuelen", "1000", "up"))
        _check(_tc("-n", name, "qdisc", "add", "dev", LINK, "root", *shape))
        _check(_ip("-n", name, "link", "add", "ifb0", "type", "ifb"))
        _check(_ip("-n", name, "link", "set", "ifb0", "up"))
        _check(_tc("-n", name, "qdisc", "add", "dev", LINK, "handle", "ffff:", "ingress"))
        redirect = ["action", "mirred", "egress", "redirect", "dev", "ifb0"]
        _check(_tc("-n", name, "filter", "add", "dev", LINK, "parent", "ffff:", "protocol", "all", "u32",
                   "match", "u32", "0", "0", *redirect))  # fmt: skip
        _check(_tc("-n", name, "qdisc", "add", "dev", "ifb0", "root", *shape))
    return relay


def _check(result: subprocess.CompletedProcess) -> None:
    if result.returncode:
        raise RuntimeError(f"`{' '.join(result.args)}` failed: {result.stderr.strip()}")
