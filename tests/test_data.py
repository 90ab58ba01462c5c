"""distrib.data: every rank's share, simulated in one process, against world size 1 and numpy.array_split."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset

from distrib.data import ShardedBatchSampler, order, shard

# (n, batch_size), most of them leaving a partial last global batch; (9, 4) and (1, 4) leave fewer samples
# than ranks in it, so some ranks get an empty shard.
CASES = [(12, 4), (10, 4), (13, 5), (23, 6), (9, 4), (3, 8), (1, 4), (40, 7)]
WORLD_SIZES = [1, 2, 3, 4]


def all_ranks(n: int, batch_size: int, world_size: int, **kwargs) -> list[list]:
    """Every rank's shards of one epoch, as the ranks of a real job would compute them."""
    kwargs.setdefault("epoch", 0)
    return [list(shard(n, batch_size, r, world_size, **kwargs)) for r in range(world_size)]


def global_batches(n: int, batch_size: int, **kwargs) -> list[torch.Tensor]:
    """The global batches as one process sees them: the reference every world size must reproduce."""
    return [s.indices for s in all_ranks(n, batch_size, 1, **kwargs)[0]]


class Indices(Dataset):
    """A map-style dataset whose sample is its own index, so a batch shows which samples it holds."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return i


@pytest.mark.parametrize("world_size", WORLD_SIZES)
@pytest.mark.parametrize(("n", "batch_size"), CASES)
def test_ranks_split_each_global_batch_like_array_split(n: int, batch_size: int, world_size: int) -> None:
    reference = global_batches(n, batch_size, epoch=3, seed=7)
    # One epoch visits every sample once, in global batches of batch_size and a partial last one.
    assert sorted(torch.cat(reference).tolist()) == list(range(n))
    assert [len(b) for b in reference[:-1]] == [batch_size] * (len(reference) - 1)

    ranks = all_ranks(n, batch_size, world_size, epoch=3, seed=7)
    steps = math.ceil(n / batch_size)
    assert [len(r) for r in ranks] == [steps] * world_size  # no rank waits for a step the others skip
    for step, batch in enumerate(reference):
        shards = [r[step] for r in ranks]
        expected = np.array_split(batch.numpy(), world_size)  # the documented split rule
        for s, part in zip(shards, expected):
            assert s.step == step and s.global_count == len(batch) and s.world_size == world_size
            assert s.indices.dtype == torch.int64
            np.testing.assert_array_equal(s.indices.numpy(), part)
        # In order and disjoint: the ranks' shards laid end to end are the global batch itself.
        assert torch.equal(torch.cat([s.indices for s in shards]), batch)


@pytest.mark.parametrize("world_size", WORLD_SIZES)
@pytest.mark.parametrize(("n", "batch_size"), CASES)
def test_weights_make_the_rank_average_the_global_mean(n: int, batch_size: int, world_size: int) -> None:
    losses = torch.rand(n, dtype=torch.float64, generator=torch.Generator().manual_seed(n * batch_size))
    ranks = all_ranks(n, batch_size, world_size, epoch=1)
    for step, batch in enumerate(global_batches(n, batch_size, epoch=1)):
        shards = [r[step] for r in ranks]
        for s in shards:
            assert s.weight == pytest.approx(s.local_count * world_size / len(batch))
            assert (s.weight == 0) == (s.local_count == 0)
        # What gradient averaging over ranks computes, fed with each rank's mean loss.
        averaged = sum(s.scale(losses[s.indices].mean()) for s in shards) / world_size
        torch.testing.assert_close(averaged, losses[batch].mean())


def test_empty_shard_takes_part_in_backward_with_zero_gradient() -> None:
    # n=9, batch 4, 4 ranks: the last global batch holds one sample, so ranks 1..3 get none in that step.
    n, batch_size, world_size = 9, 4, 4
    torch.manual_seed(0)
    inputs, targets = torch.randn(n, 3), torch.randn(n, 2)
    model = torch.nn.Linear(3, 2)
    ranks = all_ranks(n, batch_size, world_size, epoch=0)
    for step, batch in enumerate(global_batches(n, batch_size, epoch=0)):
        model.zero_grad()
        torch.nn.functional.mse_loss(model(inputs[batch]), targets[batch]).backward()
        expected = [p.grad.clone() for p in model.parameters()]
        summed = [torch.zeros_like(p) for p in model.parameters()]
        for s in (r[step] for r in ranks):
            model.zero_grad()
            x, y = inputs[s.indices], targets[s.indices]
            s.scale(torch.nn.functional.mse_loss(model(x), y)).backward()
            for total, p in zip(summed, model.parameters()):
                assert p.grad is not None and torch.isfinite(p.grad).all()
                total += p.grad
        for total, e in zip(summed, expected):
            torch.testing.assert_close(total / world_size, e)
    assert [r[-1].local_count for r in ranks] == [1, 0, 0, 0]


def test_epoch_and_seed_choose_the_permutation() -> None:
    n = 50
    assert torch.equal(order(n, seed=3, epoch=2), order(n, seed=3, epoch=2))
    assert not torch.equal(order(n, seed=3, epoch=2), order(n, seed=3, epoch=1))
    assert not torch.equal(order(n, seed=3, epoch=2), order(n, seed=4, epoch=2))
    # seed + epoch would make these two the same order.
    assert not torch.equal(order(n, seed=0, epoch=1), order(n, seed=1, epoch=0))
    assert torch.equal(order(n, seed=3, epoch=2, shuffle=False), torch.arange(n))
    assert sorted(order(n, seed=3, epoch=2).tolist()) == list(range(n))


def test_drop_last_keeps_only_full_global_batches() -> None:
    n, batch_size = 23, 6
    kept = global_batches(n, batch_size, epoch=2, drop_last=True)
    assert [len(b) for b in kept] == [batch_size] * (n // batch_size)
    # The same batches as without drop_last, minus the partial one.
    full = global_batches(n, batch_size, epoch=2)
    assert all(torch.equal(a, b) for a, b in zip(kept, full[:-1])) and len(full[-1]) == n % batch_size
    for ranks in (all_ranks(n, batch_size, w, epoch=2, drop_last=True) for w in WORLD_SIZES):
        assert {len(r) for r in ranks} == {n // batch_size}


@pytest.mark.parametrize("world_size", WORLD_SIZES)
@pytest.mark.parametrize(("n", "batch_size"), CASES)
def test_dataloader_yields_this_ranks_indices(n: int, batch_size: int, world_size: int) -> None:
    for rank in range(world_size):
        sampler = ShardedBatchSampler(Indices(n), batch_size=batch_size, rank=rank, world_size=world_size, seed=5)
        loader = DataLoader(Indices(n), batch_sampler=sampler, collate_fn=list)
        for epoch in (0, 1):
            sampler.set_epoch(epoch)
            expected = list(shard(n, batch_size, rank, world_size, seed=5, epoch=epoch))
            assert len(loader) == len(expected)
            assert list(loader) == [s.indices.tolist() for s in expected]
            assert [sampler.weight(step) for step in range(len(sampler))] == [s.weight for s in expected]


def test_dataloader_with_default_collate_and_a_length() -> None:
    # 13 samples in global batches of 5, 5, 3: every one of 3 ranks gets a sample in every step.
    n, batch_size, world_size = 13, 5, 3
    data = torch.arange(2.0 * n).reshape(n, 2) ** 2
    per_rank = []
    for rank in range(world_size):
        sampler = ShardedBatchSampler(n, batch_size=batch_size, rank=rank, world_size=world_size)
        per_rank.append([batch for (batch,) in DataLoader(TensorDataset(data), batch_sampler=sampler)])
    for step, batch in enumerate(global_batches(n, batch_size, epoch=0)):
        torch.testing.assert_close(torch.cat([steps[step] for steps in per_rank]), data[batch])


def test_shuffle_false_keeps_dataset_order() -> None:
    assert list(ShardedBatchSampler(7, batch_size=3, rank=1, world_size=2, shuffle=False)) == [[2], [5], []]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"batch_size": 0}, r"batch size must be at least 1, got 0: use --batch-size 1 or more"),
        ({"world_size": 0, "rank": 0}, r"world size must be at least 1, got 0"),
        ({"rank": 4}, r"rank 4 is outside a world of size 4: rank must be in 0\.\.3"),
        ({"rank": -1}, r"rank -1 is outside a world of size 4"),
        ({"seed": -2}, r"seed must be non-negative, got -2: use --seed 0 or more"),
        ({"epoch": -1}, r"epoch must be non-negative, got -1: count epochs from 0"),
        ({"n": 0}, r"dataset has length 0, so there is nothing to shard"),
        (
            {"batch_size": 3},
            r"world size 4 is larger than the global batch size 3.*use --batch-size >= world size",
        ),
        (
            {"n": 5, "batch_size": 8, "drop_last": True},
            r"drop_last with 5 samples and batch size 8 .*--batch-size <= 5",
        ),
    ],
)
def test_bad_inputs_name_the_value_and_the_fix(kwargs: dict, match: str) -> None:
    args = {"n": 20, "batch_size": 8, "rank": 1, "world_size": 4, "seed": 0, "epoch": 0, "drop_last": False}
    args.update(kwargs)
    n, batch_size, rank, world_size = (args.pop(k) for k in ("n", "batch_size", "rank", "world_size"))
    # Raised at the call, before the first step: shard() is not a lazy generator.
    with pytest.raises(ValueError, match=match):
        shard(n, batch_size, rank, world_size, **args)
    epoch = args.pop("epoch")
    with pytest.raises(ValueError, match=match):
        sampler = ShardedBatchSampler(n, batch_size=batch_size, rank=rank, world_size=world_size, **args)
        sampler.set_epoch(epoch)


def test_bad_types_and_steps() -> None:
    with pytest.raises(TypeError, match=r"batch size must be an integer, got 2\.5"):
        shard(10, 2.5, 0, 1, epoch=0)
    with pytest.raises(TypeError, match=r"rank must be an integer, got True"):
        shard(10, 2, True, 2, epoch=0)

    class Stream(IterableDataset):
        def __iter__(self):
            return iter(range(3))

    with pytest.raises(TypeError, match=r"dataset must be an integer, got <.*Stream.*an iterable dataset cannot"):
        ShardedBatchSampler(Stream(), batch_size=2, rank=0, world_size=1)
    sampler = ShardedBatchSampler(10, batch_size=4, rank=0, world_size=2)
    with pytest.raises(ValueError, match=r"step 3 is outside this epoch's 3 steps: use 0\.\.2"):
        sampler.weight(3)
    # numpy integers, as a config file may hand over, are fine.
    assert len(list(shard(np.int64(10), np.int32(4), 0, 2, epoch=np.int64(1)))) == 3
