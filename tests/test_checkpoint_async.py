"""Checkpoints written in the background (--checkpoint-async): the same files as a synchronous write though
training goes on meanwhile, an exact resume, and a failed write raised on every rank, at the next checkpoint or
at the end, never lost."""

from __future__ import annotations

import json
import signal
import time

import pytest
import torch

from distrib.checkpoint import Checkpointer, CheckpointError, atomic, load
from distrib.loop import LoopConfig, Stopped, fit
from tests.launching import ROOT, run_ranks
from tests.test_checkpoint import COMM, assert_equal, fresh, run, small_task, weights


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    monkeypatch.setenv("DISTRIB_TEST_NOISE", "1")  # the RNG states matter too
    monkeypatch.delenv("DISTRIB_TEST_FAULT", raising=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


CONFIG = LoopConfig(epochs=3, batch_size=250, accumulation_steps=2, clip_grad=1.0)  # 3 steps an epoch


def train_with_checkpoints(directory, background: bool) -> dict[str, dict]:
    """3 epochs with a checkpoint after every step; the checkpoints' manifests by name."""
    task = small_task()
    state = fresh(task)
    saver = Checkpointer(directory, COMM, state, every=1, keep=100, background=background)
    fit(task, state.models, state.optimizers, COMM, CONFIG, state.schedulers, on_step=lambda _: saver.on_step(),
        on_epoch=lambda _: saver.on_epoch(), progress=state.progress)  # fmt: skip
    saver.finish()
    return {p.name: json.loads((p / "manifest.json").read_text()) for p in sorted(directory.glob("step-*"))}


def test_background_checkpoints_are_the_synchronous_ones_byte_for_byte(tmp_path, monkeypatch):
    """Each background write is slowed down, so the next step changes the weights while it runs: the files must
    still hold the state of the step they were taken at (every file's sha256, equal to a synchronous run's)."""
    sync = train_with_checkpoints(tmp_path / "sync", background=False)
    real = atomic.write
    monkeypatch.setattr(atomic, "write", lambda path, obj: (time.sleep(0.05), real(path, obj))[1])
    background = train_with_checkpoints(tmp_path / "async", background=True)
    assert list(sync) == [f"step-{n:09d}" for n in range(1, 10)] and list(background) == list(sync)
    for name in sync:
        assert background[name]["files"] == sync[name]["files"], name
        assert background[name]["progress"] == sync[name]["progress"], name


def test_stopped_with_a_write_in_flight_resumes_bitwise(tmp_path):
    task = small_task()
    reference = fresh(task)
    run(task, reference, CONFIG)

    task = small_task()
    state = fresh(task)
    saver = Checkpointer(tmp_path, COMM, state, every=2, keep=3, background=True)
    with pytest.raises(Stopped):  # noticed in step 5; step 4's checkpoint is still being written
        run(task, state, CONFIG, on_step=lambda _: saver.on_step(),
            stop=lambda: signal.SIGTERM if state.progress.total == 4 else 0)  # fmt: skip
    where = saver.save()  # the final one, as train.py does
    saver.finish()
    assert [p.name for p in sorted(tmp_path.iterdir())] == ["step-000000002", "step-000000004", "step-000000005"]

    task = small_task()
    resumed = fresh(task)
    load(resumed, where, COMM)
    run(task, resumed, CONFIG)
    assert_equal(weights(resumed), weights(reference))


def test_a_failed_background_write_is_raised_at_the_next_checkpoint_and_never_published(tmp_path, monkeypatch):
    state = fresh(small_task())
    saver = Checkpointer(tmp_path, COMM, state, keep=3, background=True)

    def full(path, obj):
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(atomic, "write", full)
    saver.save()  # returns at once: the thread fails
    monkeypatch.undo()
    state.progress.total = 1
    with pytest.raises(CheckpointError, match=r"cannot write checkpoint .*step-000000000: .*No space left on device"):
        saver.save()
    assert [p.name for p in tmp_path.iterdir()] == ["step-000000000.partial"]
    saver.save()  # the disk has room again: the next checkpoint is written, and published at the end
    saver.finish()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000000001"]


def test_a_failed_background_write_on_one_rank_is_raised_on_every_rank(tmp_path):
    checkpoints, reports = tmp_path / "checkpoints", tmp_path / "reports"
    checkpoints.mkdir(), reports.mkdir()
    script = str(ROOT / "tests/scripts/async_checkpoint_failure.py")
    result = run_ranks("mpiexec", 2, [script, str(checkpoints), "1", str(reports)], timeout=90)
    assert result.returncode == 0, result.stderr[-3000:]
    reports = [json.loads((reports / f"rank-{rank}.json").read_text()) for rank in (0, 1)]
    assert [r["rank"] for r in reports] == [0, 1], result.stdout
    for report in reports:
        for case, step in (("next checkpoint", 1), ("end", 3)):
            assert report[case] is not None, (report["rank"], case)
            assert f"cannot write checkpoint {checkpoints}/step-{step:09d}: " in report[case], report
            assert "rank-00001.pt: No space left on device" in report[case], report
        assert report["published"] == ["step-000000004"], report  # never the failed ones
