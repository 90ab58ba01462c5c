"""python -m distrib.train end to end: it learns, any world size gives the same weights, accumulation is exact."""

from __future__ import annotations

import json
import sys

import torch

from tests.launching import run, run_ranks

TRAIN = ["-m", "distrib.train", "--no-progress"]


def load(path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)  # a checkpoint is data: plain tensors only


def test_default_run_learns_on_four_ranks(tmp_path):
    result = run_ranks("mpiexec", 4, [*TRAIN, "--out", str(tmp_path)], timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    epochs = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in epochs] == [0, 1, 2, 3, 4]
    for key in ("train_loss", "val_loss", "val_accuracy", "samples_per_s"):
        assert all(key in e for e in epochs), key
    assert epochs[-1]["val_accuracy"] > 0.9, epochs  # chance is 0.125, a linear model gets about 0.6
    assert epochs[-1]["val_count"] == 4096  # every validation sample counted once, over all ranks
    assert result.stdout.count("epoch ") == 5  # one line per epoch, from rank 0 only
    weights = load(tmp_path / "model.pt")
    assert weights and not any(k.startswith("module.") for k in weights)
    assert (tmp_path / "curves.png").stat().st_size > 1000


def train_weights(tmp_path, launcher: str, ranks: int, *args: str) -> dict[str, torch.Tensor]:
    out = tmp_path / f"{launcher}-{ranks}-{'-'.join(args)}"
    cmd = [*TRAIN, "--out", str(out), "--epochs", "2", *args]
    result = run_ranks(launcher, ranks, cmd, timeout=240) if ranks > 1 else run([sys.executable, *cmd], timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    return load(out / "model.pt")


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=lambda m, k=key: f"{k}: {m}")


def test_any_world_size_gives_the_same_weights(tmp_path):
    # 2 epochs of 1000-sample global batches: 34 optimizer steps, reshuffled each epoch, and a last
    # batch of 384 that 3 ranks split unevenly; the global batch is the unit, so the math is the same.
    args = ("--batch-size", "1000", "--allreduce", "ring")
    reference = train_weights(tmp_path, "none", 1, *args)
    for launcher, ranks in (("mpiexec", 3), ("torchrun", 4)):
        assert_same(train_weights(tmp_path, launcher, ranks, *args), reference)


def test_accumulation_equals_more_ranks(tmp_path):
    # 300-sample micro-batches: 55 per epoch, so the last accumulation group holds one micro-batch.
    accumulated = train_weights(tmp_path, "none", 1, "--batch-size", "300", "--accumulation-steps", "2")
    two_ranks = train_weights(tmp_path, "mpiexec", 2, "--batch-size", "600")
    assert_same(accumulated, two_ranks)


def test_zero_offload_trains_like_plain_adam(tmp_path):
    # ZeRO-Offload shards Adam's state over ranks and steps it on the CPU: the same math as torch's Adam.
    plain = train_weights(tmp_path, "none", 1, "--batch-size", "1000")
    assert_same(train_weights(tmp_path, "mpiexec", 3, "--batch-size", "1000", "--zero-offload"), plain)
