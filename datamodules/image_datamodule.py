"""The one LightningDataModule every family trains on and every metric reads."""
from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from datamodules.datasets import TensorImageDataset, get_entry, load_split
from datamodules.in_memory import InMemoryLoader
from datamodules.sampler import FlipByIndex, ResumableShuffleSampler


class ImageDataModule(pl.LightningDataModule):
    """Float images in [0, 1], shape (channels, image_size, image_size), with integer labels.

    Args:
        name: registry key (digits, mnist, fashion_mnist, cifar10, celeba64, image_folder).
        data_dir: where the files live (image_folder: the folder itself).
        image_size: side length after resize; must match what the model was built for.
        channels, num_classes: declared in the config so that model configs can interpolate
            them (``${datamodule.channels}``); checked against the data in ``setup``.
        batch_size: the GLOBAL batch size; each of the world_size processes loads
            batch_size // world_size images per step.
        random_flip: horizontal flips of training images.
        seed: seed of the training order and flips (the run seed); the order is a pure function
            of (seed, epoch, batch), so a resumed run sees the batches an uninterrupted one sees.
        download: allow torchvision to download a missing dataset.
        in_memory: serve training batches from one tensor on the training device instead of a
            DataLoader (datasets held in memory: digits, MNIST, CIFAR-10); same batches.
        options: extra keyword arguments of the registry loader (e.g. val_size).
    """

    def __init__(self, name: str = "digits", data_dir: str = "data", image_size: int = 8,
                 channels: int = 1, num_classes: int = 10, batch_size: int = 64,
                 num_workers: int = 0, random_flip: bool = False, download: bool = False,
                 pin_memory: bool = False, seed: int = 0, in_memory: bool = False,
                 options: dict[str, Any] | None = None):
        super().__init__()
        entry = get_entry(name)  # unknown names fail here, before anything is loaded
        if entry.info.channels and name != "image_folder" and channels != entry.info.channels:
            raise ValueError(f"dataset {name!r} has {entry.info.channels} channel(s), config says "
                             f"channels={channels}; fix datamodule.channels")
        if image_size < 4:
            raise ValueError(f"image_size={image_size} is too small; use at least 4")
        self.name, self.data_dir, self.image_size = name, str(data_dir), int(image_size)
        self.channels, self.num_classes = int(channels), int(num_classes)
        self.batch_size, self.num_workers = int(batch_size), int(num_workers)
        self.random_flip, self.download, self.pin_memory = random_flip, download, pin_memory
        self.seed, self.in_memory = int(seed), bool(in_memory)
        self.options = dict(options or {})
        self.batch_size_per_device = self.batch_size
        self._splits: dict[str, Dataset] = {}

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (self.channels, self.image_size, self.image_size)

    def prepare_data(self) -> None:
        # Runs on one process per node: the only place a download may happen.
        if self.download:
            load_split(self.name, self.data_dir, "test", self.image_size, download=True, **self.options)

    def setup(self, stage: str | None = None) -> None:
        world_size = self.trainer.world_size if self.trainer is not None else 1
        if self.batch_size % world_size:
            raise ValueError(f"datamodule.batch_size={self.batch_size} (global) is not divisible by "
                             f"the {world_size} processes; pick a multiple of {world_size}")
        self.batch_size_per_device = self.batch_size // world_size
        for split in ("train", "val", "test"):
            self.split(split)

    def split(self, split: str) -> Dataset:
        """The un-augmented dataset of one split, loaded once and checked against the config."""
        if split not in self._splits:
            ds = load_split(self.name, self.data_dir, split, self.image_size, download=False, **self.options)
            image, _ = ds[0]
            if tuple(image.shape) != self.image_shape:
                raise ValueError(f"dataset {self.name!r} yields images of shape {tuple(image.shape)}, "
                                 f"config expects {self.image_shape}; fix datamodule.channels/image_size")
            labels = getattr(ds, "labels", None)
            found = int(max(labels)) + 1 if labels is not None and len(labels) else 0
            if self.num_classes >= 2 and found > self.num_classes:
                raise ValueError(f"dataset {self.name!r} has labels up to {found - 1} but datamodule.num_classes="
                                 f"{self.num_classes}; set datamodule.num_classes={found}")
            self._splits[split] = ds
        return self._splits[split]

    def class_frequencies(self) -> list[float] | None:
        """The training split's class frequencies (None for an unlabelled dataset): what
        ``evaluation.labels=dataset`` draws the classes of a conditional model's samples from."""
        if self.num_classes < 2:
            return None
        labels = torch.as_tensor(self.split("train").labels).long()
        return (torch.bincount(labels, minlength=self.num_classes).double() / labels.numel()).tolist()

    def _loader(self, dataset: Dataset, sampler=None) -> DataLoader:
        # A private generator: creating an iterator must not draw from the global RNG, whose
        # state a checkpoint restores (exact resume).
        return DataLoader(dataset, batch_size=self.batch_size_per_device, sampler=sampler,
                          num_workers=self.num_workers, generator=torch.Generator(),
                          pin_memory=self.pin_memory, persistent_workers=self.num_workers > 0)

    def _batches_done_in_epoch(self, epoch: int) -> int:
        """Batches of ``epoch`` already trained on: 0, except when resuming a checkpoint taken
        mid-epoch (the module recorded its position: models.rng.ExactResumeMixin)."""
        module = self.trainer.lightning_module if self.trainer is not None else None
        done = getattr(module, "batches_done_in_epoch", None)
        return int(done(epoch)) if done is not None else 0

    def train_sampler(self) -> ResumableShuffleSampler:
        trainer = self.trainer
        world = getattr(trainer, "world_size", 1) if trainer is not None else 1
        rank = getattr(trainer, "global_rank", 0) if trainer is not None else 0
        return ResumableShuffleSampler(self.split("train"), self.batch_size_per_device * world, seed=self.seed,
                                       num_replicas=world, rank=rank, random_flip=self.random_flip,
                                       batches_done=self._batches_done_in_epoch)

    def _device(self) -> torch.device:
        trainer = self.trainer
        return trainer.strategy.root_device if trainer is not None else torch.device("cpu")

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        """Batches of the in-memory loader are made on the device: pass them through instead of
        Lightning's generic walk over the batch, which moves each tensor of any nested collection
        (Python work every step; benchmark: the in-memory fast-path row)."""
        if isinstance(batch, (tuple, list)) and all(isinstance(t, torch.Tensor) and t.device == device for t in batch):
            return batch
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    def train_dataloader(self) -> DataLoader | InMemoryLoader:
        ds = self.split("train")
        if self.in_memory and isinstance(ds, TensorImageDataset):
            return InMemoryLoader(ds.images, ds.labels, self.train_sampler(), self._device)
        return self._loader(FlipByIndex(ds), sampler=self.train_sampler())

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.split("val"))

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.split("test"))
