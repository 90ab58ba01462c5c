"""Local SGD / DiLoCo (--sync-every H) under real launchers: H=1 with an outer SGD of lr 1 and no momentum is data-
parallel training when the inner optimizer is linear in the gradient (SGD), and each rank's own Adam averaged when
it is not; DiLoCo learns; a killed run resumes bitwise, the outer momentum and each rank's weights included.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch.nn import functional as F

from distrib.data import shard
from distrib.tasks.classify import Classify
from tests.launching import run_ranks

TRAIN = ["-m", "distrib.train", "--no-progress", "--task", "tests.faulty:task", "--batch-size", "1000"]
PLAIN = ["--schedule", "constant", "--warmup-steps", "0"]  # the one-process reference below has no schedule
H1 = ["--sync-every", "1", "--outer-lr", "1", "--outer-momentum", "0"]


def trained(tmp_path: Path, name: str, args: list[str], ranks: int = 2, env: dict | None = None) -> Path:
    out = tmp_path / name
    result = run_ranks("mpiexec", ranks, [*TRAIN, *args, "--out", str(out)], timeout=180, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def weights(out: Path) -> dict[str, torch.Tensor]:
    return torch.load(out / "model.pt", weights_only=True)


def assert_close(got: dict, expected: dict, tol: float = 1e-6) -> None:
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=tol, atol=tol, msg=lambda m, k=key: f"{k}: {m}")


def test_h1_with_inner_sgd_equals_data_parallel(tmp_path):
    """SGD with momentum is linear in the gradient: the average of the ranks' steps is the step of the average (at 3
    ranks, where the shards are uneven)."""
    common = ["--optimizer", "sgd", "--epochs", "2"]
    ddp = trained(tmp_path, "ddp", common, 3)
    local = trained(tmp_path, "local", [*common, *H1], 3)
    assert_close(weights(local), weights(ddp))


def per_rank_adam_averaged(ranks: int, epochs: int, batch: int, lr: float) -> dict[str, torch.Tensor]:
    """The reference for an inner Adam, in one process: every rank's Adam on its own shard, then the mean."""
    task = Classify(seed=0)
    inputs, labels = task.collect(0, {}, None)
    models = [task.build()["model"] for _ in range(ranks)]
    optimizers = [torch.optim.Adam(m.parameters(), lr=lr) for m in models]
    for epoch in range(epochs):
        for parts in zip(*(shard(len(inputs), batch, r, ranks, epoch=epoch, seed=0) for r in range(ranks))):
            for model, optimizer, part in zip(models, optimizers, parts):
                optimizer.zero_grad()
                losses = F.cross_entropy(model(inputs[part.indices]), labels[part.indices], reduction="none")
                (losses.sum() * ranks / part.global_count).backward()
                optimizer.step()
            with torch.no_grad():
                for params in zip(*(m.parameters() for m in models)):
                    mean = torch.stack(params).mean(0)
                    for p in params:
                        p.copy_(mean)
    return models[0].state_dict()


def test_h1_with_inner_adam_is_each_ranks_adam_averaged_not_data_parallel_adam(tmp_path):
    """Adam divides by each rank's own second moments, so its steps do not average into the averaged gradient's."""
    common = ["--optimizer", "adam", "--epochs", "1", *PLAIN]
    local = weights(trained(tmp_path, "local", [*common, *H1]))
    assert_close(local, per_rank_adam_averaged(2, 1, 1000, 3e-3), tol=1e-5)
    ddp = weights(trained(tmp_path, "ddp", common))
    assert max(float((local[k] - ddp[k]).abs().max()) for k in ddp) > 1e-4, "as close as DDP: the test says nothing"


def test_diloco_learns_and_a_killed_run_resumes_bitwise(tmp_path):
    """H=5 with the outer Nesterov momentum: rank 1 killed in step 8 of 34, resumed from the checkpoint of step 6
    (one inner step after a sync: each rank's own weights and Adam state, and the outer momentum, all needed)."""
    args = ["--epochs", "2", "--sync-every", "5", "--checkpoint-every", "3", "--timeout", "5"]
    reference = trained(tmp_path, "whole", args)
    final = json.loads((reference / "metrics.jsonl").read_text().splitlines()[-1])
    assert final["val_accuracy"] > 0.8, final  # in 34 steps (chance 12.5%, a linear model about 60%)
    out = tmp_path / "run"
    killed = run_ranks("mpiexec", 2, [*TRAIN, *args, "--out", str(out)], 150, {"DISTRIB_TEST_FAULT": "kill:1:8"})
    assert killed.returncode != 0
    assert max(p.name for p in (out / "checkpoints").iterdir()) == "step-000000006"
    resumed = run_ranks("mpiexec", 2, [*TRAIN, *args, "--out", str(out), "--resume"], 150)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    got, expected = weights(out), weights(reference)
    assert all(torch.equal(got[k], expected[k]) for k in expected), "the resumed run left the uninterrupted one"
