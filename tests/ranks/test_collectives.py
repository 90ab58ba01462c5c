"""Every collective, every algorithm, against a float64 numpy reference, at whatever world size launched us."""

from __future__ import annotations

import dataclasses
import functools
import json
import random
import re

import numpy as np
import pytest
import torch

from distrib import CollectiveError, CollectiveTimeout
from distrib.comm import algorithms, auto
from distrib.comm.topology import Topology

pytestmark = pytest.mark.mpi  # pytest-mpi's mark: `mpiexec -n N python -m pytest --with-mpi tests/ranks`
ALGORITHMS = ["naive", "ring", "native", "shm", "halving_doubling", "hierarchical"]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int32, torch.int64]
HALF = (torch.float16, torch.bfloat16)


@pytest.fixture(autouse=True)
def _shm_needs_mpi(request, comm):
    """Algorithm "shm" runs on the mpi backend only; test_shm_refused_elsewhere checks the others refuse it."""
    params = getattr(request.node, "callspec", None)
    if params and params.params.get("algorithm") == "shm" and comm.backend != "mpi":
        pytest.skip(f"algorithm 'shm' is for the mpi backend, not {comm.backend}")


def rank_tensor(rank: int, numel: int, dtype: torch.dtype) -> torch.Tensor:
    """Rank `rank`'s input: different on every rank, reproducible on every rank; a fresh copy to change in place."""
    return _rank_input(rank, numel, dtype).clone()


@functools.lru_cache(maxsize=16)  # the tests of every algorithm draw the same inputs: drawn once
def _rank_input(rank: int, numel: int, dtype: torch.dtype) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1000 * rank + numel)
    if dtype.is_floating_point:
        return (torch.randn(numel, generator=gen, dtype=torch.float64) * 4).to(dtype)
    return torch.randint(-100, 100, (numel,), generator=gen, dtype=dtype)


@functools.lru_cache(maxsize=16)  # every algorithm's test of a kind compares with the same one: made once, read-only
def reference(size: int, numel: int, dtype: torch.dtype, op: str) -> np.ndarray:
    inputs = np.stack([rank_tensor(r, numel, dtype).double().numpy() for r in range(size)])
    expected = {"sum": np.sum, "avg": np.mean, "max": np.max, "min": np.min}[op](inputs, 0)
    expected.flags.writeable = False
    return expected


def assert_matches(result: torch.Tensor, expected: np.ndarray, dtype: torch.dtype, size: int) -> None:
    got = result.double().numpy()
    if dtype in HALF:  # partial sums are rounded to 8 (bf16) or 11 (fp16) bits along the way
        eps = 2**-8 if dtype == torch.bfloat16 else 2**-11
        np.testing.assert_allclose(got, expected, rtol=4 * size * eps, atol=4 * 4 * size * eps)
    elif dtype == torch.float32:
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    else:
        np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)  # another summation order


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("numel", [0, 1, 3, 10, 1_000_003])  # 3 < 4 ranks; 1_000_003 is prime
def test_allreduce_sum(comm, algorithm, dtype, numel):
    t = rank_tensor(comm.rank, numel, dtype)
    assert comm.allreduce(t, algorithm=algorithm) is t  # in place
    assert_matches(t, reference(comm.size, numel, dtype, "sum"), dtype, comm.size)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_allreduce_same_bits_on_every_rank(comm, algorithm):
    """Replicas stay identical only if every rank gets the very same float32 bits, not just close ones."""
    t = rank_tensor(comm.rank, 700_001, torch.float32) * 1000
    comm.allreduce(t, algorithm=algorithm)
    everyone = comm.allgather(t)
    assert all(torch.equal(everyone[r * t.numel() : (r + 1) * t.numel()], t) for r in range(comm.size))


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("op", ["avg", "max", "min"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int64], ids=str)
def test_allreduce_ops(comm, algorithm, op, dtype):
    if op == "avg" and not dtype.is_floating_point:
        pytest.skip("avg of integers is refused (tested in test_local.py)")
    t = rank_tensor(comm.rank, 1001, dtype)
    comm.allreduce(t, op=op, algorithm=algorithm)
    assert_matches(t, reference(comm.size, 1001, dtype, op), dtype, comm.size)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_allreduce_multidimensional_and_non_contiguous(comm, algorithm):
    base = rank_tensor(comm.rank, 6 * 7, torch.float32).view(6, 7)
    t = base.t()  # a non-contiguous view: reduced through a contiguous copy, written back in place
    assert not t.is_contiguous()
    comm.allreduce(t, algorithm=algorithm)
    expected = reference(comm.size, 6 * 7, torch.float32, "sum").reshape(6, 7)
    np.testing.assert_allclose(base.numpy(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int32], ids=str)
