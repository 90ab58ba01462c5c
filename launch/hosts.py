"""Hosts and slots from `--hosts a:2,b:2`, or a hostfile of MPICH (`a:2`) or Open MPI (`a slots=2`) lines."""

from __future__ import annotations

import re
from pathlib import Path

from launch.job import Host, UsageError

_NAME = r"(?P<name>[A-Za-z0-9_.\-\[\]]+)"
_MPICH_LINE = re.compile(_NAME + r"(?::(?P<slots>\d+))?")
_OPENMPI_LINE = re.compile(_NAME + r"(?:\s+slots\s*=\s*(?P<slots>\d+))?(?:\s+max[_-]slots\s*=\s*\d+)?")


def parse_hosts(text: str) -> tuple[Host, ...]:
    """`a:2,b:2` as hosts; a name without `:slots` runs one rank, as in MPICH."""
    hosts = []
    for item in text.split(","):
        match = _MPICH_LINE.fullmatch(item.strip())
        if match is None:
            raise UsageError(f"--hosts: cannot read {item!r} in {text!r}; write host:slots, e.g. a:2,b:2")
        hosts.append(_host(match, f"--hosts {text}"))
    return _distinct(hosts, "--hosts")


def read_hostfile(path: str) -> tuple[tuple[Host, ...], str | None]:
    """The hosts in a hostfile and its form: "mpich" (`a:2`), "openmpi" (`a slots=2`) or None (names only)."""
    file = Path(path)
    if not file.is_file():
        raise UsageError(f"--hostfile {path}: no such file")
    hosts, forms = [], set()
    for number, line in enumerate(file.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        match = _MPICH_LINE.fullmatch(line) or _OPENMPI_LINE.fullmatch(line)
        if match is None:
            raise UsageError(
                f"--hostfile {path} line {number}: cannot read {line!r}; "
                "write `host:slots` (MPICH) or `host slots=N` (Open MPI)"
            )
        if match.group("slots") is not None:
            forms.add("mpich" if ":" in line else "openmpi")
        hosts.append(_host(match, f"--hostfile {path} line {number}"))
    if not hosts:
        raise UsageError(f"--hostfile {path}: names no hosts")
    if len(forms) > 1:
        raise UsageError(f"--hostfile {path} mixes `host:slots` and `host slots=N` lines; use one form")
    return _distinct(hosts, f"--hostfile {path}"), forms.pop() if forms else None


def _host(match: re.Match[str], where: str) -> Host:
    slots = int(match.group("slots") or 1)
    if slots < 1:
        raise UsageError(f"{where}: host {match.group('name')} has {slots} slots; give it at least 1")
    return Host(match.group("name"), slots)


def _distinct(hosts: list[Host], where: str) -> tuple[Host, ...]:
    names = [host.name for host in hosts]
    for name in names:
        if names.count(name) > 1:
            raise UsageError(f"{where}: host {name} is listed twice; list each host once with all its slots")
    return tuple(hosts)
