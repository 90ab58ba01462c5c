"""DistributedDataParallel in one process (a world of one): bucket layout, gradients, state_dict, bad arguments."""

from __future__ import annotations

import copy
import gc
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import distrib
from distrib import DistributedDataParallel
from distrib.comm.local import LocalCommunicator
from distrib.ddp.buckets import MIB, assign


@pytest.fixture
def comm() -> LocalCommunicator:
    return LocalCommunicator(timeout=5)


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4))


def test_buckets_reverse_order_small_first_one_dtype_each():
    sizes = [MIB // 4, MIB // 2, MIB // 2, MIB // 4, MIB // 4]  # float32 elements: 1, 2, 2, 1, 1 MiB
    params = [torch.empty(n) for n in sizes] + [torch.empty(8, dtype=torch.float64)]
    # The first bucket closes at 1 MiB, later ones at 3 MiB; float64 goes alone; the latest parameter leads.
    assert assign(params, cap_bytes=3 * MIB, first_cap_bytes=MIB) == [[5], [4], [3, 2], [1, 0]]
    assert assign(params[:5], cap_bytes=10 * MIB, first_cap_bytes=10 * MIB) == [[4, 3, 2, 1, 0]]


@pytest.mark.parametrize("as_view", [False, True], ids=["copy", "view"])
def test_world_of_one_gives_the_plain_module_gradients(comm, as_view):
    reference = mlp()
    ddp = DistributedDataParallel(
        copy.deepcopy(reference), comm=comm, bucket_cap_mb=1e-4, gradient_as_bucket_view=as_view
    )
    assert len(ddp.reducer.buckets) > 1
    x, y = torch.randn(8, 6), torch.randn(8, 4)
    for _ in range(2):  # accumulating twice, as without DDP
        F.mse_loss(ddp(x), y).backward()
        F.mse_loss(reference(x), y).backward()
        for (name, p), q in zip(ddp.module.named_parameters(), reference.parameters()):
            assert torch.equal(p.grad, q.grad), name
    flat = {b.flat.untyped_storage().data_ptr() for b in ddp.reducer.buckets}
    in_buckets = [p.grad.untyped_storage().data_ptr() in flat for p in ddp.parameters()]
    assert all(in_buckets) if as_view else not any(in_buckets)


def test_state_dict_train_and_eval_as_torch_ddp(comm):
    module = mlp()
    ddp = DistributedDataParallel(module, comm=comm)
    assert ddp.module is module
    assert list(ddp.state_dict()) == [f"module.{key}" for key in module.state_dict()]
    other = DistributedDataParallel(
        nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4)), comm=comm
    )
    other.load_state_dict(ddp.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(other.state_dict().values(), ddp.state_dict().values()))
    ddp.eval()
    assert not module.training and not module[1].training
    ddp.train()
    assert module[1].training


def test_wrapper_is_freed_with_its_buckets(comm):
    module = mlp()
    ddp = DistributedDataParallel(module, comm=comm, bucket_cap_mb=1e-4)
    ddp(torch.randn(4, 6)).sum().backward()
    wrapper, first_bucket = weakref.ref(ddp), weakref.ref(ddp.reducer.buckets[0].flat)
    del ddp
    gc.collect()
    assert wrapper() is None and first_bucket() is None, "the gradient hooks must not keep the wrapper alive"
    module(torch.randn(4, 6)).sum().backward()  # the module trains on alone, without the wrapper's hooks


def test_no_sync_communicates_nothing(comm, monkeypatch):
    ddp = DistributedDataParallel(mlp(), comm=comm)
    calls = []
    monkeypatch.setattr(comm, "allreduce", lambda *a, **k: calls.append(a))
    with ddp.no_sync():
        ddp(torch.randn(4, 6)).sum().backward()
    assert not calls and all(p.grad is not None for p in ddp.parameters())


