"""The training order: shuffled, sharded, flipped, and a pure function of (seed, epoch, position).

A run killed mid-epoch and resumed must see the very batches the uninterrupted run saw. A
stateful iterator cannot promise that (Lightning prefetches a batch ahead of the step it
checkpoints), so nothing here carries state: epoch ``e`` draws its permutation and its flip
bits from a generator seeded with ``seed + e``, and a resumed epoch simply starts at the batch
Lightning says comes next.
"""
from __future__ import annotations

from typing import Callable, Iterator

import torch
from torch.utils.data import Dataset, DistributedSampler


class FlipByIndex(Dataset):
    """Reads ``(index, flip)`` pairs from :class:`ResumableShuffleSampler`; flips left-right when told."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, bool]):
        index, flip = key
        image, label = self.dataset[index]
        return (image.flip(-1) if flip else image), label


class ResumableShuffleSampler(DistributedSampler):
    """Yields ``(index, flip)`` for this process's share of every global batch of an epoch.

    Global batch ``g`` of epoch ``e`` holds positions ``g*B .. (g+1)*B-1`` of
    ``randperm(N, seed + e)``; process ``r`` of ``W`` takes the ``r``-th contiguous slice of
    ``B // W`` of them, so the union over processes is the single-process batch. Incomplete
    global batches are dropped (unless the dataset is smaller than one batch). A subclass of
    DistributedSampler, so that Lightning calls ``set_epoch`` and leaves the sharding alone.

    Args:
        dataset: the training set (only its length is used here).
        global_batch_size: images per optimizer step over all processes.
        seed: base seed of the order (the run seed).
        num_replicas, rank: the process group (1, 0 on a single process).
        random_flip: draw a left-right flip bit per image and position.
        batches_done: called with the epoch when it starts; how many of its batches were already
            trained on (non-zero only when resuming mid-epoch), to skip them.
    """

    def __init__(self, dataset: Dataset, global_batch_size: int, seed: int = 0, num_replicas: int = 1,
                 rank: int = 0, random_flip: bool = False, batches_done: Callable[[int], int] | None = None):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.global_batch_size = int(global_batch_size)
        if self.global_batch_size % num_replicas:
            raise ValueError(f"global batch {global_batch_size} is not divisible by {num_replicas} processes")
        self.local_batch_size = self.global_batch_size // num_replicas
        self.random_flip = random_flip
        self.batches_done = batches_done or (lambda epoch: 0)

    @property
    def num_batches(self) -> int:
        n = len(self.dataset)
        return max(n // self.global_batch_size, 1)

    def __len__(self) -> int:
        n = len(self.dataset)
        if n < self.global_batch_size:  # one short batch, shared out as evenly as possible
            return len(range(self.rank, n, self.num_replicas))
        return self.num_batches * self.local_batch_size

    def epoch_order(self, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(permutation, flip bits) of one epoch, the same on every process."""
        gen = torch.Generator().manual_seed(self.seed + epoch)
        n = len(self.dataset)
        order = torch.randperm(n, generator=gen)
        flips = torch.rand(n, generator=gen) < 0.5 if self.random_flip else torch.zeros(n, dtype=torch.bool)
        return order, flips

    def local_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(indices, flip bits) of this process's batches of the current epoch, from the batch
        Lightning says comes next (non-zero only when resuming mid-epoch)."""
        order, flips = self.epoch_order(self.epoch)
        n = len(order)
        if n < self.global_batch_size:
            mine = torch.arange(self.rank, n, self.num_replicas)
            yield order[mine], flips[mine]
            return
        skip = int(self.batches_done(self.epoch)) % self.num_batches
        for g in range(skip, self.num_batches):
            start = g * self.global_batch_size + self.rank * self.local_batch_size
            yield order[start:start + self.local_batch_size], flips[start:start + self.local_batch_size]

    def __iter__(self) -> Iterator[tuple[int, bool]]:
        for indices, flips in self.local_batches():
            yield from zip(indices.tolist(), flips.tolist())
