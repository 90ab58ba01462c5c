"""Sharding minibatches by rank: an epoch-seeded shuffle, global batches, and each rank's share of them.

The global batch is the unit. Every epoch the sample order is a permutation seeded by (seed, epoch), the same
on all ranks; it is cut into global batches of `batch_size` samples, and each rank takes a contiguous slice
of every global batch, the first `count % world_size` ranks one sample more (the rule of numpy.array_split,
`distrib.comm.contract.split`, by which collectives share flat arrays too). The one weighting rule: gradients are
averaged over ranks (by DDP's hooks as by torch's, and by ZeRO's step), so a rank backpropagates the sum of its
per-sample losses times `loss_scale = world_size / global_count`; the average is then the single-process gradient
of the global batch at any world size. Every rank runs the same number of steps; on the last, partial global
batch a rank may get 0 samples (its sum is 0, still joined to the graph).

Pure logic: rank and world size are plain ints, so this module never talks to other processes.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Iterator, Sized
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Sampler

from distrib.comm.contract import split


def num_steps(n: int, batch_size: int, drop_last: bool = False) -> int:
    """Steps per epoch, the same on every rank: one per global batch (the partial last one unless drop_last)."""
    return n // batch_size if drop_last else math.ceil(n / batch_size)


def order(n: int, *, seed: int, epoch: int, shuffle: bool = True) -> torch.Tensor:
    """This epoch's sample order, identical on all ranks: a permutation of range(n) seeded by (seed, epoch)."""
    if not shuffle:
        return torch.arange(n)
    # A SeedSequence of the pair mixes both numbers, so (seed, epoch) = (0, 1) and (1, 0) differ,
    # unlike the `seed + epoch` of torch's DistributedSampler.
    return torch.as_tensor(np.random.default_rng((seed, epoch)).permutation(n), dtype=torch.int64)


def loss_scale(global_count: int, world_size: int) -> float:
    """The factor on the sum of a rank's per-sample losses that makes gradients averaged over ranks the global
    batch's mean gradient: mean over ranks of (world_size / global_count) * sum_r = sum over the batch / global_count.
    """
    return world_size / global_count


def weight(local_count: int, global_count: int, world_size: int) -> float:
    """The same rule for a rank's mean loss (its sum over local_count): what torch-style mean losses multiply by."""
    return local_count * loss_scale(global_count, world_size)


@dataclass(frozen=True)
class Shard:
    """One rank's share of one global batch: dataset indices, and the loss weight that keeps the math exact."""

    step: int
    indices: torch.Tensor  # int64 dataset indices, so a tensor dataset is read as `inputs[shard.indices]`
    global_count: int  # samples in this step's global batch, over all ranks
    world_size: int

    @property
    def local_count(self) -> int:
        return len(self.indices)

    @property
    def weight(self) -> float:
        """Multiplies this rank's mean loss so the gradient averaged over ranks is the global batch's."""
        return weight(self.local_count, self.global_count, self.world_size)

    def scale(self, mean_loss: torch.Tensor) -> torch.Tensor:
        """`mean_loss * weight`; with 0 samples the mean is NaN, so return a zero still joined to the graph.

        Backward then runs on every rank, gradient hooks included, and adds zeros rather than NaNs.
        """
        if self.local_count == 0:
            return mean_loss.nan_to_num(0.0) * 0.0
        return mean_loss * self.weight


def _as_int(name: str, value: object, fix: str = "pass a whole number") -> int:
    # operator.index accepts numpy integers and refuses 2.5 and "2"; a bool is an int but never a count.
    if not isinstance(value, bool):
        try:
            return operator.index(value)
        except TypeError:
            pass
    raise TypeError(f"{name} must be an integer, got {value!r}: {fix}")


