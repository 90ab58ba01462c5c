"""python -m launch -n N [--via mpirun|torchrun|srun] [--hosts a:2,b:2 | --hostfile F] [--dry-run] -- COMMAND

Builds the command line for an existing launcher and becomes it (exec), so its exit status is the launcher's.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys

from launch.commands import VIAS, build
from launch.hosts import parse_hosts, read_hostfile
from launch.job import Job, UsageError

PROG = "python -m launch"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        """One line naming the option, instead of argparse's usage block."""
        self.exit(2, f"{PROG}: error: {message} (see {PROG} --help)\n")


def _parser() -> _Parser:
    parser = _Parser(
        prog=PROG,
        usage=f"{PROG} -n N [--via LAUNCHER] [--hosts a:2,b:2 | --hostfile F] [--dry-run] -- COMMAND ...",
        description="Start N ranks of COMMAND through mpirun, torchrun or srun, on this host or several.",
        epilog="Example: python -m launch -n 4 -- python -m distrib.train",
    )
    parser.add_argument("-n", "--nprocs", type=int, required=True, help="number of ranks in all")
    parser.add_argument("--via", choices=VIAS, help="launcher (default: mpirun if installed, else torchrun)")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--hosts", help="hosts and ranks on each, e.g. a:2,b:2 (default: all on this host)")
    where.add_argument("--hostfile", help="a file of `host:slots` (MPICH) or `host slots=N` (Open MPI) lines")
    parser.add_argument("--node-rank", type=int, help="torchrun: this host's index in --hosts")
    parser.add_argument("--rdzv-endpoint", help="torchrun: HOST:PORT of the rendezvous (default: first host:29500)")
    parser.add_argument("--dry-run", action="store_true", help="print the command instead of running it")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse `argv`, then print (--dry-run) or exec the launcher's command; 2 on a usage error."""
    argv = sys.argv[1:] if argv is None else argv
    if "--" not in argv:
        if {"-h", "--help"} & set(argv):
            _parser().parse_args(argv)
        _parser().error("put the command after --, e.g. python -m launch -n 2 -- python train.py")
    split = argv.index("--")
    args = _parser().parse_args(argv[:split])
    try:
        hosts, form = (), None
        if args.hosts is not None:
            hosts = parse_hosts(args.hosts)
        elif args.hostfile is not None:
            hosts, form = read_hostfile(args.hostfile)
        job = Job(args.nprocs, tuple(argv[split + 1 :]), hosts, args.hostfile, args.node_rank, args.rdzv_endpoint)
        command = build(job, args.via, form)
    except UsageError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(shlex.join(command))
        return 0
    sys.stdout.flush()
    os.execv(command[0], command)  # become the launcher: its exit status and signals are the job's


if __name__ == "__main__":
    sys.exit(main())
