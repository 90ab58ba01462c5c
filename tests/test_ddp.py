"""DistributedDataParallel in one process (a world of one): bucket layout, gradients, state_dict, bad arguments."""

from __future__ import annotations

import copy
import gc
import random
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import distrib
from distrib import DistributedDataParallel
from distrib.comm.local import LocalCommunicator
from distrib.ddp.buckets import UNLIMITED, assign, initial_layout


@pytest.fixture
def comm() -> LocalCommunicator:
    return LocalCommunicator(timeout=5)


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4))


@pytest.mark.parametrize(
    "sizes,dtypes,limits",
    [
        ([100, 200, 100, 50], "ffff", [400]),
        ([50, 50, 50, 50, 100, 100], "fdfdfd", [400]),
        ([10, 10, 10, 10], "ffff", [40, 80]),
        ([50, 25, 50, 25, 50, 25], "fdfdfd", [200, 400]),
        ([256 * 256, 256, 256 * 256, 256], "ffff", [UNLIMITED]),
        ([100, 200, 100, 50, 10], "fSffS", [400]),  # S: a parameter with a sparse gradient (an embedding's)
        ([10, 10, 10, 10], "SffS", [UNLIMITED]),
    ],
)
def test_bucket_assignment_is_torchs(sizes, dtypes, limits):
    """The same buckets as torch's own assignment (its C++ _compute_bucket_assignment_by_size) on the same tensors;
    a sparse gradient alone in its bucket."""
    kinds = {"f": torch.float32, "d": torch.float64, "S": torch.float32}
    params = [torch.empty(n, dtype=kinds[d]) for n, d in zip(sizes, dtypes)]
    sparse = [d == "S" for d in dtypes]
    expected, _ = torch.distributed._compute_bucket_assignment_by_size(params, limits, sparse)
    assert sorted(assign(params, range(len(params)), limits, sparse), key=min) == expected
    assert initial_layout(params, limits, sparse) == expected[::-1]  # reversed: the last layers' bucket goes first


def test_rebuilt_bucket_assignment_is_torchs_in_ready_order():
    """The rebuild's assignment, in gradient-ready order, as torch's own on random mixes of dtypes, sizes and
    limits, the order of the buckets included: torch's open buckets leave a C++ hash map in the reverse order of
    their dtypes' first parameters (a comm hook's bucket.index() follows it)."""
    gen = random.Random(0)
    dtypes = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
    for _ in range(500):
        count = gen.randint(1, 12)
        kinds = dtypes[: gen.randint(1, 4)]
        params = [torch.empty(gen.randint(1, 300), dtype=gen.choice(kinds)) for _ in range(count)]
        order = gen.sample(range(count), count)
        limits = gen.choice([[UNLIMITED], [512], [256, 1024], [100, 2000]])
        sparse = [False] * count
        expected, _ = torch.distributed._compute_bucket_assignment_by_size(
            [params[i] for i in order], limits, sparse, order
        )
        assert assign(params, order, limits, sparse) == [list(b) for b in expected], (order, limits)


@pytest.mark.parametrize("as_view", [False, True], ids=["copy", "view"])
def test_world_of_one_gives_the_plain_module_sparse_gradients(comm, as_view):
    """An embedding's sparse gradient stays sparse, in a bucket of its own, and equals the plain module's."""
    torch.manual_seed(0)
    reference = nn.Sequential(nn.Embedding(10, 4, sparse=True), nn.Linear(4, 2))
    ddp = DistributedDataParallel(copy.deepcopy(reference), comm=comm, gradient_as_bucket_view=as_view)
    assert [b.indices for b in ddp.reducer.buckets] == [[1, 2], [0]]  # reversed model order, as torch's
    for step in range(3):
        x = torch.randint(0, 10, (6,))
        ddp(x).sum().backward()
        reference(x).sum().backward()
        got, want = ddp.module[0].weight.grad, reference[0].weight.grad
        assert got.is_sparse and torch.equal(got.to_dense(), want.to_dense()), step
        assert torch.equal(ddp.module[1].weight.grad, reference[1].weight.grad)


