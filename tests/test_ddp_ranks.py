"""distrib's DDP under real launchers: the same training script as torch's DDP, only the imports changed, gives the
same weights; and tests/ranks/test_ddp.py at two world sizes, each launch with a deadline."""

from __future__ import annotations

import sys

import pytest
import torch

from tests.launching import run, run_rank_suite, run_ranks

TRAIN = "tests/scripts/ddp_train.py"


def train(launcher: str, impl: str, backend: str, out: str, algorithms: list[str]) -> None:
    result = run_ranks(launcher, 2, [TRAIN, impl, backend, out, *algorithms], timeout=180)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


@pytest.mark.parametrize(
    "launcher,backend,algorithms",
    [("torchrun", "gloo", ["native", "ring"]), ("mpiexec", "mpi", ["naive", "ring", "native"])],
)
def test_same_weights_as_torch_ddp(tmp_path, launcher, backend, algorithms):
    out = str(tmp_path / "weights")
    train(launcher, "torch", "gloo", out, [])
    train(launcher, "distrib", backend, out, algorithms)
    for rank in (0, 1):
        expected = torch.load(f"{out}.torch.rank{rank}.pt")
        for algorithm in algorithms:
            got = torch.load(f"{out}.{algorithm}.rank{rank}.pt")
            assert list(got) == list(expected)  # state_dict keys, in order, as torch's DDP ("module." prefix)
            for key, value in got.items():
                torch.testing.assert_close(value, expected[key], rtol=1e-6, atol=1e-8, msg=f"{algorithm} {key}")
    first, second = (torch.load(f"{out}.{algorithms[0]}.rank{rank}.pt") for rank in (0, 1))
    for key in first:  # the replicas stay equal (BatchNorm's running statistics are each rank's own)
        if "running" not in key and "num_batches" not in key:
            assert torch.equal(first[key], second[key]), key


@pytest.mark.parametrize("launcher,backend,ranks", [("mpiexec", "mpi", 3), ("mpiexec", "gloo", 2)])
def test_rank_suite(launcher, backend, ranks):
    run_rank_suite(launcher, backend, ranks, "tests/ranks/test_ddp.py", timeout=240)


@pytest.mark.parametrize("launcher,backend,ranks", [("torchrun", "gloo", 2), ("mpiexec", "mpi", 3)])
def test_torch_ddp_parity_suite(launcher, backend, ranks):
    """tests/ranks/test_ddp_parity.py: torch's DDP tests' behaviours, torch's DDP against ours: both
    launchers, both backends, an even and an odd world size."""
    run_rank_suite(launcher, backend, ranks, "tests/ranks/test_ddp_parity.py", timeout=300)


def test_init_process_group_alone_starts_torch_default_group():
    script = (
        "import torch, torch.distributed as dist, distrib\n"
        "comm = distrib.init_process_group()\n"
        "assert comm.backend == 'local' and dist.get_rank() == 0 and dist.get_world_size() == 1\n"
        "dist.barrier(); print('ok')\n"
    )
    result = run([sys.executable, "-c", script], timeout=120)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]
