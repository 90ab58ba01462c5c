"""The device a rank computes on, without a GPU: --device auto/cpu/cuda against 0, 1 and too few CUDA devices (the
count monkeypatched), the backend that follows, the one-line errors, minibatches on the device, and bf16 autocast
through the loop on the CPU."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from distrib import device as dev
from distrib import train
from distrib.comm.local import LocalCommunicator
from distrib.device import DeviceError, Feeder, choose
from distrib.env import World
from distrib.loop import LoopConfig, fit, validate
from distrib.process import default_backend
from distrib.tasks.classify import Classify


def world(local_rank: int = 0, local_size: int | None = 1, launcher: str = "torchrun") -> World:
    size = local_size or local_rank + 1
    return World(rank=local_rank, size=size, local_rank=local_rank, local_size=local_size, launcher=launcher)


@pytest.fixture
def gpus(monkeypatch):
    """Pretend torch sees `n` CUDA devices."""

    def pretend(n: int) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)

    return pretend


@pytest.mark.parametrize(
    "count,local_rank,local_size,expected",
    [
        (0, 0, 1, "cpu"),
        (1, 0, 1, "cuda:0"),
        (1, 1, 2, "cpu"),  # too few: two ranks, one GPU; every rank of the host takes the CPU, not a mix
        (1, 0, 2, "cpu"),
        (8, 3, 8, "cuda:3"),
        (8, 3, 4, "cuda:3"),  # more GPUs than ranks
        (2, 1, None, "cuda:1"),  # the launcher does not say how many ranks share the host
    ],
)
def test_auto_takes_a_gpu_per_rank_or_the_cpu(gpus, count, local_rank, local_size, expected):
    gpus(count)
    assert choose("auto", world(local_rank, local_size)) == torch.device(expected)


def test_cpu_is_the_cpu_whatever_the_gpus(gpus):
    gpus(4)
    assert choose("cpu", world(2, 4)) == torch.device("cpu")


def test_explicit_cuda_without_a_gpu_names_the_count_and_the_local_rank(gpus):
    gpus(0)
    with pytest.raises(DeviceError, match=r"cuda asked for on local rank 0, but torch sees 0 CUDA devices"):
        choose("cuda", world())


def test_ranks_share_a_gpu_over_mpi_and_gloo_but_not_nccl(gpus):
    gpus(1)
    for backend in ("mpi", "gloo", None):
        assert choose("cuda", world(1, 2, "mpich"), backend) == torch.device("cuda", 0)
    message = r"backend nccl needs one GPU per rank, but local rank 1 of 2 on this host finds 1 CUDA device"
    with pytest.raises(DeviceError, match=message):
        choose("cuda", world(1, 2), "nccl")
    with pytest.raises(DeviceError, match=message):
        choose("auto", world(1, 2), "nccl")  # nccl means cuda
    assert choose("auto", world(0, 1), "nccl") == torch.device("cuda", 0)


def test_nccl_on_the_cpu_is_refused(gpus):
    gpus(2)
    with pytest.raises(DeviceError, match="backend nccl reduces GPU tensors, but the device is cpu"):
        choose("cpu", world(), "nccl")
    with pytest.raises(DeviceError, match="device must be one of auto, cpu, cuda; got 'tpu'"):
        choose("tpu", world())


def test_the_default_backend_follows_the_device(gpus):
    gpus(2)
    assert default_backend(world(0, 2), torch.device("cuda", 0)) == "nccl"
    assert default_backend(world(0, 2), torch.device("cpu")) == "gloo"
    assert default_backend(world(0, 2, "mpich"), torch.device("cuda", 0)) == "mpi"  # CUDA tensors staged for MPI
    assert default_backend(World(0, 1, 0, 1, "none"), torch.device("cuda", 0)) == "local"
    assert default_backend(world(1, 2)) == "nccl"  # auto: two GPUs for two ranks
    gpus(1)
    assert default_backend(world(1, 2)) == "gloo"  # auto: too few, all on the CPU


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--device", "cuda"], "argument --device: cuda asked for on local rank 0, but torch sees 0 CUDA devices"),
        (["--device", "cpu", "--backend", "nccl"], "argument --device: backend nccl reduces GPU tensors"),
        (["--device", "gpu"], "argument --device: invalid choice: 'gpu'"),
        (["--precision", "fp16"], "argument --precision: invalid choice: 'fp16'"),
    ],
)
def test_bad_device_options_exit_2_with_one_line(gpus, argv, message, tmp_path, capsys):
    gpus(0)
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        train.main([*argv, "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("python -m distrib.train: error: ") and message in err, err
    assert not out.exists()


def test_feeder_on_the_cpu_reads_the_rows_in_place():
    data = (torch.randn(10, 3), torch.arange(10))
    feeder = Feeder(torch.device("cpu"))
    assert feeder.hold(data) is data  # nothing to move
    index = torch.tensor([7, 2, 2, 9])
    got = feeder.rows(data, index)
    assert torch.equal(got[0], data[0][index]) and torch.equal(got[1], data[1][index])
    sliced = feeder.rows(data, slice(3, 6))
    assert sliced[0].data_ptr() == data[0][3].data_ptr()  # a view: no copy on the CPU
    assert [len(t) for t in feeder.rows(data, torch.tensor([], dtype=torch.int64))] == [0, 0]


def test_autocast_is_bf16_only_when_asked():
    layer, x = nn.Linear(4, 2), torch.randn(3, 4)
    with dev.autocast(torch.device("cpu"), "bf16"):
        assert layer(x).dtype == torch.bfloat16
    with dev.autocast(torch.device("cpu"), "fp32"):
        assert layer(x).dtype == torch.float32
    with pytest.raises(ValueError, match="precision must be one of fp32, bf16; got 'fp16'"):
        dev.autocast(torch.device("cpu"), "fp16")
    with pytest.raises(ValueError, match="precision must be one of fp32, bf16"):
        LoopConfig(epochs=1, batch_size=8, precision="half")


class Watched(Classify):
    """The classify task, noting the dtype of its guesses and the device of its minibatches."""

    seen: set

    def apply(self, phase, models, batch):
        guesses = super().apply(phase, models, batch)
        self.seen.add((guesses.dtype, batch[0].device.type))
        return guesses


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_loop_runs_bf16_autocast_on_the_cpu_and_learns(precision):
    torch.manual_seed(0)
    task = Watched(train_size=2048, val_size=512)
    task.seen = set()
    models = task.build()
    comm = LocalCommunicator()
    optimizers = {"model": torch.optim.Adam(models["model"].parameters(), lr=3e-3)}
    history = fit(task, models, optimizers, comm, LoopConfig(epochs=3, batch_size=64, precision=precision))
    wanted = torch.bfloat16 if precision == "bf16" else torch.float32
    assert task.seen == {(wanted, "cpu")}
    assert all(p.dtype == torch.float32 for p in models["model"].parameters())  # the weights stay fp32
    assert history[-1]["val_accuracy"] > 0.85, history[-1]  # chance is 12.5%
    again = validate(task, models, comm)  # fp32 validation of the same weights: bf16 only rounds
    assert abs(again["val_accuracy"] - history[-1]["val_accuracy"]) < 0.03
