"""The switch between namespace hosts: a relay that carries IP packets from host to host after a fixed delay.

    python tests/wire.py HOSTS DELAY_US     (run inside the switch namespace; tests/netns.py starts it)

It makes one TUN device per host, h0 .. h{HOSTS-1}, prints "ready", and then forwards each IPv4 packet read from
any of them to the device of the host its destination address names (10.77.0.{h+1}), DELAY_US microseconds later,
in order. The harness moves each device into its host, where tc shapes its rate both ways.

Why a relay: tc's netem adds delay, but this machine's kernel is built without it (CONFIG_NET_SCH_NETEM is not
set); tbf is there and shapes the rate. A relay in user space can delay; it runs at real-time priority, as the
NICs and switch it stands for would not wait for a core.
"""

from __future__ import annotations

import collections
import ctypes
import fcntl
import os
import select
import struct
import sys
import time

TUNSETIFF = 0x400454CA
IFF_TUN, IFF_NO_PI = 0x0001, 0x1000
PR_SET_TIMERSLACK = 29
SUBNET = bytes([10, 77, 0])
BATCH = 64  # packets read from one device before looking at the others


def tun(name: str) -> int:
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TUN | IFF_NO_PI))
    return fd


def relay(fds: list[int], delay: float) -> None:
    """Forever: read packets, queue them due `delay` seconds after arrival, write each out when due."""
    route = {SUBNET + bytes([h + 1]): fd for h, fd in enumerate(fds)}
    queue: collections.deque[tuple[float, int, bytes]] = collections.deque()  # one delay: arrival order is due order
    while True:
        timeout = max(0.0, queue[0][0] - time.monotonic()) if queue else None
        readable, _, _ = select.select(fds, [], [], timeout)
        now = time.monotonic()
        for fd in readable:
            for _ in range(BATCH):
                try:
                    packet = os.read(fd, 65536)
                except BlockingIOError:
                    break
                out = route.get(packet[16:20]) if packet[:1] and packet[0] >> 4 == 4 else None
                if out is not None:  # IPv4 to a host of ours; anything else (IPv6 chatter) goes nowhere
                    queue.append((now + delay, out, packet))
        now = time.monotonic()
        while queue and queue[0][0] <= now:
            _, out, packet = queue.popleft()
            try:
                os.write(out, packet)
            except OSError:  # that host's link is down (a test cut it): the packet is lost, as on a wire
                pass


def main(argv: list[str]) -> None:
    hosts, delay_us = int(argv[0]), float(argv[1])
    ctypes.CDLL(None).prctl(PR_SET_TIMERSLACK, 1000, 0, 0, 0)  # wake within 1 us of the due time, not 50
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))
    except (OSError, AttributeError):
        os.nice(-10)
    fds = [tun(f"h{h}") for h in range(hosts)]
    print("ready", flush=True)
    relay(fds, delay_us * 1e-6)


if __name__ == "__main__":
    main(sys.argv[1:])