def check(n: int, batch_size: int, rank: int, world_size: int, *, seed: int, epoch: int, drop_last: bool) -> None:
    """Refuse inputs that cannot be sharded, naming the value and the fix."""
    for name, value in [
        ("dataset length", n),
        ("batch size", batch_size),
        ("rank", rank),
        ("world size", world_size),
        ("seed", seed),
        ("epoch", epoch),
    ]:
        _as_int(name, value)
    if batch_size < 1:
        raise ValueError(f"batch size must be at least 1, got {batch_size}: use --batch-size 1 or more")
    if world_size < 1:
        raise ValueError(f"world size must be at least 1, got {world_size}: launch at least one rank")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside a world of size {world_size}: rank must be in 0..{world_size - 1}")
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}: use --seed 0 or more")
    if epoch < 0:
        raise ValueError(f"epoch must be non-negative, got {epoch}: count epochs from 0")
    if n < 1:
        raise ValueError(f"dataset has length {n}, so there is nothing to shard: give it at least one sample")
    if world_size > batch_size:
        raise ValueError(
            f"world size {world_size} is larger than the global batch size {batch_size}, so some ranks "
            f"would never get a sample: use --batch-size >= world size ({world_size})"
        )
    if drop_last and n < batch_size:
        raise ValueError(
            f"drop_last with {n} samples and batch size {batch_size} leaves no full global batch: "
            f"use --batch-size <= {n}, or keep the partial batch (drop_last=False)"
        )


def shard(
    n: int,
    batch_size: int,
    rank: int,
    world_size: int,
    *,
    epoch: int,
    seed: int = 0,
    shuffle: bool = True,
    drop_last: bool = False,
) -> Iterator[Shard]:
    """This rank's Shard of every global batch of `batch_size` samples in epoch `epoch`, out of n samples."""
    check(n, batch_size, rank, world_size, seed=seed, epoch=epoch, drop_last=drop_last)
    return _shards(order(n, seed=seed, epoch=epoch, shuffle=shuffle), batch_size, rank, world_size, drop_last)


def _shards(samples: torch.Tensor, batch_size: int, rank: int, world_size: int, drop_last: bool) -> Iterator[Shard]:
    # A generator apart from shard() so bad inputs raise at the call, not at the first next().
    for step in range(num_steps(len(samples), batch_size, drop_last)):
        batch = samples[step * batch_size : (step + 1) * batch_size]
        start, stop = split(len(batch), rank, world_size)
        yield Shard(step, batch[start:stop], len(batch), world_size)


class ShardedBatchSampler(Sampler[list[int]]):
    """A DataLoader batch_sampler yielding this rank's index list per step; call set_epoch before each epoch.

    Use as `DataLoader(ds, batch_sampler=ShardedBatchSampler(ds, batch_size=..., rank=..., world_size=...))`
    and multiply each step's mean loss by `weight(step)`. A rank's list is empty when the last global batch
    has fewer samples than ranks; default_collate cannot collate that, so use drop_last or a batch size that
    leaves no such remainder (or a collate_fn that accepts an empty list).
    """

    def __init__(
        self,
        data: int | Sized,
        *,
        batch_size: int,
        rank: int,
        world_size: int,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = False,
    ) -> None:
        fix = "pass a length or a map-style dataset with len(); an iterable dataset cannot be sharded"
        n = len(data) if isinstance(data, Sized) else _as_int("dataset", data, fix)
        check(n, batch_size, rank, world_size, seed=seed, epoch=0, drop_last=drop_last)
        self.n, self.batch_size, self.rank, self.world_size = n, batch_size, rank, world_size
        self.seed, self.shuffle, self.drop_last = seed, shuffle, drop_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle for `epoch`: every rank must pass the same epoch, as with torch's DistributedSampler."""
        check(
            self.n,
            self.batch_size,
            self.rank,
            self.world_size,
            seed=self.seed,
            epoch=epoch,
            drop_last=self.drop_last,
        )
        self.epoch = epoch

    def shards(self) -> Iterator[Shard]:
        """This epoch's Shards for this rank, indices and weights together."""
        return shard(
            self.n,
            self.batch_size,
            self.rank,
            self.world_size,
            epoch=self.epoch,
            seed=self.seed,
            shuffle=self.shuffle,
            drop_last=self.drop_last,
        )

    def weight(self, step: int) -> float:
        """The loss weight of this rank at `step`; it depends only on counts, not on the shuffle."""
        if not 0 <= step < len(self):
            raise ValueError(f"step {step} is outside this epoch's {len(self)} steps: use 0..{len(self) - 1}")
        count = min(self.batch_size, self.n - step * self.batch_size)
        start, stop = split(count, self.rank, self.world_size)
        return weight(stop - start, count, self.world_size)

    def __iter__(self) -> Iterator[list[int]]:
        return (s.indices.tolist() for s in self.shards())

    def __len__(self) -> int:
        return num_steps(self.n, self.batch_size, self.drop_last)
