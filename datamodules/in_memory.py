"""Training batches gathered from one preloaded tensor on the training device.

For datasets that fit in memory (digits, MNIST, CIFAR-10: 150 MB as uint8) the DataLoader's
per-image Python (index, convert, collate) costs more than a small network's step. Here a
batch is one index-gather and one conversion on the device, in the order of
:class:`~datamodules.sampler.ResumableShuffleSampler` (the same batches, flips and resume
semantics as the DataLoader path, bit for bit).
"""
from __future__ import annotations

import math
from typing import Callable, Iterator

import torch
from torch import Tensor

from datamodules.sampler import ResumableShuffleSampler


class InMemoryLoader:
    """An iterable of ``(images, labels)`` batches; ``images`` float in [0, 1] like the datasets'.

    Args:
        images: uint8 (N, C, H, W), the whole training split.
        labels: (N,) integer labels.
        sampler: the training order (Lightning finds it as ``.sampler`` and calls ``set_epoch``).
        device: called when an epoch starts; where the tensors should live (moved once).
    """

    def __init__(self, images: Tensor, labels: Tensor, sampler: ResumableShuffleSampler,
                 device: Callable[[], torch.device]):
        if images.dtype != torch.uint8:
            raise TypeError(f"InMemoryLoader expects uint8 images, got {images.dtype}")
        self.images, self.labels, self.sampler, self._device = images, labels.long(), sampler, device

    def __len__(self) -> int:
        return math.ceil(len(self.sampler) / self.sampler.local_batch_size)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        device = self._device()
        if self.images.device != device:
            self.images, self.labels = self.images.to(device), self.labels.to(device)
        for indices, flips in self.sampler.local_batches():
            indices, flips = indices.to(device, non_blocking=True), flips.to(device, non_blocking=True)
            x = self.images[indices].float().div_(255.0)     # what TensorImageDataset returns per image
            if self.sampler.random_flip:
                x = torch.where(flips[:, None, None, None], x.flip(-1), x)
            yield x, self.labels[indices]
