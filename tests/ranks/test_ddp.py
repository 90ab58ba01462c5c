"""distrib's DDP at whatever world size launched us, against a one-process reference that sees every rank's data."""

from __future__ import annotations

import gc
import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from distrib import DistributedDataParallel
from distrib.ddp import reducer as reducer_module
from distrib.ddp.reducer import Reducer

pytestmark = pytest.mark.mpi  # pytest-mpi's mark: `mpiexec -n N python -m pytest --with-mpi tests/ranks`
TINY_MB = 1e-6  # every parameter closes its own bucket
ALGORITHMS = ["naive", "ring", "native", "auto"]  # the ones every backend has; auto picks per bucket


def mlp(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))


def batch(rank: int, step: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(4, 5, generator=gen), torch.randn(4, 3, generator=gen)


def reference_grads(model: nn.Module, size: int, steps: range) -> list[torch.Tensor]:
    """Every rank's loss on one process, averaged over ranks and summed over steps: what DDP must produce."""
    model.zero_grad()
    for step in steps:
        for rank in range(size):
            x, y = batch(rank, step)
            (F.mse_loss(model(x), y) / size).backward()
    return [p.grad.clone() for p in model.parameters()]


def everywhere(comm, t: torch.Tensor) -> list[list[float]]:
    return comm.allgather_object(t.detach().reshape(-1).tolist())


@pytest.mark.parametrize("as_view", [False, True], ids=["copy", "view"])
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_gradients_are_averaged_over_ranks(comm, algorithm, as_view):
    ddp = DistributedDataParallel(
        mlp(seed=comm.rank), comm=comm, algorithm=algorithm, bucket_cap_mb=TINY_MB, gradient_as_bucket_view=as_view
    )
    reference = mlp(seed=0)  # construction hands every rank rank 0's weights
    for p, q in zip(ddp.parameters(), reference.parameters()):
        assert torch.equal(p, q)
    for step in range(2):  # the second step reuses the buckets (and, as a view, accumulates into them)
        x, y = batch(comm.rank, step)
        F.mse_loss(ddp(x), y).backward()
        for p, expected in zip(ddp.parameters(), reference_grads(reference, comm.size, range(step + 1))):
            torch.testing.assert_close(p.grad, expected, rtol=1e-5, atol=1e-6)
        if as_view:  # no copy-out: each gradient lives in its bucket
            storages = {b.flat.untyped_storage().data_ptr() for b in ddp.reducer.buckets}
            assert all(p.grad.untyped_storage().data_ptr() in storages for p in ddp.parameters())


def test_allreduces_start_while_backward_runs(comm, monkeypatch):
    model = mlp(seed=0)
    events: list[str] = []
    for name, p in model.named_parameters():  # registered before DDP's hooks, so each runs first
        p.register_post_accumulate_grad_hook(lambda p, name=name: events.append(f"grad {name}"))
    ddp = DistributedDataParallel(model, comm=comm, bucket_cap_mb=TINY_MB)
    x, y = batch(comm.rank)
    F.mse_loss(ddp(x), y).backward()  # as torch's: one bucket in the first iteration, which shows the order
    events.clear()
    launch = comm.allreduce

    def recording(t, *args, **kwargs):
        assert kwargs.get("async_op"), "a bucket's allreduce must not block backward"
        events.append("launch")
        return launch(t, *args, **kwargs)

    finish = ddp.reducer.finalize
    monkeypatch.setattr(comm, "allreduce", recording)
    monkeypatch.setattr(ddp.reducer, "finalize", lambda: events.append("end of backward") or finish())
    F.mse_loss(ddp(x), y).backward()  # its forward rebuilds the buckets in the order gradients became ready
    assert len(ddp.reducer.buckets) == 6 and events.count("launch") == 6, events
    last_grad = events.index("grad 0.weight")  # the first layer's weight is the last gradient backward computes
    assert events.index("end of backward") > last_grad, events
    assert events[:last_grad].count("launch") >= 4, f"allreduces should start during backward: {events}"
    assert events[1] == "launch", events  # the first gradient's bucket goes at once


def test_no_sync_accumulates_locally_then_averages(comm, monkeypatch):
    ddp = DistributedDataParallel(mlp(seed=0), comm=comm)
    reference = mlp(seed=0)
    launches = []
    launch = comm.allreduce
    monkeypatch.setattr(comm, "allreduce", lambda *a, **k: launches.append(1) or launch(*a, **k))
    for step in range(2):
        with ddp.no_sync():
            x, y = batch(comm.rank, step)
            F.mse_loss(ddp(x), y).backward()
        local = reference_grads(reference, 1, range(step + 1)) if comm.rank == 0 else None
        if comm.rank == 0:  # rank 0's own gradients, unaveraged: the reference at size 1 sees only rank 0's data
            for p, expected in zip(ddp.parameters(), local):
                torch.testing.assert_close(p.grad, expected)
    assert not launches, "no_sync must not communicate"
    averaged = reference_grads(reference, comm.size, range(2))
    if comm.size > 1:  # as torch's own test: accumulated local gradients differ from the synchronised ones
        assert not all(torch.allclose(p.grad, q) for p, q in zip(ddp.parameters(), averaged))
    x, y = batch(comm.rank, 2)
    F.mse_loss(ddp(x), y).backward()  # the first synchronised step averages everything accumulated
    for p, expected in zip(ddp.parameters(), reference_grads(reference, comm.size, range(3))):
        torch.testing.assert_close(p.grad, expected, rtol=1e-5, atol=1e-6)


class Branchy(nn.Module):
    """`b` is used only when asked, `c` never (when `with_c`): unused parameters on purpose."""

    def __init__(self, with_c: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(5, 5), nn.Linear(5, 5)
        self.c = nn.Linear(5, 3) if with_c else None
        self.head = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor, use_b: bool) -> torch.Tensor:
        h = self.a(x)
        return self.head(self.b(h) if use_b else h)


@pytest.mark.parametrize("as_view", [False, True], ids=["copy", "view"])
def test_find_unused_parameters(comm, as_view):
    ddp = DistributedDataParallel(
        Branchy(with_c=True), comm=comm, find_unused_parameters=True, gradient_as_bucket_view=as_view
    )
    reference = Branchy(with_c=True)
    for rank in range(comm.size):  # b is used on rank 0 only; c on no rank
        x, y = batch(rank)
        (F.mse_loss(reference(x, use_b=rank == 0), y) / comm.size).backward()
    x, y = batch(comm.rank)
    F.mse_loss(ddp(x, use_b=comm.rank == 0), y).backward()
    for (name, p), q in zip(ddp.module.named_parameters(), reference.parameters()):
        if name.startswith("c."):
            assert p.grad is None, "a parameter no rank used keeps its gradient untouched, as in torch"
        else:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.mpi(min_size=2)
def test_parameter_used_on_some_ranks_is_averaged_with_find_unused_parameters(comm):
    ddp = DistributedDataParallel(Branchy(with_c=False), comm=comm, find_unused_parameters=True)
    reference = Branchy(with_c=False)
    for rank in range(comm.size):
        x, y = batch(rank)
        (F.mse_loss(reference(x, use_b=rank == 0), y) / comm.size).backward()
    x, y = batch(comm.rank)
    F.mse_loss(ddp(x, use_b=comm.rank == 0), y).backward()  # b: rank 0's gradient, zeros from the others
    for (name, p), q in zip(ddp.module.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=name)


def test_buffers_follow_rank_0(comm):
    torch.manual_seed(comm.rank)
    model = nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6))
    bn = model[1]
    with torch.no_grad():
        bn.running_mean.uniform_()  # differ across ranks before construction
    ddp = DistributedDataParallel(model, comm=comm)
    assert all(row == everywhere(comm, bn.running_mean)[0] for row in everywhere(comm, bn.running_mean))
    with torch.no_grad():
        bn.running_mean.fill_(comm.rank + 1.0)
        bn.num_batches_tracked.fill_(comm.rank + 7)
    x, _ = batch(comm.rank)
    expected_mean = 0.9 * 1.0 + 0.1 * model[0](x).mean(0)  # rank 0's running mean, then this rank's batch
    ddp(x)  # train mode: rank 0's buffers arrive before forward, then this rank's batch updates them
    torch.testing.assert_close(bn.running_mean, expected_mean.detach())
    assert int(bn.num_batches_tracked) == 8
    plain = DistributedDataParallel(
        nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6)), comm=comm, broadcast_buffers=False
    )
    with torch.no_grad():
        plain.module[1].running_mean.fill_(comm.rank)
    plain.eval()
    plain(x)
    assert plain.module[1].running_mean.tolist() == [float(comm.rank)] * 6


