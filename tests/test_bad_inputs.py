"""Bad inputs to python -m distrib.train beyond its options (tests/test_train_options.py has those): a missing or
unreadable dataset, damaged or foreign checkpoints, a run directory already in use, a checkpoint directory that
cannot be written, a disk that fills up, a model that differs across ranks, a resume with nothing to resume. Each
gets one line naming the problem and the fix, a non-zero exit, no traceback, no hang. docs/bad-inputs.md lists
them all, with the test behind each.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch

from distrib import train
from distrib.checkpoint import verify
from tests.launching import run_ranks

SMALL = ["--batch-size", "200", "--epochs", "2", "--no-progress"]  # with small_data: 3 steps an epoch


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    """Small matrices on a shared two-core machine: a second thread only contends."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # so train.main leaves torch's threads alone
    monkeypatch.delenv("DISTRIB_TEST_FAULT", raising=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def small_data(tmp_path):
    """600 points in 3 classes, saved as (inputs, labels) the way --data expects."""
    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 3, (600,), generator=gen)
    inputs = torch.randn(600, 4, generator=gen) + 3 * torch.nn.functional.one_hot(labels, 4).float()
    path = tmp_path / "points.pt"
    torch.save((inputs, labels), path)
    return path


def fails(argv: list[str], capsys, status: int = 2) -> str:
    """Run the CLI in this process; it must exit `status` after one line on stderr. Returns that line."""
    with pytest.raises(SystemExit) as exit_info:
        train.main(argv)
    err = capsys.readouterr().err.strip()
    lines = err.splitlines()
    assert exit_info.value.code == status, err
    assert len(lines) == 1 and lines[0].startswith("python -m distrib.train: error: "), err
    return lines[0]


def trains(argv: list[str], capsys) -> str:
    assert train.main(argv) == 0
    return capsys.readouterr().err


def test_data_from_disk_trains(small_data, tmp_path, capsys):
    trains(["--data", str(small_data), "--out", str(tmp_path / "run"), *SMALL], capsys)
    epochs = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert epochs[-1]["val_count"] == 120  # the last fifth of 600 is held out
    assert epochs[-1]["val_accuracy"] > 0.6, epochs  # three well separated classes: chance is 1/3


def test_missing_or_unreadable_data(tmp_path, capsys):
    missing = fails(["--data", str(tmp_path / "nope.pt"), "--out", str(tmp_path / "r")], capsys)
    assert "argument --data: cannot read " in missing and "nope.pt: No such file or directory" in missing
    assert "write it with torch.save((inputs, labels), PATH)" in missing
    folder = fails(["--data", str(tmp_path), "--out", str(tmp_path / "r")], capsys)
    assert "Is a directory" in folder
    (tmp_path / "noise.pt").write_bytes(bytes(range(256)) * 4)
    garbage = fails(["--data", str(tmp_path / "noise.pt"), "--out", str(tmp_path / "r")], capsys)
    assert "noise.pt is not a file of tensors" in garbage
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize(
    "content,message",
    [
        ({"x": torch.zeros(3)}, "holds a dict, not a pair of tensors"),
        ((torch.zeros(10, 2), torch.zeros(9, dtype=torch.int64)), "labels are torch.int64 (9,) for 10 inputs"),
        ((torch.zeros(10, 2), torch.zeros(10)), "labels are torch.float32 (10,) for 10 inputs"),
        ((torch.zeros(10), torch.zeros(10, dtype=torch.int64)), "inputs are torch.float32 (10,)"),
        ((torch.zeros(10, 2), -torch.ones(10, dtype=torch.int64)), "labels include -1"),
    ],
    ids=["dict", "lengths", "float-labels", "flat-inputs", "negative-label"],
)
def test_data_of_the_wrong_form(content, message, tmp_path, capsys):
    torch.save(content, tmp_path / "bad.pt")
    line = fails(["--data", str(tmp_path / "bad.pt"), "--out", str(tmp_path / "r")], capsys)
    assert f"argument --data: {tmp_path / 'bad.pt'}" in line and message in line, line


