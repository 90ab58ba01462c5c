"""Checkpoints in one process: exact resume against an uninterrupted run, atomic files, damaged checkpoints
skipped and reported, pruning, RNG states, a NaN step dropped or refused, and loads refused before they start.

The same against real ranks under mpiexec and torchrun: tests/test_resume.py.
"""

from __future__ import annotations

import errno
import hashlib
import json
import random
import signal

import numpy as np
import pytest
import torch

from distrib.checkpoint import Checkpointer, CheckpointError, TrainingState, atomic, find, load, rng, save
from distrib.cli.optim import build_optimizer, build_schedule
from distrib.comm.local import LocalCommunicator
from distrib.loop import LoopConfig, NonFiniteError, Progress, Stopped, fit
from distrib.tasks.rl import ReinforcementLearning
from tests.faulty import Faulty

COMM = LocalCommunicator()
SETTINGS = {"--batch-size": 500}


def small_task() -> Faulty:
    """The default task on 1500 training samples: 3 steps of 500 per epoch, inputs jittered by torch's RNG."""
    return Faulty(train_size=1500, val_size=500)


def fresh(task: Faulty) -> TrainingState:
    models = task.build()
    optimizers = {"model": build_optimizer("adam", models["model"].parameters(), 1e-2)}
    progress = Progress()
    schedulers = {"model": build_schedule(optimizers["model"], "cosine", 2, 4, progress)}  # 4 epochs of 3 steps
    return TrainingState(models, optimizers, schedulers, progress, dict(SETTINGS))


def run(task: Faulty, state: TrainingState, config: LoopConfig, stop=None, on_step=None) -> list[dict]:
    return fit(task, state.models, state.optimizers, COMM, config, state.schedulers, on_step=on_step,
          progress=state.progress, stop=stop)  # fmt: skip


def weights(state: TrainingState) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in state.models["model"].state_dict().items()}


def assert_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Small matrices on a shared two-core machine: a second thread only contends (15x slower here)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def noisy(monkeypatch):
    monkeypatch.setenv("DISTRIB_TEST_NOISE", "1")
    monkeypatch.delenv("DISTRIB_TEST_FAULT", raising=False)


def test_stop_mid_epoch_and_resume_is_bitwise_the_uninterrupted_run(tmp_path, noisy):
    config = LoopConfig(epochs=4, batch_size=250, accumulation_steps=2, clip_grad=1.0)  # 3 steps an epoch
    task = small_task()
    reference = fresh(task)
    expected = run(task, reference, config)

    task = small_task()
    state = fresh(task)
    with pytest.raises(Stopped) as stopped:  # a SIGTERM noticed in step 5: the 2nd step of the 2nd epoch
        run(task, state, config, stop=lambda: signal.SIGTERM if state.progress.total == 4 else 0)
    assert stopped.value.signum == signal.SIGTERM
    assert (state.progress.epoch, state.progress.step, state.progress.total) == (1, 2, 5)
    path = save(state, tmp_path, COMM, keep=2)
    torch.manual_seed(123), np.random.seed(123), random.seed(123)  # a new process starts elsewhere

    task = small_task()
    resumed = fresh(task)
    load(resumed, path, COMM)
    assert (resumed.progress.epoch, resumed.progress.step, resumed.progress.total) == (1, 2, 5)
    history = run(task, resumed, config)
    assert_equal(weights(resumed), weights(reference))
    assert history[0]["train_loss"] == pytest.approx(expected[1]["train_loss"], rel=1e-12)  # the epoch's sums too
    assert resumed.schedulers["model"].last_epoch == reference.schedulers["model"].last_epoch == 12

    # The noise makes the RNG matter: the same resume without its RNG state ends elsewhere.
    task = small_task()
    unseeded = fresh(task)
    load(unseeded, path, COMM)
    torch.manual_seed(123)
    run(task, unseeded, config)
    assert not torch.equal(weights(unseeded)["0.weight"], weights(reference)["0.weight"])