@pytest.mark.parametrize("rows", [0, 1, 5])
def test_reduce_scatter(comm, algorithm, dtype, rows):
    n = comm.size
    t = rank_tensor(comm.rank, rows * n * 3, dtype).view(rows * n, 3)
    part = comm.reduce_scatter(t, algorithm=algorithm)
    expected = reference(n, rows * n * 3, dtype, "sum").reshape(rows * n, 3)[comm.rank * rows : (comm.rank + 1) * rows]
    assert part.shape == (rows, 3) and part.dtype == dtype
    assert_matches(part, expected, dtype, n)


@pytest.mark.mpi(min_size=2)
def test_naive_reduce_scatter_sends_each_rank_its_chunk_only(comm, monkeypatch):
    """Not a whole allreduce: a rank other than 0 receives its own chunk, 1/size of the tensor, and nothing more."""
    received = []
    post = comm.post
    monkeypatch.setattr(
        comm, "post", lambda sends=(), recvs=(): received.extend(len(r) for r, _ in recvs) or post(sends, recvs)
    )
    t = rank_tensor(comm.rank, comm.size * 1000, torch.float32)
    part = comm.reduce_scatter(t, algorithm="naive")
    assert_matches(
        part,
        reference(comm.size, comm.size * 1000, torch.float32, "sum")[comm.rank * 1000 : (comm.rank + 1) * 1000],
        torch.float32,
        comm.size,
    )
    if comm.rank:
        assert received == [1000], received


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_reduce_scatter_avg(comm, algorithm):
    t = rank_tensor(comm.rank, comm.size * 11, torch.float64)
    part = comm.reduce_scatter(t, op="avg", algorithm=algorithm)
    expected = reference(comm.size, comm.size * 11, torch.float64, "avg")[comm.rank * 11 : (comm.rank + 1) * 11]
    assert_matches(part, expected, torch.float64, comm.size)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.int64], ids=str)
@pytest.mark.parametrize("shape", [(), (0,), (1,), (2, 3), (1_000_003,)], ids=str)
def test_allgather(comm, algorithm, dtype, shape):
    numel = int(np.prod(shape))
    t = rank_tensor(comm.rank, numel, dtype).view(shape)
    out = comm.allgather(t, algorithm=algorithm)
    rows = shape[0] if shape else 1
    assert out.shape == (comm.size * rows, *shape[1:])
    for r in range(comm.size):
        assert torch.equal(out[r * rows : (r + 1) * rows].reshape(-1), rank_tensor(r, numel, dtype))


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_allgather_in_place_into_out(comm, algorithm):
    """ZeRO's use: this rank's shard already sits in its slot of the flat buffer."""
    out = torch.zeros(comm.size * 7)
    mine = out[comm.rank * 7 : (comm.rank + 1) * 7]
    mine.copy_(rank_tensor(comm.rank, 7, torch.float32))
    assert comm.allgather(mine, out=out, algorithm=algorithm) is out
    expected = torch.cat([rank_tensor(r, 7, torch.float32) for r in range(comm.size)])
    assert torch.equal(out, expected)