def test_data_for_another_task(small_data, tmp_path, capsys):
    line = fails(["--data", str(small_data), "--task", "tests.faulty:task", "--out", str(tmp_path / "r")], capsys)
    assert "only --task classify and lm read --data, not 'tests.faulty:task'; drop --data" in line


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--checkpoint-every", "0"], "argument --checkpoint-every: must be a positive int, got '0'"),
        (["--keep", "0"], "argument --keep: must be a positive int, got '0'"),
        (["--on-nan", "ignore"], "argument --on-nan: invalid choice: 'ignore'"),
        (["--resume"], "argument --resume: name the run to continue, as --out RUN_DIR or --resume RUN_DIR"),
        (["--resume", "auto"], "argument --resume: auto continues the run in --out, or starts it there; name it"),
    ],
)
def test_bad_checkpoint_options(argv, message, capsys):
    assert message in fails([*argv, "--no-progress"], capsys)


def test_resume_without_a_checkpoint_writes_nothing(small_data, tmp_path, capsys):
    out = tmp_path / "run"
    line = fails(["--data", str(small_data), "--out", str(out), "--resume", *SMALL], capsys)
    assert f"argument --resume: no checkpoint that verifies in {out}; give the run directory" in line
    assert not out.exists()
    out.mkdir()
    fails(["--data", str(small_data), "--out", str(out), "--resume", *SMALL], capsys)
    assert list(out.iterdir()) == [], "no checkpoints/, no metrics.jsonl"


def test_resume_auto_starts_afresh_then_continues(small_data, tmp_path, capsys):
    """--resume auto: no checkpoint yet is a fresh start (even in a directory of damaged ones); then a resume."""
    out = tmp_path / "run"
    argv = ["--data", str(small_data), "--out", str(out), *SMALL, "--resume", "auto"]
    err = trains(argv, capsys)
    assert f"--resume auto: no checkpoint in {out} yet; starting from the beginning" in err
    done = sorted(p.name for p in (out / "checkpoints").iterdir())
    epochs = (out / "metrics.jsonl").read_text().splitlines()
    assert done == ["step-000000003", "step-000000006"] and len(epochs) == 2
    err = trains([*argv, "--epochs", "3"], capsys)  # a later --epochs wins: one more epoch
    assert "resuming from " in err and "step-000000006: epoch 3, 0 of its steps done" in err
    assert (out / "metrics.jsonl").read_text().splitlines()[:2] == epochs  # kept, and one line added
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 3
    for checkpoint in (out / "checkpoints").iterdir():
        (checkpoint / "manifest.json").write_text("{")  # every checkpoint damaged: auto starts afresh
    err = trains(argv, capsys)
    assert "starting from the beginning" in err
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2  # started over


def test_a_global_batch_larger_than_the_data_is_said_once(small_data, tmp_path, capsys):
    err = trains(["--data", str(small_data), "--out", str(tmp_path / "r"), *SMALL, "--batch-size", "1000"], capsys)
    line = "distrib: --batch-size 1000 is larger than epoch 1's data (480 samples): each such epoch is one step"
    assert err.count(line) == 1 and err.count("--batch-size 1000") == 1, err
    epochs = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert len(epochs) == 2


def test_a_run_directory_with_checkpoints_needs_resume(small_data, tmp_path, capsys):
    argv = ["--data", str(small_data), "--out", str(tmp_path), *SMALL]
    trains(argv, capsys)
    metrics = (tmp_path / "metrics.jsonl").read_text()
    line = fails(argv, capsys)
    assert f"argument --out: {tmp_path} holds the checkpoints of an earlier run; continue it with --resume" in line
    assert (tmp_path / "metrics.jsonl").read_text() == metrics  # refused before touching anything


def test_truncated_checkpoint_is_skipped_or_refused(small_data, tmp_path, capsys, caplog):
    argv = ["--data", str(small_data), "--out", str(tmp_path), *SMALL, "--checkpoint-every", "2"]
    trains(argv, capsys)
    checkpoints = sorted((tmp_path / "checkpoints").iterdir())
    assert [c.name for c in checkpoints] == ["step-000000003", "step-000000004", "step-000000006"]
    with open(checkpoints[-1] / "shared.pt", "r+b") as f:
        f.truncate(100)
    err = trains([*argv, "--resume"], capsys)  # the finished run resumes from step 4 and redoes steps 5 and 6
    assert "skipping checkpoint" in caplog.text and "step-000000006: shared.pt is truncated" in caplog.text
    assert "resuming from " in err and "step-000000004: epoch 2, 1 of its steps done" in err
    with open(checkpoints[-1] / "rank-00000.pt", "r+b") as f:  # a fresh step-6 was written: damage it again
        f.truncate(100)
    line = fails([*argv, "--resume", str(checkpoints[-1])], capsys)
    assert f"argument --resume: checkpoint {checkpoints[-1]} is damaged (rank-00000.pt is truncated" in line
    assert "resume from the run directory to take an older one" in line


