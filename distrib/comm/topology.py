"""Which ranks share a host: found once by one allgather, so every rank holds the same answer.

A host is a machine as its processes see it: its hostname and network namespace (containers and the test
harness's namespaces are hosts of their own). The hierarchical algorithm splits the world along it, and
algorithm "auto" reads its shape (hosts, ranks per host) to predict each algorithm's time.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass


@dataclass(frozen=True)
class Topology:
    """`hosts[h]`: the ranks on host h, ascending; hosts in order of their lowest rank."""

    hosts: tuple[tuple[int, ...], ...]

    @classmethod
    def of(cls, places: list[object]) -> Topology:
        """From each rank's place (anything comparable, indexed by rank): ranks with equal places share a host."""
        first: dict[object, list[int]] = {}
        for rank, place in enumerate(places):
            first.setdefault(place, []).append(rank)
        return cls(tuple(tuple(ranks) for ranks in first.values()))

    @property
    def size(self) -> int:
        return sum(len(ranks) for ranks in self.hosts)

    @property
    def even(self) -> bool:
        """Every host has the same number of ranks."""
        return len({len(ranks) for ranks in self.hosts}) == 1

    @property
    def per_host(self) -> int:
        """Ranks on the fullest host."""
        return max(len(ranks) for ranks in self.hosts)

    def host_of(self, rank: int) -> int:
        return next(h for h, ranks in enumerate(self.hosts) if rank in ranks)

    def local_index(self, rank: int) -> int:
        """The rank's position among the ranks of its host."""
        return self.hosts[self.host_of(rank)].index(rank)

    def describe(self) -> str:
        sizes = [len(ranks) for ranks in self.hosts]
        if self.even:
            return f"{len(sizes)} host(s) x {sizes[0]} rank(s)"
        return f"{len(sizes)} hosts of {sizes} ranks"


def place() -> tuple[str, str]:
    """This process's host: its hostname and network namespace."""
    try:
        netns = os.readlink("/proc/self/ns/net")
    except OSError:
        netns = ""
    return socket.gethostname(), netns
