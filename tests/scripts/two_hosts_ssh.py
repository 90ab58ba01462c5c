#!/usr/bin/env python3
"""A stand-in for ssh that MPICH's hydra calls to start a proxy on a "host" that is a network namespace here.

hydra runs `ssh -x HOST "proxy" args...`; this runs the same command line inside the namespace that
DISTRIB_TEST_NETNS maps HOST to (`10.77.0.1=nsA,10.77.0.2=nsB`), as ssh's remote shell would.
"""

import os
import sys


def main(argv: list[str]) -> None:
    words = list(argv)
    while words and words[0].startswith("-"):  # ssh options hydra passes, such as -x (no X11 forwarding)
        words.pop(0)
    if len(words) < 2:
        sys.exit(f"two_hosts_ssh: expected [options] HOST COMMAND..., got {argv}")
    host, command = words[0], " ".join(words[1:])  # ssh joins the words and hands them to a shell
    pairs = dict(item.split("=", 1) for item in os.environ.get("DISTRIB_TEST_NETNS", "").split(",") if "=" in item)
    if host not in pairs:
        sys.exit(f"two_hosts_ssh: host {host!r} is not in DISTRIB_TEST_NETNS={os.environ.get('DISTRIB_TEST_NETNS')!r}")
    os.execvp("ip", ["ip", "netns", "exec", pairs[host], "sh", "-c", command])


if __name__ == "__main__":
    main(sys.argv[1:])
