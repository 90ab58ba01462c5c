"""Command lines for the launchers we drive: MPICH's and Open MPI's mpirun, torchrun, and Slurm's srun."""

from __future__ import annotations

import os
import re
import shlex
import socket
import subprocess
import sys

from launch.job import Job, UsageError, find_program

VIAS = ("mpirun", "torchrun", "srun")
RDZV_PORT = 29500  # torchrun's own default port, so a hand-written rendezvous endpoint meets ours
_PYTHON = re.compile(r"python(\d+(\.\d+)?)?")


def build(job: Job, via: str | None = None, hostfile_form: str | None = None) -> list[str]:
    """The full command that starts `job` through `via` (None: mpirun when installed, else torchrun)."""
    if via is None:
        via = "mpirun" if find_program("mpiexec", "mpirun") else "torchrun"
        if not find_program("torchrun") and via == "torchrun":
            raise UsageError(
                f"no launcher: neither mpiexec, mpirun nor torchrun is next to {sys.executable} or on PATH; "
                "install one with: pip install mpi4py mpich (or pip install torch for torchrun)"
            )
    if via != "torchrun" and (job.node_rank is not None or job.rdzv_endpoint is not None):
        raise UsageError(
            f"--node-rank and --rdzv-endpoint only apply to --via torchrun; {via} starts every host's ranks"
        )
    if via == "mpirun":
        program = _need(via, ("mpiexec", "mpirun"), "pip install mpi4py mpich")
        return mpirun(job, program, detect_mpi(program), hostfile_form)
    if via == "torchrun":
        return torchrun(job, _need(via, ("torchrun",), "pip install torch"))
    if via == "srun":
        program = find_program("srun")
        if program is None:
            raise UsageError("--via srun: Slurm is not installed on this machine (no srun on PATH)")
        return srun(job, program)
    raise UsageError(f"--via {via!r}: choose one of {', '.join(VIAS)}")


def _need(via: str, names: tuple[str, ...], install: str) -> str:
    program = find_program(*names)
    if program is None:
        raise UsageError(
            f"--via {via}: no {' or '.join(names)} next to {sys.executable} or on PATH; install it with: {install}"
        )
    return program