def test_rl_resume_restores_the_replay_memory_bitwise(tmp_path):
    """Off-policy RL trains on a memory built over epochs: a resume is exact only if the memory comes back."""
    config = LoopConfig(epochs=3, batch_size=256, accumulation_steps=1)  # 4 steps an epoch

    def rl_state() -> tuple[ReinforcementLearning, TrainingState]:
        task = ReinforcementLearning(episodes=4, memory=2048, samples=1024, val_episodes=2)
        models = task.build()
        optimizers = {"policy": build_optimizer("adam", models["policy"].parameters(), 3e-3)}
        return task, TrainingState(models, optimizers, {}, Progress(), dict(SETTINGS), task)

    def policy(state: TrainingState) -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in state.models["policy"].state_dict().items()}

    task, reference = rl_state()
    run(task, reference, config)
    task, state = rl_state()
    with pytest.raises(Stopped):  # in the 2nd epoch: its memory holds two epochs of episodes
        run(task, state, config, stop=lambda: signal.SIGTERM if state.progress.total == 5 else 0)
    path = save(state, tmp_path, COMM, keep=1)

    task, resumed = rl_state()
    load(resumed, path, COMM)
    run(task, resumed, config)
    assert_equal(policy(resumed), policy(reference))

    task, forgetful = rl_state()  # the same resume with the task's state left out ends elsewhere
    load(forgetful, path, COMM)
    forgetful.task.load_state_dict(rl_state()[0].state_dict())
    run(task, forgetful, config)
    assert not torch.equal(policy(forgetful)["4.weight"], policy(reference)["4.weight"])


def test_rng_states_round_trip_through_a_weights_only_file(tmp_path):
    saved = rng.state()
    draws = (torch.rand(3), np.random.rand(3), random.random())
    record = atomic.write(tmp_path / "rng.pt", saved)
    rng.set_state(atomic.read(tmp_path / "rng.pt", record))
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(draws[0], again[0]) and np.array_equal(draws[1], again[1]) and draws[2] == again[2]


def test_a_failed_write_leaves_the_old_file_whole(tmp_path, monkeypatch):
    path = tmp_path / "state.pt"
    record = atomic.write(path, {"w": torch.arange(10.0)})

    def disk_error(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(atomic.os, "fsync", disk_error)  # the new bytes are written, then the disk fails
    with pytest.raises(OSError, match="Input/output error"):
        atomic.write(path, {"w": torch.zeros(10)})
    monkeypatch.undo()
    assert atomic.check(path, record) is None
    assert torch.equal(atomic.read(path, record)["w"], torch.arange(10.0))


def test_a_checkpoint_that_cannot_be_written_is_an_error_and_never_published(tmp_path, monkeypatch):
    state = fresh(small_task())

    def disk_full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(atomic.os, "fsync", disk_full)
    with pytest.raises(CheckpointError, match=r"cannot write checkpoint .*step-000000000: .*No space left on device"):
        save(state, tmp_path, COMM, keep=2)
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["step-000000000.partial"]  # never a checkpoint to resume
    with pytest.raises(CheckpointError, match="no checkpoint that verifies"):
        find(tmp_path, COMM)


def test_code_in_a_checkpoint_is_refused_even_with_a_matching_checksum(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"w": torch.ones(2), "gift": Progress()}, path)  # a class instance: pickled code, not data
    data = path.read_bytes()
    record = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    with pytest.raises(atomic.DamagedFile, match="does not load as plain tensors and data"):
        atomic.read(path, record)


def checkpoints(tmp_path, count: int, keep: int = 10) -> list:
    state = fresh(small_task())
    paths = []
    for total in range(1, count + 1):
        state.progress.total = total
        with torch.no_grad():
            state.models["model"][0].bias.fill_(total)  # each checkpoint tells which it is
        paths.append(save(state, tmp_path, COMM, keep))
    return paths


def test_newest_k_are_kept_and_a_partial_one_is_never_a_candidate(tmp_path):
    paths = checkpoints(tmp_path, 5, keep=3)
    assert sorted(p.name for p in tmp_path.iterdir()) == [p.name for p in paths[2:]]
    (tmp_path / "step-000000009.partial").mkdir()  # a run died while writing step 9
    assert find(tmp_path, COMM) == paths[-1]