def test_checkpoint_of_another_model_or_batch(tmp_path, capsys, monkeypatch):
    argv = ["--task", "tests.faulty:task", "--epochs", "1", "--batch-size", "4096", "--no-progress"]
    trains([*argv, "--out", str(tmp_path)], capsys)
    monkeypatch.setenv("DISTRIB_TEST_WIDTH", "64")  # the same task name, a narrower model
    line = fails([*argv, "--out", str(tmp_path), "--resume"], capsys)
    assert "argument --resume: checkpoint " in line and "holds another model ('0.bias' is (128,) there" in line
    assert "resume with the model that wrote it, or start a new --out" in line
    monkeypatch.delenv("DISTRIB_TEST_WIDTH")
    argv[argv.index("4096")] = "2048"
    line = fails([*argv, "--out", str(tmp_path), "--resume"], capsys)
    assert "written with --batch-size 4096, this run has --batch-size 2048; resume with --batch-size 4096" in line


def test_unwritable_checkpoint_directory(small_data, tmp_path, capsys):
    (tmp_path / "checkpoints").write_text("a file where the checkpoints should go")
    line = fails(["--data", str(small_data), "--out", str(tmp_path), *SMALL], capsys)
    assert f"argument --out: cannot write to {tmp_path / 'checkpoints'}: File exists; choose a writable" in line


def test_model_that_differs_across_ranks(tmp_path):
    result = run_ranks("mpiexec", 2, ["-m", "distrib.train", "--task", "tests.faulty:uneven", "--out",
                                      str(tmp_path / "r"), "--no-progress"], timeout=120)  # fmt: skip
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr[-3000:]
    assert (
        "argument --task: [0]: params[0] in process 1 with sizes [136, 8] appears not to match sizes of the"
        in (lines[0])
    ), lines[0]  # torch's words, said by rank 0 for the whole job
    assert "Build the same model on every rank" in lines[0]


@pytest.fixture
def tiny_disk(tmp_path):
    """A real 2 MiB file system (tmpfs; needs root), unmounted afterwards even when the test fails."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


FILL = ["--epochs", "1", "--checkpoint-every", "1", "--keep", "100", "--no-progress"]  # ~250 KB a checkpoint


def assert_whole_and_one_line(disk: Path, line: str) -> None:
    assert line.startswith("python -m distrib.train: error: cannot write checkpoint "), line
    assert line.endswith(": No space left on device"), line
    checkpoints = sorted((disk / "run" / "checkpoints").glob("step-?????????"))
    assert len(checkpoints) >= 2, checkpoints  # the disk held a few before it filled
    assert all(verify(c) is None for c in checkpoints), [verify(c) for c in checkpoints]


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_full_disk_is_one_line_and_older_checkpoints_stay_whole(mode, tiny_disk, capsys):
    line = fails(["--out", str(tiny_disk / "run"), *FILL, *(["--checkpoint-async"] * (mode == "async"))], capsys, 1)
    assert_whole_and_one_line(tiny_disk, line)


@pytest.mark.parametrize("launcher", ["mpiexec", "torchrun"])
def test_a_full_disk_under_launchers_is_one_line(launcher, tiny_disk):
    result = run_ranks(launcher, 2, ["-m", "distrib.train", "--out", str(tiny_disk / "run"), *FILL], timeout=120)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and lines, result.stderr[-3000:]
    if launcher == "mpiexec":
        assert len(lines) == 1, result.stderr[-3000:]
    else:  # then torchrun's report, quoting it as the root cause
        assert sum(line.startswith("python -m distrib.train: error: ") for line in lines) == 1, result.stderr
        assert f"traceback : {lines[0]}" in result.stderr, result.stderr[-3000:]
    assert "inline_container" not in result.stderr
    assert_whole_and_one_line(tiny_disk, lines[0])