def detect_mpi(program: str) -> str:
    """Which MPI `program` belongs to, "mpich" or "openmpi", from its --version (their flags differ)."""
    try:
        result = subprocess.run([program, "--version"], check=False, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise UsageError(f"--via mpirun: `{program} --version` failed ({error}); use --via torchrun") from None
    text = result.stdout + result.stderr
    if "HYDRA" in text or "MPICH" in text:
        return "mpich"
    if "Open MPI" in text or "OpenRTE" in text:
        return "openmpi"
    first = text.strip().splitlines()[0] if text.strip() else "no output"
    raise UsageError(
        f"--via mpirun: {program} is neither MPICH nor Open MPI ({first!r}); "
        "install MPICH next to this Python with: pip install mpich, or use --via torchrun"
    )


def mpirun(job: Job, program: str, flavour: str, hostfile_form: str | None = None) -> list[str]:
    """MPICH hydra's or Open MPI's line; neither binds ranks to cores, as torch runs threads in each rank."""
    if job.hostfile and hostfile_form not in (None, flavour):
        example = "a:2" if flavour == "mpich" else "a slots=2"
        raise UsageError(f"--hostfile {job.hostfile} is in {hostfile_form}'s form; {flavour} reads `{example}`")
    argv = [program, "-n", str(job.nprocs)]
    if flavour == "mpich":
        if job.hostfile:
            argv += ["-f", job.hostfile]
        elif job.hosts:
            argv += ["-hosts", job.layout]
        argv += ["-bind-to", "none"]
    else:
        if job.hostfile:
            argv += ["--hostfile", job.hostfile]
        elif job.hosts:
            argv += ["--host", job.layout]
        else:
            # Open MPI offers one slot per physical core, which Python cannot count portably; on one host,
            # more ranks than that is what the user asked for, so allow it rather than guess.
            argv.append("--oversubscribe")
        if os.geteuid() == 0:
            argv.append("--allow-run-as-root")
        argv += ["--bind-to", "none"]
    return [*argv, *_resolve_python(job.command)]


def torchrun(job: Job, program: str) -> list[str]:
    """This host's torchrun line: standalone on one host; with hosts, a c10d rendezvous every host joins."""
    if not job.hosts:
        options = ["--standalone", "--nnodes", "1", "--nproc-per-node", str(job.nprocs)]
    else:
        endpoint = job.rdzv_endpoint or f"{job.hosts[0].name}:{RDZV_PORT}"
        if not re.fullmatch(r"[^\s:]+:\d+", endpoint):
            raise UsageError(f"--rdzv-endpoint {endpoint!r}: write HOST:PORT, e.g. {job.hosts[0].name}:{RDZV_PORT}")
        # No --node-rank for torchrun: c10d numbers the nodes itself and torchrun ignores it (with a warning).
        # Ours only picks this host's slot count out of the list.
        options = [
            "--nnodes", str(len(job.hosts)),
            "--nproc-per-node", str(job.hosts[_this_node(job)].slots),
            "--rdzv-backend", "c10d",
            "--rdzv-endpoint", endpoint,
        ]  # fmt: skip
    return [program, *options, *torchrun_program(job.command)]


def _this_node(job: Job) -> int:
    if job.node_rank is not None:
        return job.node_rank
    if len({host.slots for host in job.hosts}) == 1:
        return 0  # every host runs the same number of ranks: the line is the same everywhere
    names = [host.name for host in job.hosts]
    for name in (socket.gethostname(), socket.gethostname().split(".")[0]):
        if name in names:
            return names.index(name)
    raise UsageError(
        f"--node-rank: the hosts run different numbers of ranks ({job.layout}) and this host "
        f"({socket.gethostname()}) is not one of them; pass --node-rank K, its index in the list"
    )


def torchrun_program(command: tuple[str, ...]) -> list[str]:
    """torchrun's form of `python ...`: `-m module args`, `script.py args`, or `--no-python python -c ...`.

    torchrun starts the first two with its own interpreter: the one beside it, which is this one.
    """
    word, *rest = command
    if not _PYTHON.fullmatch(os.path.basename(word)):
        raise UsageError(
            f"--via torchrun starts Python programs and {word!r} is not python; write the command as "
            "`python script.py ...` or `python -m module ...`, or use --via mpirun"
        )
    if rest in ([], ["-m"]):
        raise UsageError(f"--via torchrun: `{shlex.join(command)}` names no program; add script.py or -m module")
    if rest[0] == "-m" or not rest[0].startswith("-"):
        return rest
    # -c code, or interpreter options before the program: torchrun starts that interpreter line as it is.
    return ["--no-python", *_resolve_python(command)]


def srun(job: Job, program: str) -> list[str]:
    """Slurm's srun line: N tasks; with hosts, the same count on each (--ntasks-per-node is one number)."""
    argv = [program, "-n", str(job.nprocs)]
    if job.hosts:
        slots = {host.slots for host in job.hosts}
        if len(slots) > 1:
            raise UsageError(f"--via srun runs the same number of tasks on every node, but the hosts are {job.layout}")
        argv += ["--nodes", str(len(job.hosts)), "--ntasks-per-node", str(slots.pop())]
        argv += ["--nodelist", ",".join(host.name for host in job.hosts)]
    return [*argv, "--cpu-bind=none", *_resolve_python(job.command)]


def _resolve_python(command: tuple[str, ...]) -> list[str]:
    """A bare `python` means this interpreter, so the ranks run the Python (and venv) that runs the launch."""
    word, *rest = command
    return [sys.executable if _PYTHON.fullmatch(word) else word, *rest]
