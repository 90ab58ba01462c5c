"""python -m launch: the command lines it builds, its errors, real ranks through mpirun and torchrun, and
distrib/env.py's read_world against each launcher's variables."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from launch.commands import build, detect_mpi, mpirun, srun, torchrun, torchrun_program
from launch.hosts import parse_hosts, read_hostfile
from launch.job import Host, Job, UsageError

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
BIN = os.path.dirname(PY)
HAS_MPIEXEC = os.access(os.path.join(BIN, "mpiexec"), os.X_OK)
HAS_TORCHRUN = os.access(os.path.join(BIN, "torchrun"), os.X_OK)
needs_mpiexec = pytest.mark.skipif(not HAS_MPIEXEC, reason="no mpiexec beside this Python: pip install mpich")
needs_torchrun = pytest.mark.skipif(not HAS_TORCHRUN, reason="no torchrun beside this Python: pip install torch")


def _env_module():
    """distrib/env.py loaded by path, so the test does not import the rest of distrib (or torch)."""
    spec = importlib.util.spec_from_file_location("distrib_env_under_test", ROOT / "distrib" / "env.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while building World
    spec.loader.exec_module(module)
    return module


ENV = _env_module()


def launch(*args: str, python: str = PY, env: dict[str, str] | None = None, timeout: float = 60):
    argv = [python, "-m", "launch", *args]
    return subprocess.run(argv, check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def job(n: int, *command: str, hosts: str | None = None, **kwargs) -> Job:
    return Job(n, command or ("python", "t.py"), parse_hosts(hosts) if hosts else (), **kwargs)


# ---- command lines -------------------------------------------------------------------------------------


def words(line: str) -> list[str]:
    """A command line written as in a shell, with PY standing for this interpreter."""
    return [PY if word == "PY" else word for word in shlex.split(line)]


@needs_mpiexec
def test_default_is_the_mpiexec_next_to_python_and_a_bare_python_means_this_one():
    result = launch("-n", "2", "--dry-run", "--", "python", "-c", "print('hi there')")
    assert result.returncode == 0, result.stderr
    expected = [os.path.join(BIN, "mpiexec"), *words("-n 2 -bind-to none PY -c"), "print('hi there')"]
    assert shlex.split(result.stdout) == expected


def test_mpich_hosts_and_hostfile(tmp_path):
    expected = words("mpiexec -n 4 -hosts a:2,b:2 -bind-to none PY t.py")
    assert mpirun(job(4, hosts="a:2,b:2"), "mpiexec", "mpich") == expected
    path = tmp_path / "hosts"
    path.write_text("# two nodes\na:2\nb:2  # the second\n")
    hosts, form = read_hostfile(str(path))
    assert hosts == (Host("a", 2), Host("b", 2)) and form == "mpich"
    spec = Job(4, ("./a.out",), hosts, str(path))
    assert mpirun(spec, "mpiexec", "mpich", form) == words(f"mpiexec -n 4 -f {path} -bind-to none ./a.out")
    with pytest.raises(UsageError, match="is in mpich's form; openmpi reads `a slots=2`"):
        mpirun(spec, "mpirun", "openmpi", form)


@pytest.mark.parametrize("uid", [0, 1000])
def test_openmpi_flags(monkeypatch, uid):
    monkeypatch.setattr("launch.commands.os.geteuid", lambda: uid)
    root = "--allow-run-as-root" if uid == 0 else ""
    one_host = words(f"mpirun -n 3 --oversubscribe {root} --bind-to none PY t.py")
    assert mpirun(job(3), "mpirun", "openmpi") == one_host
    two_hosts = words(f"mpirun -n 3 --host a:2,b:1 {root} --bind-to none PY t.py")
    assert mpirun(job(3, hosts="a:2,b"), "mpirun", "openmpi") == two_hosts


def test_detect_mpi_from_version_text(tmp_path):
    versions = {
        "openmpi": "mpirun (Open MPI) 4.1.5\n\nReport bugs to http://www.open-mpi.org/community/help/",
        "mpich": "HYDRA build details:\n    Version:                                 4.1.2",
        "intel": "Intel(R) MPI Library for Linux* OS, Version 2021.10",
    }
    for name, text in versions.items():
        fake = tmp_path / name
        fake.write_text(f"#!/bin/sh\ncat <<'END'\n{text}\nEND\n")
        fake.chmod(0o755)
    assert [detect_mpi(str(tmp_path / name)) for name in ("openmpi", "mpich")] == ["openmpi", "mpich"]
    with pytest.raises(UsageError, match="neither MPICH nor Open MPI .*Intel"):
        detect_mpi(str(tmp_path / "intel"))
    if HAS_MPIEXEC:
        assert detect_mpi(os.path.join(BIN, "mpiexec")) == "mpich"


def test_openmpi_end_to_end_with_a_fake_mpiexec_next_to_python(tmp_path):
    """The CLI finds the launcher beside its interpreter, asks it which MPI it is, and uses its flags."""
    (tmp_path / "python").symlink_to(PY)
    fake = tmp_path / "mpiexec"
    fake.write_text("#!/bin/sh\necho 'mpirun (Open MPI) 5.0.3'\n")
    fake.chmod(0o755)
    env = {"PATH": str(tmp_path), "PYTHONPATH": str(ROOT)}
    result = launch("-n", "2", "--dry-run", "--", "./app", python=str(tmp_path / "python"), env=env)
    assert result.returncode == 0, result.stderr
    root = "--allow-run-as-root" if os.geteuid() == 0 else ""
    assert shlex.split(result.stdout) == words(f"{fake} -n 2 --oversubscribe {root} --bind-to none ./app")


def test_torchrun_one_host_and_program_forms():
    expected = words("torchrun --standalone --nnodes 1 --nproc-per-node 2 -m distrib.train --epochs 1")
    assert torchrun(job(2, "python", "-m", "distrib.train", "--epochs", "1"), "torchrun") == expected
    assert torchrun_program(("python3", "train.py", "-x")) == ["train.py", "-x"]
    expected = words("--no-python /usr/bin/python3.11 -c 0")
    assert torchrun_program(("/usr/bin/python3.11", "-c", "0")) == expected
    assert torchrun_program(("python", "-u", "t.py")) == words("--no-python PY -u t.py")
    with pytest.raises(UsageError, match="'./train.sh' is not python; write .* `python script.py"):
        torchrun_program(("./train.sh",))
    for bare in (("python",), ("python", "-m")):
        with pytest.raises(UsageError, match="names no program"):
            torchrun_program(bare)


def test_torchrun_multi_host(monkeypatch):
    rdzv = "--rdzv-backend c10d --rdzv-endpoint"
    expected = words(f"torchrun --nnodes 2 --nproc-per-node 2 {rdzv} a:29500 t.py")
    assert torchrun(job(4, hosts="a:2,b:2"), "torchrun") == expected
    uneven = job(3, hosts="a:2,b:1", node_rank=1, rdzv_endpoint="a:1234")
    assert torchrun(uneven, "torchrun") == words(f"torchrun --nnodes 2 --nproc-per-node 1 {rdzv} a:1234 t.py")
    monkeypatch.setattr("launch.commands.socket.gethostname", lambda: "b.cluster.example")
    assert torchrun(job(3, hosts="a:2,b:1"), "torchrun")[4] == "1"  # found by host name
    monkeypatch.setattr("launch.commands.socket.gethostname", lambda: "elsewhere")
    with pytest.raises(UsageError, match=r"--node-rank: .* this host \(elsewhere\) is not one of them"):
        torchrun(job(3, hosts="a:2,b:1"), "torchrun")
    with pytest.raises(UsageError, match="--rdzv-endpoint 'a': write HOST:PORT"):
        torchrun(job(4, hosts="a:2,b:2", rdzv_endpoint="a"), "torchrun")


def test_srun():
    assert srun(job(4), "srun") == words("srun -n 4 --cpu-bind=none PY t.py")
    expected = words("srun -n 4 --nodes 2 --ntasks-per-node 2 --nodelist a,b --cpu-bind=none PY t.py")
    assert srun(job(4, hosts="a:2,b:2"), "srun") == expected
    with pytest.raises(UsageError, match="same number of tasks on every node, but the hosts are a:2,b:1"):
        srun(job(3, hosts="a:2,b:1"), "srun")


def test_torchrun_options_are_refused_for_mpirun():
    with pytest.raises(UsageError, match="--node-rank and --rdzv-endpoint only apply to --via torchrun"):
        build(job(4, hosts="a:2,b:2", node_rank=1), "mpirun")


def test_hostfile_forms_and_errors(tmp_path):
    path = tmp_path / "hosts"
    for text, expected in [
        ("a slots=2 max_slots=4\nb slots=1\n", ((Host("a", 2), Host("b", 1)), "openmpi")),
        ("a\nb\n", ((Host("a", 1), Host("b", 1)), None)),
    ]:
        path.write_text(text)
        assert read_hostfile(str(path)) == expected
    for text, message in [
        ("a:2\nb slots=2\n", "mixes `host:slots` and `host slots=N`"),
        ("a=2\n", "line 1: cannot read 'a=2'"),
        ("# nothing\n", "names no hosts"),
        ("a:1\na:1\n", "host a is listed twice"),
        ("a:0\n", "host a has 0 slots"),
    ]:
        path.write_text(text)
        with pytest.raises(UsageError, match=message):
            read_hostfile(str(path))


# ---- the CLI's errors: exit 2, one line naming the option, no traceback ---------------------------------


@pytest.mark.parametrize(
    "args, message",
    [
        (["-n", "0", "--", "x"], "-n must be at least 1, got 0"),
        (["-n", "3", "--hosts", "a:2,b:2", "--", "x"], "--hosts gives 4 slots (a:2,b:2) but -n is 3"),
        (["-n", "2", "--hosts", "a:x", "--", "x"], "--hosts: cannot read 'a:x'"),
        (["-n", "2", "--hostfile", "/no/such/hosts", "--", "x"], "--hostfile /no/such/hosts: no such file"),
        (
            ["-n", "2", "--hosts", "a:2", "--hostfile", "f", "--", "x"],
            "argument --hostfile: not allowed with",
        ),
        (["-n", "2", "--node-rank", "1", "--", "x"], "--node-rank needs --hosts or --hostfile"),
        (["-n", "2", "--hosts", "a:1,b:1", "--node-rank", "2", "--", "x"], "--node-rank 2 is not the index"),
        (["-n", "2", "--via", "ssh", "--", "x"], "argument --via: invalid choice: 'ssh'"),
        (["-n", "2", "python", "t.py"], "put the command after --"),
        (["-n", "2", "--"], "no command after --"),
        (["--", "x"], "the following arguments are required: -n/--nprocs"),
        (["-n", "2", "--via", "torchrun", "--", "bash", "t.sh"], "'bash' is not python"),
    ],
)
def test_bad_arguments(args, message):
    result = launch(*args, timeout=30)
    assert result.returncode == 2
    assert result.stdout == "" and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("python -m launch: error: ") and message in result.stderr


@pytest.mark.parametrize(
    "via, message",
    [
        (
            "mpirun",
            "mpirun: no mpiexec or mpirun next to {} or on PATH; install it with: pip install mpi4py mpich",
        ),
        ("torchrun", "--via torchrun: no torchrun next to {} or on PATH; install it with: pip install torch"),
        ("srun", "--via srun: Slurm is not installed on this machine (no srun on PATH)"),
        (None, "no launcher: neither mpiexec, mpirun nor torchrun is next to {}"),
    ],
)
def test_missing_launcher(tmp_path, via, message):
    # A Python with nothing beside it and a PATH with nothing on it: no launcher can be found.
    python = tmp_path / "python"
    python.symlink_to(PY)
    env = {"PATH": str(tmp_path), "PYTHONPATH": str(ROOT)}
    choice = ["--via", via] if via else []
    result = launch("-n", "2", *choice, "--", "python", "t.py", python=str(python), env=env)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert message.format(python) in result.stderr


def test_launch_does_not_import_torch():
    code = (
        "import sys\nfrom launch.__main__ import main\n"
        "assert main(['-n', '2', '--via', 'torchrun', '--dry-run', '--', 'python', '-m', 'x']) == 0\n"
        "assert main(['-n', '4', '--hosts', 'a:2,b:2', '--dry-run', '--', 'python', 't.py']) == 0\n"
        "print('torch' in sys.modules)"
    )
    result = subprocess.run([PY, "-c", code], check=False, cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "False"


# ---- real ranks ------------------------------------------------------------------------------------------

RANK_SCRIPT = """
import importlib.util, json, sys
spec = importlib.util.spec_from_file_location("env_under_test", {path!r})
env = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = env
spec.loader.exec_module(env)
w = env.read_world()
print(json.dumps(dict(rank=w.rank, size=w.size, local_rank=w.local_rank, launcher=w.launcher)), flush=True)
"""


@pytest.mark.parametrize(
    "via, launcher",
    [
        pytest.param("mpirun", "mpich", marks=needs_mpiexec),
        pytest.param("torchrun", "torchrun", marks=needs_torchrun),
    ],
)
def test_ranks_find_themselves_through_read_world(tmp_path, via, launcher):
    script = tmp_path / "whoami.py"
    script.write_text(RANK_SCRIPT.format(path=str(ROOT / "distrib" / "env.py")))
    result = launch("-n", "2", "--via", via, "--", "python", str(script), timeout=120)
    assert result.returncode == 0, result.stderr
    # Ranks print at once, and unbuffered (PYTHONUNBUFFERED) a line's text and its newline are two writes, so two
    # ranks' lines can share one: find each JSON object anywhere.
    worlds = sorted((json.loads(found) for found in re.findall(r"\{[^{}]*\}", result.stdout)), key=str)
    assert worlds == [{"rank": r, "size": 2, "local_rank": r, "launcher": launcher} for r in (0, 1)]


@needs_mpiexec
def test_exit_status_passes_through_mpich():
    # MPICH's hydra exits with the ranks' own exit code.
    result = launch("-n", "2", "--", "python", "-c", "import sys; sys.exit(3)", timeout=60)
    assert result.returncode == 3, result.stderr


@needs_torchrun
def test_exit_status_passes_through_torchrun():
    # torchrun reports any failed worker as exit 1 (the worker's own code only in its error summary).
    result = launch("-n", "2", "--via", "torchrun", "--", "python", "-c", "import sys; sys.exit(3)", timeout=120)
    assert result.returncode == 1 and "exitcode  : 3" in result.stderr, result.stderr


# ---- read_world with each launcher's variables -----------------------------------------------------------


OPENMPI = "OMPI_COMM_WORLD_RANK=3 OMPI_COMM_WORLD_SIZE=4 OMPI_COMM_WORLD_LOCAL_RANK=1 OMPI_COMM_WORLD_LOCAL_SIZE=2"


def variables(text: str) -> dict[str, str]:
    return dict(item.split("=", 1) for item in text.split())


@pytest.mark.parametrize(
    "env, expected",
    [
        ("", (0, 1, 0, 1, "none")),
        ("PMI_RANK=1 PMI_SIZE=4 MPI_LOCALRANKID=1 MPI_LOCALNRANKS=2", (1, 4, 1, 2, "mpich")),
        (OPENMPI, (3, 4, 1, 2, "openmpi")),
        (
            "RANK=2 WORLD_SIZE=4 LOCAL_RANK=0 LOCAL_WORLD_SIZE=2 MASTER_ADDR=a MASTER_PORT=29500",
            (2, 4, 0, 2, "torchrun"),
        ),
        ("SLURM_PROCID=5 SLURM_NTASKS=6 SLURM_LOCALID=1 SLURM_NTASKS_PER_NODE=2", (5, 6, 1, 2, "slurm")),
        # mpirun inside an sbatch script: MPI's variables win over Slurm's
        ("SLURM_PROCID=0 SLURM_NTASKS=1 PMI_RANK=1 PMI_SIZE=2", (1, 2, 0, None, "mpich")),
        # one torchrun per host started by mpirun: torchrun's world is the job's
        ("PMI_RANK=1 PMI_SIZE=2 RANK=3 WORLD_SIZE=4", (3, 4, 0, None, "torchrun")),
    ],
)
def test_read_world(env, expected):
    world = ENV.read_world(variables(env))
    assert (world.rank, world.size, world.local_rank, world.local_size, world.launcher) == expected
    if "MASTER_ADDR" in env:
        assert (world.master_addr, world.master_port) == ("a", 29500)


@pytest.mark.parametrize(
    "env, message",
    [
        (
            "PMI_RANK=0 PMI_SIZE=2 OMPI_COMM_WORLD_RANK=1 OMPI_COMM_WORLD_SIZE=2",
            "MPICH says rank 0 of 2 but Open MPI",
        ),
        ("PMI_RANK=0 PMI_SIZE=2 RANK=1 WORLD_SIZE=2", "RANK=1 contradicts mpich's rank 0 in a world of 2"),
        ("RANK=0", "torchrun: RANK is set but WORLD_SIZE is not"),
        ("PMI_RANK=x PMI_SIZE=2", "mpich: PMI_RANK='x' is not an integer"),
        ("RANK=2 WORLD_SIZE=2", "torchrun: rank 2 is outside a world of size 2"),
        ("RANK=0 WORLD_SIZE=2 LOCAL_RANK=2 LOCAL_WORLD_SIZE=2", "local rank 2 is outside 2 local processes"),
    ],
)
def test_read_world_errors(env, message):
    with pytest.raises(ENV.LaunchError, match=re.escape(message)):
        ENV.read_world(variables(env))
