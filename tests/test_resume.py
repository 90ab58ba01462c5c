"""Failures under real launchers: a rank SIGKILLed mid-epoch, a Ctrl-C or SIGTERM to the launcher, a NaN on one
rank; then --resume, at the same world size (bitwise the uninterrupted run) and at others (within rtol 1e-5).

Faults come from tests/faulty.py, at a chosen step on a chosen rank, so every run is reproducible.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
import torch

from distrib import train
from tests.launching import ROOT, TORCHRUN, launcher_command, run, run_ranks

TRAIN = ["-m", "distrib.train", "--no-progress", "--task", "tests.faulty:task", "--epochs", "2"]
TRAIN += ["--batch-size", "1000", "--timeout", "5"]  # 17 steps an epoch; peers wait 5 s for each other
NOISE = {"DISTRIB_TEST_NOISE": "1"}  # inputs jittered by each rank's RNG: exactness needs the RNG states


def load(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)


def newest(out: Path) -> str:
    return max(p.name for p in (out / "checkpoints").iterdir())


def leftovers(marker: str, wait: float = 5.0) -> list[str]:
    """Command lines of processes still running with `marker` in them (after up to `wait` s for them to end)."""
    deadline = time.monotonic() + wait
    while True:
        found = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if marker in cmdline and int(pid) != os.getpid():
                found.append(f"{pid}: {cmdline}")
        if not found or time.monotonic() > deadline:
            return found
        time.sleep(0.2)


def signal_midway(launcher: str, n: int, args: list[str], marker: Path, signum: int, env: dict[str, str]):
    """Start the job; when rank 0 touches `marker` (and slows down), send `signum` to the launcher only."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **env, "DISTRIB_TEST_MARKER": str(marker)}
    cmd = launcher_command(launcher, n, args)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 150
        while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert marker.exists(), f"rank 0 never reached the pause: {proc.poll()} {' '.join(cmd)}"
        proc.send_signal(signum)
        out, err = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:  # a hang: take the whole session down, then fail
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[str, torch.Tensor]:
    """The uninterrupted run at 2 ranks. Both launchers' backends give it bitwise: averaging two gradients is
    one addition, and a + b == b + a exactly in IEEE arithmetic."""
    out = tmp_path_factory.mktemp("reference")
    result = run_ranks("mpiexec", 2, [*TRAIN, "--out", str(out)], timeout=180, env=NOISE)
    assert result.returncode == 0, result.stderr[-3000:]
    return load(out / "model.pt")


@pytest.mark.parametrize("launcher", ["mpiexec", "torchrun"])
def test_killed_rank_names_it_and_resume_is_bitwise_uninterrupted(launcher, reference, tmp_path):
    out, died = tmp_path / "run", tmp_path / "died"
    args = [*TRAIN, "--out", str(out), "--checkpoint-every", "4"]

    # Rank 1 is SIGKILLed in its 10th step, in the middle of the first epoch.
    fault = {"DISTRIB_TEST_FAULT": "kill:1:10", "DISTRIB_TEST_MARKER": str(died)}
    killed = run_ranks(launcher, 2, args, timeout=150, env=NOISE | fault)
    gone_after = time.time() - died.stat().st_mtime
    text = killed.stdout + killed.stderr
    assert killed.returncode != 0, text[-3000:]
    assert gone_after < 5 + 10, f"the job went down {gone_after:.0f} s after rank 1 died (timeout 5 s)"
    if launcher == "mpiexec":  # hydra ends the job at once; rank 1's watcher says who died
        assert killed.returncode in (137, 9), killed.returncode  # 128 + 9 from the watcher, or hydra's signal 9
        assert "distrib: rank 1 of 2 (pid " in text and "was killed by signal 9 (SIGKILL)" in text, text[-3000:]
    else:  # torchrun's report, and rank 0's failed collective, name it
        assert killed.returncode == 1, killed.returncode
        assert "rank      : 1 (local_rank: 1)" in text and "Signal 9 (SIGKILL)" in text, text[-3000:]
        assert "; rank 1 (pid " in text and "has died" in text, text[-3000:]
    assert not leftovers(str(out)), "processes outlived the job"
    assert newest(out) == "step-000000008"

    resumed = run_ranks(launcher, 2, [*args, "--resume"], timeout=150, env=NOISE)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "step-000000008: epoch 1, 8 of its steps done" in resumed.stderr
    weights = load(out / "model.pt")
    assert weights.keys() == reference.keys()
    for key in reference:
        assert torch.equal(weights[key], reference[key]), key