def test_damaged_checkpoints_are_reported_and_skipped_never_loaded(tmp_path, caplog):
    paths = checkpoints(tmp_path, 3)
    with open(paths[2] / "shared.pt", "r+b") as f:  # the newest: cut short, as by a full disk
        f.truncate(1000)
    damaged = bytearray((paths[1] / "rank-00000.pt").read_bytes())  # the next: one byte flipped
    damaged[len(damaged) // 2] ^= 0xFF
    (paths[1] / "rank-00000.pt").write_bytes(bytes(damaged))

    assert find(tmp_path, COMM) == paths[0]
    assert "step-000000003: shared.pt is truncated or overwritten (1000 bytes" in caplog.text
    assert "step-000000002: rank-00000.pt is corrupted" in caplog.text
    state = fresh(small_task())
    Checkpointer(tmp_path, COMM, state).resume(tmp_path)
    assert state.progress.total == 1 and bool((state.models["model"][0].bias == 1).all())

    with pytest.raises(CheckpointError, match=r"step-000000003 is damaged \(shared.pt is truncated"):
        find(paths[2], COMM)
    with pytest.raises(CheckpointError, match="no checkpoint that verifies in"):
        find(tmp_path / "elsewhere", COMM)


def test_another_model_or_settings_are_refused_before_anything_loads(tmp_path, monkeypatch):
    path = checkpoints(tmp_path, 1)[0]
    monkeypatch.setenv("DISTRIB_TEST_WIDTH", "64")
    other = fresh(small_task())
    before = weights(other)
    with pytest.raises(CheckpointError, match=r"holds another model \('0.bias' is \(128,\) there, \(64,\) here\)"):
        load(other, path, COMM)
    assert_equal(weights(other), before)
    assert other.progress.total == 0

    monkeypatch.delenv("DISTRIB_TEST_WIDTH")
    changed = fresh(small_task())
    changed.settings["--batch-size"] = 64
    with pytest.raises(CheckpointError, match="written with --batch-size 500, this run has --batch-size 64; resume"):
        load(changed, path, COMM)
    changed.settings["--batch-size"] = None  # an option the run was written without: the fix is to leave it out
    with pytest.raises(CheckpointError, match="written with --batch-size 500, this run has no --batch-size; resume"):
        load(changed, path, COMM)


def test_a_sharded_optimizer_writes_its_own_shard_and_resumes_exactly(tmp_path):
    zero = pytest.importorskip("distrib.zero")
    task = small_task()

    def zero_state() -> TrainingState:
        models = task.build()
        optimizer = zero.ZeroOffloadOptimizer(models["model"].parameters(), lr=1e-2, comm=COMM)
        return TrainingState(models, {"model": optimizer}, {}, Progress(), {})

    config = LoopConfig(epochs=2, batch_size=500)
    reference = zero_state()
    run(task, reference, config)
    state = zero_state()
    with pytest.raises(Stopped):
        run(task, state, config, stop=lambda: signal.SIGINT if state.progress.total == 2 else 0)
    path = save(state, tmp_path, COMM, keep=1)
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["sharded"] == ["model"]
    assert "model" in atomic.read(path / "rank-00000.pt", manifest["files"]["rank-00000.pt"])["optimizers"]
    assert atomic.read(path / "shared.pt", manifest["files"]["shared.pt"])["optimizers"] == {}

    resumed = zero_state()
    load(resumed, path, COMM)
    run(task, resumed, config)
    assert_equal(weights(resumed), weights(reference))

    manifest["world_size"] = 4  # as if 4 ranks had written it: their shards cannot be split for 1
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="holds the optimizer shards of 4 ranks.*launch 4 ranks"):
        load(zero_state(), path, COMM)


def test_a_nan_step_is_skipped_and_changes_nothing(monkeypatch):
    monkeypatch.setenv("DISTRIB_TEST_FAULT", "nan:0:3")
    task = small_task()
    state = fresh(task)
    after: list[dict[str, torch.Tensor]] = []
    config = LoopConfig(epochs=2, batch_size=500, on_nan="skip")
    history = fit(task, state.models, state.optimizers, COMM, config, state.schedulers,
                    on_step=lambda _: after.append(weights(state)), progress=state.progress)  # fmt: skip
    assert_equal(after[2], after[1])  # step 3 was dropped
    assert not torch.equal(after[3]["0.weight"], after[2]["0.weight"])
    assert [h["skipped_steps"] for h in history] == [1, 1] and state.progress.skipped == 1
    assert all(bool(w.isfinite().all()) for w in after[-1].values())
    assert np.isfinite(history[0]["train_loss"])  # the mean is over the steps applied


def test_a_nan_step_is_an_error_naming_it_by_default(monkeypatch):
    monkeypatch.setenv("DISTRIB_TEST_FAULT", "nan:0:4")
    task = small_task()
    state = fresh(task)
    with pytest.raises(NonFiniteError, match=r"step 4 \(epoch 2, step 1 of 3\), phase 'model': NaN or Inf loss on "
                       r"rank\(s\) \[0\] and gradient on rank\(s\) \[0\]; .*--on-nan skip"):  # fmt: skip
        run(task, state, LoopConfig(epochs=2, batch_size=500))