@pytest.mark.mpi(min_size=2)
def test_model_that_differs_across_ranks_is_named_at_construction(comm):
    last = comm.size - 1
    model = nn.Sequential(nn.Linear(5, 4), nn.Linear(4 + (comm.rank == last), 3))
    start = time.monotonic()
    where = "this process" if comm.rank == last else f"process {last}"
    expected = rf"\[{comm.rank}\]: params\[2\] in {where} with sizes \[3, 5\] appears not to match sizes of the same"
    with pytest.raises(RuntimeError, match=expected):  # torch's words, on every rank (torch: on the others only)
        DistributedDataParallel(model, comm=comm)
    assert time.monotonic() - start < 10


def test_reducer_launches_buckets_in_order_whatever_order_they_fill(comm, monkeypatch):
    queued = []  # what the reducer asks autograd's engine to run at the end of backward (no backward runs here)
    monkeypatch.setattr(reducer_module, "_engine", type("Engine", (), {"queue_callback": staticmethod(queued.append)}))
    params = [torch.zeros(3, requires_grad=True) for _ in range(3)]
    reducer = Reducer(comm, params, ["a", "b", "c"], first_cap=1, cap=1, algorithm="native", grad_as_view=False,
                      find_unused=True, sparse=[False] * 3)  # fmt: skip
    order = [b.indices[0] for b in reducer.buckets]
    assert order == [2, 1, 0]
    for p in params:
        p.grad = torch.full((3,), float(comm.rank))
    reducer.prepare_for_backward([])
    reducer.autograd_hook(0)  # the last bucket fills first: held until the others have gone
    assert reducer.launched == 0
    reducer.autograd_hook(2)
    assert reducer.launched == 1
    reducer.autograd_hook(1)
    assert reducer.launched == 3 and queued == [reducer.finalize]
    queued[0]()
    mean = sum(range(comm.size)) / comm.size
    assert all(torch.allclose(p.grad, torch.full((3,), mean)) for p in params)
    comm.allreduce(torch.ones(10), algorithm="ring")


