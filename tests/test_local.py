"""A world of one rank, and every bad argument a collective can get: clear errors, raised before any traffic."""

from __future__ import annotations

import pytest
import torch

from distrib import ALGORITHMS, CollectiveTimeout
from distrib.comm.arrays import chunks
from distrib.comm.engine import Engine
from distrib.comm.local import LocalCommunicator


@pytest.fixture
def comm() -> LocalCommunicator:
    return LocalCommunicator(timeout=5)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_world_of_one_is_the_identity(comm, algorithm):
    t = torch.arange(12, dtype=torch.float32).view(4, 3)
    expected = t.clone()
    assert torch.equal(comm.allreduce(t, op="avg", algorithm=algorithm), expected)
    assert torch.equal(comm.reduce_scatter(t.clone(), algorithm=algorithm), expected)
    assert torch.equal(comm.allgather(t, algorithm=algorithm), expected)
    assert torch.equal(comm.broadcast(t), expected)
    assert torch.equal(comm.allreduce(t, async_op=True, algorithm=algorithm).wait(), expected)
    assert comm.barrier() is None
    assert comm.allgather_object("x") == ["x"] and comm.broadcast_object("y") == "y"


def test_no_peers_to_talk_to(comm):
    with pytest.raises(ValueError, match="no peers"):
        comm.send(torch.ones(1), 0)


@pytest.mark.parametrize(
    "call,error,message",
    [
        (lambda c: c.allreduce([1.0, 2.0]), TypeError, "collectives take a torch.Tensor, got list"),
        (lambda c: c.allreduce(torch.ones(2, dtype=torch.bool)), TypeError, "dtype torch.bool is not supported"),
        (lambda c: c.allreduce(torch.ones(2, dtype=torch.complex64), op="max"), ValueError, "no meaning on torch.c"),
        (lambda c: c.broadcast(torch.ones(2).to_sparse()), TypeError, "collectives take dense tensors .*sparse"),
        (
            lambda c: c.allreduce(torch.ones(2), op="prod"),
            ValueError,
            "op must be one of sum, avg, max, min; got 'prod'",
        ),
        (lambda c: c.allreduce(torch.ones(2, dtype=torch.int32), op="avg"), ValueError, "needs a floating-point"),
        (lambda c: c.allreduce(torch.ones(2), algorithm="tree"), ValueError, "algorithm must be one of naive, ring"),
        (lambda c: c.reduce_scatter(torch.tensor(1.0)), ValueError, "dim 0 divisible by the world size 1"),
        (
            lambda c: c.allgather(torch.ones(2), out=torch.ones(3)),
            ValueError,
            r"shape \(2,\), got torch.float32 \(3,\)",
        ),
        (lambda c: c.broadcast(torch.ones(2), root=1), ValueError, "root 1 is not a rank of a world of size 1"),
    ],
)
def test_bad_arguments_fail_clearly(comm, call, error, message):
    comm.allreduce(torch.ones(2))  # a good call of the same shape first: the kind it leaves lets no bad call pass
    for _ in range(2):  # and a bad call fails every time, not only the first (kinds are remembered: comm/kinds.py)
        with pytest.raises(error, match=message):
            call(comm)


def test_bad_timeouts_fail_clearly(monkeypatch):  # every source and value: tests/test_timeouts.py
    with pytest.raises(ValueError, match=r"LocalCommunicator\(timeout=0\) is not a deadline"):
        LocalCommunicator(timeout=0)
    monkeypatch.setenv("DISTRIB_TIMEOUT", "soon")
    with pytest.raises(ValueError, match="DISTRIB_TIMEOUT='soon' is not a deadline"):
        LocalCommunicator()
    monkeypatch.setenv("DISTRIB_TIMEOUT", "7.5")
    assert LocalCommunicator().timeout == 7.5


def test_timeout_error_names_the_missing_ranks(comm):
    assert "waited 5 s for rank(s) [2, 3]" in str(comm._timeout("ring step 1/3", [3, 2, 3]))
    assert "for the other ranks" in str(comm._timeout("MPI allreduce", [-1]))
    assert issubclass(CollectiveTimeout, RuntimeError)


@pytest.mark.parametrize("n,parts", [(0, 3), (2, 3), (10, 3), (1_000_003, 4), (12, 4)])
def test_chunks_cover_the_range_in_order(n, parts):
    bounds = chunks(n, parts)
    sizes = [stop - start for start, stop in bounds]
    assert len(bounds) == parts and bounds[0][0] == 0 and bounds[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
    assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


def test_engine_runs_in_order_and_fails_what_follows_a_failure():
    engine = Engine("test")
    seen: list[int] = []
    first = [engine.submit(lambda i=i: seen.append(i) or i) for i in range(5)]
    assert [h.wait() for h in first] == list(range(5)) and seen == list(range(5))
    boom = engine.submit(lambda: 1 / 0)
    after = engine.submit(lambda: "never runs")
    with pytest.raises(ZeroDivisionError):
        boom.wait()
    with pytest.raises(ZeroDivisionError):  # a collective after a failed one would only hang or mismatch
        after.wait()
    assert boom.is_completed() and after.is_completed() and engine.idle