def test_signalled_launchers_stop_with_a_checkpoint_and_other_world_sizes_resume(tmp_path, monkeypatch):
    """4 ranks under mpiexec get Ctrl-C, 2 under torchrun get SIGTERM, 3 finish: the global batch carries over."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small matrices: a second thread on this shared machine only contends
    try:
        assert train.main([*TRAIN[2:], "--out", str(tmp_path / "one")]) == 0  # the reference, in this process
    finally:
        torch.set_num_threads(threads)
    out = tmp_path / "run"
    pause = {"DISTRIB_TEST_FAULT": "pause:0:6"}  # rank 0 slows down from the 6th step its process takes

    four = signal_midway("mpiexec", 4, [*TRAIN, "--out", str(out)], tmp_path / "a", signal.SIGINT, pause)
    assert four.returncode == 130 and "stopped by signal 2 after step " in four.stderr, four.stderr[-3000:]
    first = int(newest(out).removeprefix("step-"))
    assert 6 <= first < 17, first  # inside the first epoch
    assert not leftovers(str(out))

    two = signal_midway("torchrun", 2, [*TRAIN, "--out", str(out), "--resume"], tmp_path / "b", signal.SIGTERM, pause)
    assert two.returncode == 1, two.stderr[-3000:]  # torchrun's own status once it has passed a signal on
    assert f"step-{first:09d}: epoch 1, {first} of its steps done" in two.stderr
    assert "stopped by signal 15 after step " in two.stderr, two.stderr[-3000:]
    second = int(newest(out).removeprefix("step-"))
    assert first + 6 <= second < 34, (first, second)
    assert not leftovers(str(out))

    three = run_ranks("mpiexec", 3, [*TRAIN, "--out", str(out), "--resume"], timeout=150)
    assert three.returncode == 0, three.stderr[-3000:]
    expected, got = load(tmp_path / "one" / "model.pt"), load(out / "model.pt")
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-6, msg=lambda m, k=key: f"{k}: {m}")


def test_nan_on_one_rank_stops_every_rank_naming_it(tmp_path):
    start = time.monotonic()
    result = run_ranks("mpiexec", 2, [*TRAIN, "--out", str(tmp_path / "r")], timeout=120,
                       env={"DISTRIB_TEST_FAULT": "nan:1:5"})  # fmt: skip
    assert time.monotonic() - start < 100
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1, result.stderr[-3000:]  # rank 0 speaks for both
    assert "error: step 5 (epoch 1, step 5 of 17), phase 'model': NaN or Inf loss on rank(s) [1]" in lines[0]
    assert "--on-nan skip" in lines[0]


# torchrun restarts need their own store per attempt: with the store shared across attempts (torchrun's default)
# a restarted rank may connect to the dead attempt's address (pytorch#135712), and distrib.train says so.
RESTARTABLE = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}


def test_torchrun_restarts_after_two_deaths_continue_bitwise(reference, tmp_path):
    """Rank 1 dies twice (steps 10 and 18); torchrun --max-restarts 3 restarts the workers, and --resume auto
    continues from the newest checkpoint each time: the weights are the uninterrupted run's, bitwise."""
    out, died = tmp_path / "run", tmp_path / "died"
    cmd = [TORCHRUN, "--standalone", "--nproc-per-node", "2", "--max-restarts", "3", *TRAIN, "--out", str(out),
           "--checkpoint-every", "4", "--resume", "auto"]  # fmt: skip
    fault = {"DISTRIB_TEST_FAULT": "again:1:10", "DISTRIB_TEST_MARKER": str(died)}
    result = run(cmd, timeout=300, env=NOISE | fault | RESTARTABLE)
    assert result.returncode == 0, result.stderr[-4000:]
    assert [p.name for p in sorted(tmp_path.glob("died.*"))] == ["died.1", "died.2"]
    assert "--resume auto: no checkpoint in " in result.stderr and "starting from the beginning" in result.stderr
    resumed = re.findall(r"resuming from \S+/(step-\d+): epoch (\d+), (\d+) of its steps done", result.stderr)
    assert resumed == [("step-000000008", "1", "8"), ("step-000000017", "2", "0")], result.stderr[-4000:]
    weights = load(out / "model.pt")
    for key in reference:
        assert torch.equal(weights[key], reference[key]), key
    assert not leftovers(str(out))


def test_a_host_that_leaves_an_elastic_job_leaves_it_training_at_one_rank(tmp_path, monkeypatch):
    """Two torchrun agents (one rank each) meet at a c10d rendezvous with --nnodes 1:2; at step 10 one agent and its
    rank are SIGKILLed, as a host that goes away. The other restarts alone (world size 1) from step 8's checkpoint,
    written at world size 2, and ends within float tolerance of an uninterrupted run."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert train.main([*TRAIN[2:], "--out", str(tmp_path / "one")]) == 0  # the reference, in this process
    finally:
        torch.set_num_threads(threads)
    out = tmp_path / "run"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    conf = "last_call_timeout=2,keep_alive_interval=1,keep_alive_max_attempt=2,join_timeout=60"
    agent = [TORCHRUN, "--nnodes", "1:2", "--nproc-per-node", "1", "--max-restarts", "3", "--rdzv-backend", "c10d",
             "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "elastic", *TRAIN, "--out", str(out),
             "--checkpoint-every", "4", "--keep", "100", "--resume", "auto"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **RESTARTABLE}
    pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}
    stays = subprocess.Popen([agent[0], "--rdzv-conf", f"is_host=1,{conf}", *agent[1:]], cwd=ROOT, env=env,
                             start_new_session=True, **pipes)  # fmt: skip
    leaves = subprocess.Popen([agent[0], "--rdzv-conf", f"is_host=0,{conf}", *agent[1:]], cwd=ROOT,
                              env=env | {"DISTRIB_TEST_FAULT": "leave:any:10"}, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    try:
        _, err = stays.communicate(timeout=240)
        assert leaves.wait(timeout=30) == -signal.SIGKILL
    finally:
        for proc in (stays, leaves):
            if proc.poll() is None:  # a hang: take its session down, then fail
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    assert stays.returncode == 0, err[-4000:]
    assert "resuming from " in err and "step-000000008: epoch 1, 8 of its steps done" in err, err[-4000:]
    checkpoints = sorted((out / "checkpoints").iterdir())
    sizes = {int(p.name[5:]): json.loads((p / "manifest.json").read_text())["world_size"] for p in checkpoints}
    assert sizes == {4: 2, 8: 2, 12: 1, 16: 1, 17: 1, 20: 1, 24: 1, 28: 1, 32: 1, 34: 1}, sizes
    expected, got = load(tmp_path / "one" / "model.pt"), load(out / "model.pt")
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-6, msg=lambda m, k=key: f"{k}: {m}")
    assert not leftovers(str(out))