@pytest.mark.parametrize("as_view", [False, True], ids=["copy", "view"])
def test_shm_buckets_live_in_shared_memory_and_average_exactly(comm, as_view):
    """With algorithm "shm" the rebuilt buckets are regions every rank maps, reduced where they lie; gradients
    match the one-process reference step after step, and outlive the DDP that made them."""
    if comm.backend != "mpi":
        pytest.skip("algorithm 'shm' is for the mpi backend")
    ddp = DistributedDataParallel(mlp(seed=comm.rank), comm=comm, algorithm="shm", bucket_cap_mb=TINY_MB,
                                  gradient_as_bucket_view=as_view)  # fmt: skip
    reference, regions = mlp(seed=0), comm._shm().regions
    for step in range(3):  # the second forward rebuilds the buckets, in shared memory
        x, y = batch(comm.rank, step)
        F.mse_loss(ddp(x), y).backward()
        for p, expected in zip(ddp.parameters(), reference_grads(reference, comm.size, range(step, step + 1))):
            torch.testing.assert_close(p.grad, expected, rtol=1e-5, atol=1e-6)
        shared = [regions.of(b.flat) is not None for b in ddp.reducer.buckets]
        assert all(shared) if step else not any(shared), (step, shared)
        ddp.zero_grad(set_to_none=True)
    F.mse_loss(ddp(x), y).backward()
    grads = [p.grad for p in ddp.parameters()]
    values = [g.clone() for g in grads]
    del ddp
    gc.collect()
    assert all(torch.equal(g, v) for g, v in zip(grads, values))  # the tensors keep their memory mapped


def test_a_kept_gradient_in_a_shared_bucket_is_never_written_over(comm):
    """A gradient the user keeps past zero_grad (not a bucket view) keeps its values: the bucket moves to memory
    of its own for the next backward, as an ordinary bucket does."""
    if comm.backend != "mpi":
        pytest.skip("algorithm 'shm' is for the mpi backend")
    ddp = DistributedDataParallel(mlp(seed=comm.rank), comm=comm, algorithm="shm", bucket_cap_mb=TINY_MB)
    reference, regions = mlp(seed=0), comm._shm().regions
    for step in range(2):  # the second in the rebuilt, shared buckets
        x, y = batch(comm.rank, step)
        F.mse_loss(ddp(x), y).backward()
        kept = [p.grad for p in ddp.parameters()]
        ddp.zero_grad(set_to_none=True)
    assert all(regions.of(b.flat) is not None for b in ddp.reducer.buckets)
    x, y = batch(comm.rank, 2)
    F.mse_loss(ddp(x), y).backward()
    for g, expected in zip(kept, reference_grads(reference, comm.size, range(1, 2))):
        torch.testing.assert_close(g, expected, rtol=1e-5, atol=1e-6)
    for p, expected in zip(ddp.parameters(), reference_grads(reference, comm.size, range(2, 3))):
        torch.testing.assert_close(p.grad, expected, rtol=1e-5, atol=1e-6)
    assert not any(regions.of(b.flat) is not None for b in ddp.reducer.buckets)  # renewed: ordinary memory


def test_shm_buckets_fall_back_to_ordinary_memory_where_shared_memory_is_full(comm, monkeypatch):
    """One rank's /dev/shm cannot hold its bucket (ENOSPC at allocation, not SIGBUS at first touch): every rank
    keeps ordinary buckets, and the gradients are still averaged."""
    if comm.backend != "mpi":
        pytest.skip("algorithm 'shm' is for the mpi backend")
    import errno
    import os

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    if comm.rank == comm.size - 1:
        monkeypatch.setattr(os, "posix_fallocate", full)
    ddp = DistributedDataParallel(mlp(seed=comm.rank), comm=comm, algorithm="shm", bucket_cap_mb=TINY_MB)
    reference, regions = mlp(seed=0), comm._shm().regions
    for step in range(2):
        x, y = batch(comm.rank, step)
        F.mse_loss(ddp(x), y).backward()
        for p, expected in zip(ddp.parameters(), reference_grads(reference, comm.size, range(step, step + 1))):
            torch.testing.assert_close(p.grad, expected, rtol=1e-5, atol=1e-6)
        ddp.zero_grad(set_to_none=True)
    assert not any(regions.of(b.flat) is not None for b in ddp.reducer.buckets)