@pytest.mark.parametrize("root", ["first", "last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int64], ids=str)
def test_broadcast(comm, root, dtype):
    root = 0 if root == "first" else comm.size - 1
    t = rank_tensor(comm.rank, 1001, dtype).view(7, 11, 13)
    assert comm.broadcast(t, root=root) is t
    assert torch.equal(t.reshape(-1), rank_tensor(root, 1001, dtype))


@pytest.mark.parametrize("check", ["fingerprint", "off"])
def test_repeated_allreduces_restart_a_saved_request_only_where_every_rank_s_memory_is_the_same(comm, check):
    """MPI: an allreduce made again on the same memory restarts the persistent request its kind saved. Where one
    rank's tensor moved (odd ranks allocate anew from the third call) every rank makes a new one together; a
    transposed view of the same memory (same shape, same address) is staged; each sum is right and nothing hangs,
    with the check on (votes read once all ranks are in) and off (votes waited for)."""
    if comm.backend != "mpi" or comm.size == 1 or not comm._persists:
        pytest.skip("persistent allreduces are the mpi backend's, for 2+ ranks of an MPI-4 library")
    comm.verify, kept, made = check, torch.zeros(64, 64), []

    def saved() -> object:  # the persistent request of this test's kind of call
        return next(r for k, (_, r) in comm._saved.items() if (k.nbytes, k.op, k.label) == (64 * 64 * 4, "sum", None))

    try:
        for step in range(6):
            moved = comm.rank % 2 == 1 and step >= 2
            t = torch.zeros(64, 64) if moved else kept
            t.copy_(rank_tensor(comm.rank, 64 * 64, torch.float32).view(64, 64) + step)
            comm.allreduce(t)
            expected = reference(comm.size, 64 * 64, torch.float32, "sum").reshape(64, 64) + comm.size * step
            np.testing.assert_allclose(t.numpy(), expected, rtol=1e-5, atol=1e-5)
            made.append(saved())
        assert made[0] is made[1]  # restarted, not made again
        assert made[2] is not made[1] and made[3] is not made[2]  # rank 1's memory moved: made again on every rank
        for step in range(2):  # asynchronous calls: the first makes one on kept's memory, the second restarts it
            kept.copy_(rank_tensor(comm.rank, 64 * 64, torch.float32).view(64, 64) - step)
            assert comm.allreduce(kept, async_op=True).wait() is kept
            expected = reference(comm.size, 64 * 64, torch.float32, "sum").reshape(64, 64) - comm.size * step
            np.testing.assert_allclose(kept.numpy(), expected, rtol=1e-5, atol=1e-5)
            made.append(saved())
        assert made[-2] is not made[-3] and made[-1] is made[-2]
        view = kept.t()  # same shape, same address, not contiguous: reduced through a copy, written back
        view.copy_(rank_tensor(comm.rank, 64 * 64, torch.float32).view(64, 64))
        comm.allreduce(view)
        expected = reference(comm.size, 64 * 64, torch.float32, "sum").reshape(64, 64)
        np.testing.assert_allclose(view.numpy(), expected, rtol=1e-5, atol=1e-5)
    finally:
        comm.verify = "fingerprint"


def test_async_handles_complete_in_order(comm):
    algorithms = [a for a in ALGORITHMS if a != "shm" or comm.backend == "mpi"]
    tensors = [rank_tensor(comm.rank, 5000, torch.float64) for _ in algorithms]
    handles = [comm.allreduce(t, algorithm=a, async_op=True) for t, a in zip(tensors, algorithms)]
    comm.barrier()  # a blocking call queues behind the async ones instead of overtaking them
    for handle, t in reversed(list(zip(handles, tensors))):
        assert handle.wait() is t
        assert handle.is_completed()
        assert_matches(t, reference(comm.size, 5000, torch.float64, "sum"), torch.float64, comm.size)


def test_async_reduce_scatter_and_allgather(comm):
    t = rank_tensor(comm.rank, comm.size * 4, torch.float32)
    part = comm.reduce_scatter(t, algorithm="ring", async_op=True).wait()
    out = comm.allgather(part, algorithm="ring", async_op=True).wait()
    assert_matches(out, reference(comm.size, comm.size * 4, torch.float32, "sum"), torch.float32, comm.size)


def test_shm_refused_elsewhere(comm):
    if comm.backend == "mpi":
        pytest.skip("the mpi backend runs algorithm 'shm' (the tests above)")
    with pytest.raises(ValueError, match=f"algorithm 'shm' needs the mpi backend .*not '{comm.backend}'; use 'ring'"):
        comm.allreduce(torch.ones(4), algorithm="shm")


def test_shm_pieces_of_every_size(comm):
    """Tensors of several shared-memory pieces, with a ragged last one, and pieces of other dtypes in between."""
    if comm.backend != "mpi":
        pytest.skip("algorithm 'shm' is for the mpi backend")
    for numel, dtype in [(700_001, torch.float32), (3 * 131_072 + 5, torch.float64), (600_000, torch.bfloat16)]:
        t = rank_tensor(comm.rank, numel, dtype)
        comm.allreduce(t, algorithm="shm")
        assert_matches(t, reference(comm.size, numel, dtype, "sum"), dtype, comm.size)
    rows = comm.size * 300_001
    part = comm.reduce_scatter(rank_tensor(comm.rank, rows, torch.float32), algorithm="shm")
    expected = reference(comm.size, rows, torch.float32, "sum")[comm.rank * 300_001 : (comm.rank + 1) * 300_001]
    assert_matches(part, expected, torch.float32, comm.size)


@pytest.mark.mpi(min_size=2)
def test_shm_wait_names_the_rank_that_never_arrives(comm):
    """A rank missing from a shared-memory collective: the others raise CollectiveTimeout naming it, no hang."""
    if comm.backend != "mpi":
        pytest.skip("algorithm 'shm' needs the mpi backend")
    from distrib.comm.mpi import MPICommunicator

    late = MPICommunicator(timeout=1)
    late.verify = "off"  # no check before the call: the wait that times out is shm's own
    late.allreduce(torch.ones(8), algorithm="shm")  # every rank: the window is set up
    if comm.rank == 0:
        missing = re.escape(str(list(range(1, comm.size))))
        pattern = rf"shm allreduce \(call #2\): rank 0 waited 1 s for rank\(s\) {missing}: rank 1 has not called it"
        with pytest.raises(CollectiveTimeout, match=pattern):
            late.allreduce(torch.ones(8), algorithm="shm")
        with pytest.raises(CollectiveError, match=r"timed out in call #2 \(shm allreduce\) and cannot be used again"):
            late.allreduce(torch.ones(8), algorithm="shm")  # its peers may still write call #2's data: refused
    comm.barrier()
    late.close()
    with pytest.raises(CollectiveError, match=r"this communicator was closed \(close\(\)\)"):
        late.barrier()
    late.close()  # a second close does nothing


@pytest.mark.mpi(min_size=2)
def test_close_lets_queued_calls_finish(comm):
    if comm.backend != "mpi":
        pytest.skip("a second communicator of its own: the mpi backend's")
    from distrib.comm.mpi import MPICommunicator

    other = MPICommunicator(timeout=30)
    handles = [other.allreduce(torch.ones(4) * k, async_op=True) for k in range(3)]
    other.close()
    assert [h.wait().tolist() for h in handles] == [[k * comm.size] * 4 for k in range(3)]


def test_shm_buffers_reused_by_pieces_of_every_size(comm):
    """Tiny pieces, so buffers are reused many times by pieces of different layouts: wrong waits would race."""
    if comm.backend != "mpi":
        pytest.skip("algorithm 'shm' is for the mpi backend")
    from distrib.comm.shm import SharedMemory

    shared, rng, n = SharedMemory(comm._host, comm._until, piece_bytes=4096), random.Random(7), comm.size
    for _ in range(30):
        numel, dtype = rng.choice([1, 7, 1000, 3001]), rng.choice([torch.float64, torch.int32])
        t = rank_tensor(comm.rank, numel * n, dtype)
        expected = reference(n, numel * n, dtype, "sum")
        kind = rng.choice(["allreduce", "reduce_scatter", "allgather"])
        if kind == "allreduce":
            shared.allreduce_(t, "sum")
            assert_matches(t, expected, dtype, n)
        elif kind == "reduce_scatter":
            assert_matches(
                shared.reduce_scatter_(t, "sum"), expected[comm.rank * numel : (comm.rank + 1) * numel], dtype, n
            )
        else:
            shared.allgather_(t)  # every rank's chunk k comes from rank k
            assert torch.equal(
                t.view(n, numel), torch.stack([rank_tensor(k, numel * n, dtype).view(n, numel)[k] for k in range(n)])
            )
    shared.close()


PRETEND = {  # hosts the ranks of one machine pretend to be on: host-major, alternating, one rank each
    2: [((0,), (1,))],
    3: [((0,), (1,), (2,))],
    4: [((0, 1), (2, 3)), ((0, 2), (1, 3)), ((0,), (1,), (2,), (3,))],
}


@pytest.fixture
def pretend(comm, monkeypatch):
    """Make `comm` take the ranks to sit on the given hosts; the sub-communicators made for them are closed after."""
    made = {}

    def on(hosts: tuple[tuple[int, ...], ...]) -> None:
        monkeypatch.setattr(comm, "_topology", Topology(hosts))
        monkeypatch.setattr(comm, "_groups", made)

    yield on
    if comm.backend == "mpi":
        for group in dict.fromkeys(g for pair in made.values() for g in pair):  # in one order on every rank
            group.close()


@pytest.mark.mpi(min_size=2)
def test_hierarchical_across_pretend_hosts(comm, pretend):
    """The cross-host stage and the local-major permutation: ranks of one machine split as if on several hosts."""
    n = comm.size
    for hosts in PRETEND[n]:
        pretend(hosts)
        for numel in [1, 3, 1001, 300_007]:
            t = rank_tensor(comm.rank, numel, torch.float64)
            comm.allreduce(t, algorithm="hierarchical")
            assert_matches(t, reference(n, numel, torch.float64, "sum"), torch.float64, n)
        t = rank_tensor(comm.rank, n * 1000, torch.int64)
        part = comm.reduce_scatter(t, algorithm="hierarchical")
        expected = reference(n, n * 1000, torch.int64, "sum")[comm.rank * 1000 : (comm.rank + 1) * 1000]
        assert_matches(part, expected, torch.int64, n)
        out = comm.allgather(rank_tensor(comm.rank, 7, torch.float32), algorithm="hierarchical")
        assert torch.equal(out, torch.cat([rank_tensor(r, 7, torch.float32) for r in range(n)])), hosts


@pytest.mark.mpi(min_size=3)
def test_hierarchical_refuses_uneven_hosts_on_every_rank(comm, pretend):
    pretend(((0, 1), (2,)) if comm.size == 3 else ((0, 1, 2), tuple(range(3, comm.size))))
    with pytest.raises(ValueError, match=r"algorithm 'hierarchical' needs as many ranks on every host, but this job "
                       r"has 2 hosts of \[\d, \d\] ranks; use 'ring' or 'halving_doubling'"):  # fmt: skip
        comm.allreduce(torch.ones(10), algorithm="hierarchical")


def test_auto_runs_what_the_model_predicts(comm, tmp_path, monkeypatch):
    """A model where ring costs 1 ms a message and nothing a byte, halving-doubling nothing a message and 1 ns a
    byte: on one host of n ranks ring takes 2(n-1) ms, halving-doubling 2(n-1)/n * N ns (n a power of two)."""
    model = {"ring": {"intra": {"alpha": 1e-3, "beta": 0.0}}, "halving_doubling": {"intra": {"alpha": 0, "beta": 1e-9}}}
    path = tmp_path / "model.json"
    path.write_text(json.dumps({"algorithms": model}))
    monkeypatch.setenv(auto.ENV, str(path))
    n = comm.size
    if n in (2, 4):
        crossover = 2 * (n - 1) * 1e-3 / (2 * (n - 1) / n * 1e-9)  # n * 1e6 bytes
        assert auto.choose(comm, "auto", int(crossover / 2)) == "halving_doubling"
        assert auto.choose(comm, "auto", int(crossover * 2)) == "ring"
    ran = []
    for name in ("ring", "halving_doubling"):
        entry = algorithms.TABLE[name]
        counted = dataclasses.replace(
            entry, allreduce=lambda c, f, op, e=entry, k=name: ran.append(k) or e.allreduce(c, f, op)
        )
        monkeypatch.setitem(algorithms.TABLE, name, counted)
    for numel in [10, 1_000_003]:
        t = rank_tensor(comm.rank, numel, torch.float64)
        comm.allreduce(t, algorithm="auto")
        assert_matches(t, reference(n, numel, torch.float64, "sum"), torch.float64, n)
    if n > 1:
        assert ran == [auto.choose(comm, "auto", 80), auto.choose(comm, "auto", 8_000_024)]


def test_objects(comm):
    assert comm.allgather_object({"rank": comm.rank}) == [{"rank": r} for r in range(comm.size)]
    assert (
        comm.broadcast_object("from the last" if comm.rank == comm.size - 1 else None, root=comm.size - 1)
        == "from the last"
    )


@pytest.mark.mpi(min_size=2)
def test_point_to_point_ring(comm):
    right, left = (comm.rank + 1) % comm.size, (comm.rank - 1) % comm.size
    got = torch.empty(3, dtype=torch.int64)
    comm.sendrecv(torch.full((3,), comm.rank), right, got, left)
    assert got.tolist() == [left] * 3


@pytest.mark.mpi(min_size=2)
def test_point_to_point_refuses_strided_tensors_and_peers_that_are_not_other_ranks(comm):
    """A transport takes a tensor's memory as it lies (MPI wrote a strided receive's values into base[0:4]): both
    ranks refuse at once, before anything moves, so neither waits for the other."""
    base = torch.zeros(12)
    peer = 1 - comm.rank if comm.rank < 2 else 0
    with pytest.raises(ValueError, match=r"recv needs a contiguous tensor, as torch's: pass t.contiguous\(\)"):
        comm.recv(base[::3], peer)
    with pytest.raises(ValueError, match="send needs a contiguous tensor"):
        comm.send(torch.ones(3, 2).t(), peer)
    for bad in (-1, -2, comm.size, comm.rank, 1.0):
        with pytest.raises(ValueError, match=rf"peer {bad!r} is not another rank of a world of {comm.size}"):
            comm.send(torch.ones(2), bad)
    assert not base.any()
    with pytest.raises(ValueError, match=r"broadcast_object root -1 is not a rank of a world of"):
        comm.broadcast_object("x", root=-1)  # was None on every rank
    comm.barrier()  # nothing was left in flight


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_tensors_that_require_grad_are_reduced_outside_autograd(comm, algorithm):
    """As torch's collectives: a leaf that requires grad is reduced in place, a non-leaf keeps its grad_fn."""
    leaf = torch.full((6,), float(comm.rank + 1), requires_grad=True)
    comm.allreduce(leaf, algorithm=algorithm)
    inner = leaf * 1
    comm.allreduce(inner, algorithm=algorithm)
    total = comm.size * (comm.size + 1) / 2
    assert leaf.tolist() == [total] * 6 and inner.tolist() == [total * comm.size] * 6
    assert leaf.grad_fn is None and leaf.requires_grad and type(inner.grad_fn).__name__ == "MulBackward0"


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("collective", ["allreduce", "reduce_scatter", "allgather", "broadcast"])
@pytest.mark.parametrize("kind", ["size", "dtype"])
def test_calls_that_differ_fail_on_every_rank_and_the_next_call_works(comm, algorithm, collective, kind):
    """Each call is checked, not only a communicator's first: the last rank disagrees on the size (one row more)
    or the dtype (int32 for float32, the same bytes), after earlier good calls; every rank raises, naming every
    rank's call, before any data moves, so the communicator still works."""
    if collective == "broadcast" and algorithm != "native":
        pytest.skip("broadcast has one algorithm")
    n, odd = comm.size, comm.rank == comm.size - 1
    for _ in range(3):
        comm.allreduce(torch.ones(5), algorithm=algorithm)
    rows = n * (4 if odd and kind == "size" else 3)
    t = torch.ones(rows, 2, dtype=torch.int32 if odd and kind == "dtype" else torch.float32)
    call = {
        "allreduce": lambda: comm.allreduce(t, algorithm=algorithm),
        "reduce_scatter": lambda: comm.reduce_scatter(t, algorithm=algorithm),
        "allgather": lambda: comm.allgather(t, algorithm=algorithm),
        "broadcast": lambda: comm.broadcast(t),
    }[collective]
    with pytest.raises(CollectiveError) as error:
        call()
    message = str(error.value)
    assert message.startswith("collective calls differ across ranks (rank 0: call #"), message
    good, bad = (f"({n * 4}, 2)", "float32") if kind == "size" else (f"({n * 3}, 2)", "int32")
    assert f"rank {n - 1}: call #" in message and f"{collective}(" in message
    assert f"float32 ({n * 3}, 2)" in message and (f"float32 {good}" if kind == "size" else f"{bad} {good}") in message
    t = torch.full((7,), float(comm.rank))
    comm.allreduce(t, algorithm=algorithm)
    assert t.tolist() == [n * (n - 1) / 2] * 7


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128], ids=str)
def test_complex_tensors(comm, algorithm, dtype):
    """Complex tensors (an FFT layer's parameters), as torch.distributed takes them: allreduce's sum and avg,
    reduce_scatter, allgather and broadcast against numpy's complex arithmetic; max and min refused."""
    n = comm.size

    def mine(rank: int, numel: int) -> torch.Tensor:
        pairs = rank_tensor(rank, 2 * numel, torch.float64).view(numel, 2)
        return torch.view_as_complex(pairs).to(dtype)

    everyone = np.stack([mine(r, 1001).numpy() for r in range(n)])
    rtol = 1e-5 if dtype == torch.complex64 else 1e-12
    for op, expected in (("sum", everyone.sum(0)), ("avg", everyone.mean(0))):
        t = mine(comm.rank, 1001)
        assert comm.allreduce(t, op, algorithm=algorithm) is t and t.dtype == dtype
        np.testing.assert_allclose(t.numpy(), expected, rtol=rtol, atol=rtol)
    rows = torch.stack([mine(comm.rank, 3) for _ in range(n)])  # n rows of 3: each rank's share is one row
    shard = comm.reduce_scatter(rows, algorithm=algorithm)
    stacked = np.stack([np.stack([mine(r, 3).numpy()] * n) for r in range(n)]).sum(0)
    np.testing.assert_allclose(shard.numpy(), stacked[comm.rank : comm.rank + 1], rtol=rtol, atol=rtol)
    gathered = comm.allgather(mine(comm.rank, 5), algorithm=algorithm)
    np.testing.assert_array_equal(gathered.numpy(), np.concatenate([mine(r, 5).numpy() for r in range(n)]))
    root = mine(comm.rank, 4)
    comm.broadcast(root, n - 1)
    np.testing.assert_array_equal(root.numpy(), mine(n - 1, 4).numpy())
    for op in ("max", "min"):
        with pytest.raises(ValueError, match=f"op='{op}' has no meaning on torch.complex"):
            comm.allreduce(mine(comm.rank, 3), op, algorithm=algorithm)