class Recompute(torch.autograd.Function):
    """Reentrant checkpointing as torch.utils.checkpoint(use_reentrant=True) does it (whose import takes seconds):
    forward without a graph, then a backward of its own inside the outer one."""

    @staticmethod
    def forward(ctx, layer, x):
        ctx.layer = layer
        ctx.save_for_backward(x)
        with torch.no_grad():
            return layer(x)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        with torch.enable_grad():
            x = x.detach().requires_grad_()
            torch.autograd.backward(ctx.layer(x), grad)
        return None, x.grad


def test_nested_backward_is_refused_with_the_fix(comm):
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    ddp = DistributedDataParallel(model, comm=comm)

    class Checkpointed(nn.Module):
        def forward(self, x):
            return model[1](Recompute.apply(model[0], x))

    ddp.module = Checkpointed()  # the same parameters, the first layer's recomputed in a backward of its own
    with pytest.raises(RuntimeError, match=r"'0.bias' got its gradient in a nested backward .*use_reentrant=False"):
        ddp(torch.randn(3, 4, requires_grad=True)).sum().backward()


@pytest.mark.parametrize(
    "kwargs,error,message",
    [
        ({"bucket_cap_mb": 0}, ValueError, "bucket_cap_mb must be a positive number of MiB, got 0"),
        ({"algorithm": "fast"}, ValueError, "algorithm must be one of .*got 'fast'"),
        ({"device_ids": [0, 1]}, ValueError, r"device_ids can only be None or hold one device, got \[0, 1\]"),
        ({"device_ids": [0]}, ValueError, r"device_ids=\[0\] is for a module on one GPU.*leave device_ids None"),
        ({"output_device": 0}, ValueError, "output_device needs device_ids"),
        ({"process_group": "nccl"}, TypeError, "must be a distrib Communicator .*got str"),
    ],
)
def test_bad_arguments(comm, kwargs, error, message):
    if "process_group" not in kwargs:
        kwargs = {"comm": comm, **kwargs}
    with pytest.raises(error, match=message):
        DistributedDataParallel(mlp(), **kwargs)


def test_bad_modules_and_communicators(comm):
    with pytest.raises(ValueError, match="pass the communicator as comm or as process_group, not both"):
        DistributedDataParallel(mlp(), comm=comm, process_group=comm)
    frozen = mlp().requires_grad_(False)
    with pytest.raises(ValueError, match="Sequential has no parameter that requires a gradient"):
        DistributedDataParallel(frozen, comm=comm)
    sparse = nn.Sequential(nn.Linear(2, 2), nn.Embedding(10, 2, sparse=True))
    with pytest.raises(
        ValueError, match="'1' makes sparse gradients, which the flat buckets cannot hold; use sparse=False"
    ):
        DistributedDataParallel(sparse, comm=comm)
    mixed = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2, device="meta"))
    with pytest.raises(ValueError, match=r"parameters must all be on one device type, found \['cpu', 'meta'\]"):
        DistributedDataParallel(mixed, comm=comm)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"init_method": "tcp://10.0.0.1:23456"}, "init_method='tcp://10.0.0.1:23456' is not supported"),
        ({"world_size": 4}, r"world_size=4, but the launcher \(none\) made this process's world_size 1; omit it"),
        ({"rank": 2}, r"rank=2, but the launcher \(none\) made this process's rank 0; omit it"),
    ],
)
def test_init_process_group_refuses_what_the_launcher_decides(kwargs, message):
    with pytest.raises(ValueError, match=message):
        distrib.init_process_group("gloo", **kwargs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")
def test_cuda_module_with_device_ids(comm):
    reference = mlp().cuda()
    ddp = DistributedDataParallel(copy.deepcopy(reference), device_ids=[0], comm=comm, bucket_cap_mb=1e-4)
    x = torch.randn(8, 6)  # on the host: device_ids moves it, as torch's DDP does
    ddp(x).sum().backward()
    reference(x.cuda()).sum().backward()
    for p, q in zip(ddp.parameters(), reference.parameters()):
        assert p.grad.device.type == "cuda" and torch.allclose(p.grad, q.grad)