@pytest.mark.parametrize("as_view", [False, True], ids=["copy", "view"])
def test_world_of_one_gives_the_plain_module_gradients(comm, as_view):
    reference = mlp()
    ddp = DistributedDataParallel(
        copy.deepcopy(reference), comm=comm, bucket_cap_mb=1e-4, gradient_as_bucket_view=as_view
    )
    assert len(ddp.reducer.buckets) == 1  # as torch: one bucket until the first iteration shows the order
    x, y = torch.randn(8, 6), torch.randn(8, 4)
    for _ in range(3):  # accumulating, as without DDP; the buckets are rebuilt in the second forward
        F.mse_loss(ddp(x), y).backward()
        F.mse_loss(reference(x), y).backward()
        for (name, p), q in zip(ddp.module.named_parameters(), reference.parameters()):
            assert torch.equal(p.grad, q.grad), name
    assert len(ddp.reducer.buckets) > 1
    flat = {b.flat.untyped_storage().data_ptr() for b in ddp.reducer.buckets}
    assert all(p.grad.untyped_storage().data_ptr() in flat for p in ddp.parameters())  # handed over, not copied
    assert all((p.grad._base is not None) == as_view for p in ddp.parameters())  # a view only when asked for one
    kept = [p.grad for p in ddp.parameters()]
    before = [g.clone() for g in kept]
    ddp.zero_grad(set_to_none=True)
    F.mse_loss(ddp(2 * x), y).backward()  # kept gradients change only where torch's do: views of the buckets
    assert all(torch.equal(g, b) != as_view for g, b in zip(kept, before))
    assert not any(torch.equal(p.grad, b) for p, b in zip(ddp.parameters(), before))


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


def test_reentrant_backward_gives_the_plain_gradients(comm):
    """A layer recomputed in a backward of its own (reentrant checkpointing): torch's DDP handles it; so does ours."""
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    reference = copy.deepcopy(model)
    ddp = DistributedDataParallel(model, comm=comm)

    class Checkpointed(nn.Module):
        def __init__(self, layers):
            super().__init__()
            self.layers = layers

        def forward(self, x):
            return self.layers[1](Recompute.apply(self.layers[0], x))

    ddp.module = Checkpointed(model)  # the same parameters, the first layer's recomputed in a backward of its own
    x = torch.randn(3, 4, requires_grad=True)
    for _ in range(2):
        ddp(x).sum().backward()
        reference(x).sum().backward()
        for p, q in zip(model.parameters(), reference.parameters()):
            torch.testing.assert_close(p.grad, q.grad)


@pytest.mark.parametrize(
    "kwargs,error,message",
    [
        ({"bucket_cap_mb": 0}, ValueError, "bucket_cap_mb must be a positive number of MiB, got 0"),
        ({"algorithm": "fast"}, ValueError, "algorithm must be one of .*got 'fast'"),
        ({"device_ids": [0, 1]}, ValueError, r"device_ids can only be None or contain a single element\."),
        ({"device_ids": [0]}, ValueError, r"device_ids and output_device arguments only work with .*device_ids \[0\]"),
        ({"output_device": 1}, ValueError, "device_ids and output_device arguments only work with"),
        ({"process_group": "nccl"}, TypeError, "must be a torch.distributed ProcessGroup or a distrib Communicator"),
        ({"mixed_precision": object()}, NotImplementedError, "does not support mixed_precision; leave it unset"),
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
    with pytest.raises(RuntimeError, match="DistributedDataParallel is not needed when a module doesn't have any"):
        DistributedDataParallel(frozen, comm=comm)
    mixed = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2, device="meta"))
    with pytest.raises(ValueError, match="input module must be on the same type of devices"):
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


def test_an_instance_of_torchs_class_whose_internals_refuse_by_name(comm):
    """A subclass of torch's DDP (torch's tools find a DDP), none of whose reducer-bound internals run torch's code:
    each says it is torch's and not distrib's, instead of failing inside torch."""
    from distrib.ddp.wrapper import _TORCH_INTERNALS

    ddp = DistributedDataParallel(mlp(), comm=comm)
    assert isinstance(ddp, torch.nn.parallel.DistributedDataParallel)
    for name in _TORCH_INTERNALS:
        with pytest.raises(NotImplementedError, match=f"does not have torch's {name}: it works on torch's own"):
            getattr(ddp, name)()
    inputs, kwargs = ddp.to_kwargs((torch.ones(2),), {"x": 2}, 0)  # torch's own helper, inherited, works
    assert inputs[0][0].tolist() == [1.0, 1.0] and kwargs == ({"x": 2},)