def rank_sparse(rank: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Rank `rank`'s sparse COO input: rank + 1 rows of `shape` (some repeated, uncoalesced), none for rank 1."""
    gen = torch.Generator().manual_seed(rank)
    rows = 0 if rank == 1 else rank + 1
    indices = torch.randint(0, shape[0], (1, rows), generator=gen)
    values = (torch.randn(rows, *shape[1:], generator=gen, dtype=torch.float64) * 4).to(dtype)
    return torch.sparse_coo_tensor(indices, values, shape, check_invariants=False)


@pytest.mark.parametrize("op", ["sum", "avg"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.int64], ids=str)
@pytest.mark.parametrize("shape", [(7,), (7, 3), (5, 2, 2)], ids=str)
def test_allreduce_of_a_sparse_tensor(comm, op, dtype, shape):
    """A sparse COO tensor (an nn.Embedding's gradient) is summed in place as torch's gloo does: every rank ends with
    the same coalesced tensor, the numpy sum of every rank's dense form; asynchronously too."""
    if op == "avg" and not dtype.is_floating_point:
        pytest.skip("avg is for floating point")
    dense = np.stack([rank_sparse(r, shape, dtype).to_dense().double().numpy() for r in range(comm.size)])
    expected = dense.sum(0) / (comm.size if op == "avg" else 1)
    t = rank_sparse(comm.rank, shape, dtype)
    assert comm.allreduce(t, op) is t and t.is_sparse and t.is_coalesced()
    assert_matches(t.to_dense(), expected, dtype, comm.size)
    handle = comm.allreduce(rank_sparse(comm.rank, shape, dtype), op, async_op=True)
    assert_matches(handle.wait().to_dense(), expected, dtype, comm.size)
    everyone = comm.allgather_object((t.indices().tolist(), t.values().double().sum().item()))
    assert all(seen == everyone[0] for seen in everyone), everyone


def test_bad_sparse_tensors_fail_clearly_on_every_rank(comm):
    """A sparse tensor's other ops and collectives are refused before anything moves; shapes that differ across
    ranks fail on every rank, naming each rank's, and the communicator still works."""
    t = rank_sparse(comm.rank, (7, 3), torch.float32)
    with pytest.raises(ValueError, match="the allreduce of a sparse tensor takes op 'sum' or 'avg', got 'max'"):
        comm.allreduce(t, "max")
    with pytest.raises(ValueError, match="op='avg' needs a floating-point tensor, got torch.int64"):
        comm.allreduce(rank_sparse(comm.rank, (7,), torch.int64), "avg")
    for call in (comm.broadcast, comm.allgather, comm.reduce_scatter):
        with pytest.raises(TypeError, match="collectives take dense tensors .* got torch.sparse_coo; call .to_dense"):
            call(t)
    odd = rank_sparse(comm.rank, (8 if comm.rank == comm.size - 1 else 7, 3), torch.float32)
    if comm.size > 1:
        with pytest.raises(ValueError, match=r"every rank's tensor needs the same shape .* rank 0: \(7, 3\)"):
            comm.allreduce(odd)
    total = torch.ones(4)
    comm.allreduce(total)
    assert total.tolist() == [comm.size] * 4


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op", ["sum", "max", "avg"])
def test_shm_reduces_shared_regions_where_they_lie(comm, dtype, op):
    """A tensor from shared_zeros is reduced in place in the memory every rank maps (no staging): the reference's
    values, the same bits on every rank; its peers' mappings go with it."""
    if comm.backend != "mpi":
        assert comm.shared_zeros(8, dtype) is None  # no such memory: the caller uses its own
        return
    regions = comm._shm().regions
    before = len(regions)
    for numel in (1, 3, 1_000_003):
        t = comm.shared_zeros(numel, dtype)
        assert t is not None and t.numel() == numel and not t.any()
        t.copy_(rank_tensor(comm.rank, numel, dtype))
        assert regions.of(t) is not None and regions.of(t[1:]) is None  # exactly the region, not a part of it
        if op == "avg" and not dtype.is_floating_point:
            continue
        comm.allreduce(t, op, algorithm="shm")
        assert_matches(t, reference(comm.size, numel, dtype, op), dtype, comm.size)
        everyone = comm.allgather_object(t.double().sum().item())
        assert len(set(everyone)) == 1, everyone
    del t
    assert len(regions) == before


def test_a_shared_region_outlives_its_communicator(comm):
    """Memory from shared_zeros stays mapped while a tensor uses it, after the communicator that made it is closed
    (a DDP's .grad may live there)."""
    if comm.backend != "mpi":
        pytest.skip("shared regions are the mpi backend's")
    from distrib.comm.mpi import MPICommunicator

    own = MPICommunicator(timeout=30)
    t = own.shared_zeros(1000, torch.float64)
    t.copy_(rank_tensor(comm.rank, 1000, torch.float64))
    own.allreduce(t, algorithm="shm")
    own.close()
    assert_matches(t, reference(comm.size, 1000, torch.float64, "sum"), torch.float64, comm.size)
    t.add_(1)  # still writable: this rank's own mapping
    comm.barrier()


@pytest.mark.mpi(min_size=2)
def test_split_orders_ranks_by_key_or_refuses_an_order_torch_cannot_keep(comm):
    """MPI_Comm_split numbers a color's ranks by key. torch.distributed's groups number them in world order, so
    under it a key that reorders them raises on every rank of that color (it was ignored, and a broadcast from
    sub-rank 0 came from the wrong rank); keys in rank order work under both."""
    same = comm.split(0, comm.rank)
    assert (same.rank, same.size) == (comm.rank, comm.size)
    if comm.backend == "mpi":
        reverse = comm.split(0, -comm.rank)
        assert reverse.rank == comm.size - 1 - comm.rank
        assert int(reverse.broadcast(torch.tensor([comm.rank]), 0)[0]) == comm.size - 1
    else:
        with pytest.raises(ValueError, match=r"split\(color=0, key=-?\d+\): torch.distributed numbers a group's ranks"):
            comm.split(0, -comm.rank)
    assert int(comm.allreduce(torch.ones(1))[0]) == comm.size  # every rank got here: none hangs
