"""Every bad option of python -m distrib.train: exit status 2, one line naming the option, nothing written."""

from __future__ import annotations

import pytest

from distrib import train
from tests.launching import run_ranks

BAD = [
    (["--epochs", "0"], "argument --epochs: must be a positive int, got '0'"),
    (["--epochs", "two"], "argument --epochs: must be a positive int, got 'two'"),
    (["--batch-size", "-8"], "argument --batch-size: must be a positive int"),
    (["--lr", "0"], "argument --lr: must be a positive float"),
    (["--lr", "nan"], "argument --lr: must be a positive float"),
    (["--lr", "inf"], "argument --lr: must be a positive float up to 10000, got 'inf'"),
    (["--lr", "1e308"], "argument --lr: must be a positive float up to 10000, got '1e308'"),  # torch: overflow
    (["--weight-decay", "nan"], "argument --weight-decay: must be a float from 0 up to 10000, got 'nan'"),
    (["--weight-decay", "-5"], "argument --weight-decay: must be a float from 0 up to 10000, got '-5'"),
    (["--optimizer", "lbfgs"], "argument --optimizer: invalid choice: 'lbfgs'"),
    (["--schedule", "step"], "argument --schedule: invalid choice"),
    (["--warmup-steps", "-1"], "argument --warmup-steps: must be a whole number >= 0"),
    (["--accumulation-steps", "0"], "argument --accumulation-steps: must be a positive int"),
    (["--clip-grad", "-1"], "argument --clip-grad: must be a positive float"),
    (["--clip-grad", "inf"], "argument --clip-grad: must be a positive float, got 'inf'"),
    (["--seed", "-3"], "argument --seed: must be a whole number >= 0"),
    (["--seed", "99999999999999999999999"], "argument --seed: must be a whole number >= 0 and < 2**63, got '9999"),
    (["--backend", "tcp"], "argument --backend: invalid choice: 'tcp'"),
    (["--allreduce", "tree"], "argument --allreduce: invalid choice: 'tree'"),
    (["--timeout", "0"], "argument --timeout: '0' is not a deadline"),
    (["--sync-every", "0"], "argument --sync-every: must be a positive int, got '0'"),
    (["--outer-lr", "-1"], "argument --outer-lr: must be a positive float"),
    (["--outer-momentum", "1"], "argument --outer-momentum: must be a number in [0, 1), got '1'"),
    (["--zero-offload", "--sync-every", "4"], "argument --sync-every: local SGD steps each rank's own optimizer"),
    (["--outer-lr", "0.5"], "argument --outer-lr: only local SGD (--sync-every H) has an outer step; drop --outer-lr"),
    (["--outer-momentum", "0"], "argument --outer-momentum: only local SGD (--sync-every H) has an outer step"),
    (["--task", "imagenet"], "argument --task: unknown task 'imagenet': use one of classify"),
    (["--task", "no_such_module:make"], "argument --task: task 'no_such_module:make': cannot import"),
    (["--task", "distrib.tasks:no_such_factory"], "has no callable 'no_such_factory'"),
    (
        ["--task", "os:system"],
        "argument --task: task 'os:system': system is not a task factory: calling it with "
        "seed=0 fails (missing a required argument: 'command'); a factory takes seed= and returns a Task",
    ),  # fmt: skip
    (["--task", "builtins:dict"], "argument --task: task 'builtins:dict' lacks phases, build, collect"),
]


@pytest.mark.parametrize(
    "argv,message", [b for b in BAD if b[1]], ids=lambda x: " ".join(x) if isinstance(x, list) else ""
)
def test_bad_option_exits_2_with_one_line(argv, message, tmp_path, capsys):
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        train.main([*argv, "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2
    assert len(err.splitlines()) == 1 and err.startswith("python -m distrib.train: error: "), err
    assert message in err, err
    assert not out.exists(), "nothing may be written before the arguments are valid"


def test_unwritable_out_directory(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--out", str(blocker / "run"), "--epochs", "1", "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1
    assert "argument --out: cannot write to" in err and "choose a writable directory" in err, err


@pytest.mark.parametrize("option, name", [("--trace", "trace.json"), ("--tensorboard", "tb")])
def test_unwritable_trace_or_tensorboard_path_fails_before_training(option, name, tmp_path, capsys):
    """Found at the start, not after the whole run (the trace is written at the end)."""
    if option == "--tensorboard":
        pytest.importorskip("tensorboard")
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(SystemExit) as exit_info:
        train.main([option, str(blocker / name), "--out", str(tmp_path / "run"), "--epochs", "1", "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1, err
    assert f"argument {option}: cannot write {blocker / name}: {blocker} is not a directory" in err, err
    assert not (tmp_path / "run").exists()


def test_world_larger_than_the_global_batch_on_every_rank(tmp_path):
    result = run_ranks(
        "mpiexec", 3, ["-m", "distrib.train", "--batch-size", "2", "--out", str(tmp_path / "r")], timeout=90
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "argument --batch-size" in lines[0] and "batch-size >= world size" in lines[0], lines
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("argv", [["--lr", "1e308"], ["--batch-size", "1"]], ids=["parsed", "after-init"])
def test_under_torchrun_the_line_comes_once_before_torchruns_report(argv, tmp_path):
    """torchrun reports a failed worker in ~40 lines (a traceback of its own); ours comes first, once, and its
    report's root cause is rank 0, quoting it. --batch-size 1 fails after the ranks have met, on both ranks."""
    result = run_ranks("torchrun", 2, ["-m", "distrib.train", *argv, "--out", str(tmp_path / "r")], timeout=90)
    lines = result.stderr.strip().splitlines()
    ours = [i for i, line in enumerate(lines) if line.startswith("python -m distrib.train: error: ")]
    assert result.returncode == 1 and ours == [0], result.stderr[-3000:]  # torchrun's status for a failed worker
    assert f"argument {argv[0]}: " in lines[0], lines[0]
    cause = result.stderr[result.stderr.index("Root Cause (first observed failure)") :]
    assert "rank      : 0 (local_rank: 0)" in cause and "exitcode  : 2" in cause, cause
    assert f"traceback : {lines[0]}" in cause, cause
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("shared", ["True", "False"])
def test_torchrun_restarts_over_a_shared_store_are_warned_of(shared, monkeypatch, capsys):
    """The variables torchrun --max-restarts 3 gives rank 0's first attempt, with its store shared or not."""
    env = {"TORCHELASTIC_MAX_RESTARTS": "3", "TORCHELASTIC_RESTART_COUNT": "0", "RANK": "0"}
    for name, value in (env | {"TORCHELASTIC_USE_AGENT_STORE": shared}).items():
        monkeypatch.setenv(name, value)
    train._warn_of_shared_store()
    err = capsys.readouterr().err
    assert ("TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in err) == (shared == "True"), err
