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
    (["--optimizer", "lbfgs"], "argument --optimizer: invalid choice: 'lbfgs'"),
    (["--schedule", "step"], "argument --schedule: invalid choice"),
    (["--warmup-steps", "-1"], "argument --warmup-steps: must be a whole number >= 0"),
    (["--accumulation-steps", "0"], "argument --accumulation-steps: must be a positive int"),
    (["--clip-grad", "-1"], "argument --clip-grad: must be a positive float"),
    (["--seed", "-3"], "argument --seed: must be a whole number >= 0"),
    (["--backend", "tcp"], "argument --backend: invalid choice: 'tcp'"),
    (["--allreduce", "tree"], "argument --allreduce: invalid choice: 'tree'"),
    (["--timeout", "0"], "argument --timeout: '0' is not a deadline"),
    (["--task", "imagenet"], "argument --task: unknown task 'imagenet': use one of classify"),
    (["--task", "no_such_module:make"], "argument --task: task 'no_such_module:make': cannot import"),
    (["--task", "distrib.tasks:no_such_factory"], "has no callable 'no_such_factory'"),
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


def test_world_larger_than_the_global_batch_on_every_rank(tmp_path):
    result = run_ranks(
        "mpiexec", 3, ["-m", "distrib.train", "--batch-size", "2", "--out", str(tmp_path / "r")], timeout=90
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "argument --batch-size" in lines[0] and "batch-size >= world size" in lines[0], lines
    assert not (tmp_path / "r").exists()
