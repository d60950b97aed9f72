"""The ``classifier`` feature extractor: a small CNN trained on the dataset's labels, cached.

FID/IS/PR "in its own feature space" (as e.g. MNIST-FID with a LeNet): fast on CPU, with logits.
Cached under ``<cache_dir>/classifiers/<key>.pt`` with key = hash(dataset, image size,
architecture, seed, epochs); the file records its test accuracy. It is read with
``weights_only=True`` (a cache folder may be shared with others) and built once by concurrent jobs
(metrics/cache_files.py).
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from metrics.cache_files import atomic_write, load_or_build
from metrics.extractors import FeatureExtractor
from models.checkpoints import CheckpointError, safe_torch_load

log = logging.getLogger(__name__)
ARCH = "cnn3-128-v1"


class SmallCNN(nn.Module):
    """conv(32) conv(64) pool conv(128) global-avg-pool -> fc(128) = features -> fc(num_classes) = logits."""

    def __init__(self, channels: int, num_classes: int, feature_dim: int = 128):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2), nn.Conv2d(64, 128, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
            nn.Linear(128, feature_dim), nn.ReLU())
        self.head = nn.Linear(feature_dim, num_classes)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        feats = self.body(x * 2.0 - 1.0)                                   # x in [0, 1]
        return feats, self.head(feats)


def cache_key(dataset: str, image_size: int, channels: int, num_classes: int, seed: int, epochs: int) -> str:
    spec = {"dataset": dataset, "image_size": image_size, "channels": channels, "num_classes": num_classes,
            "arch": ARCH, "seed": seed, "epochs": epochs}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


@torch.no_grad()
def accuracy(net: SmallCNN, dataset: Dataset, batch_size: int = 512) -> float:
    net.eval()
    correct = total = 0
    for x, y in DataLoader(dataset, batch_size=batch_size):
        correct += int((net(x)[1].argmax(1) == y).sum())
        total += len(y)
    return correct / max(total, 1)


def train_feature_classifier(train_set: Dataset, test_set: Dataset, channels: int, num_classes: int,
                     epochs: int = 50, seed: int = 0, batch_size: int = 64) -> tuple[SmallCNN, float]:
    """Adam + cross-entropy with small random shifts; returns the net and its test accuracy."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = SmallCNN(channels, num_classes)
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    for _ in range(epochs):
        net.train()
        for x, y in DataLoader(train_set, batch_size=batch_size, shuffle=True, generator=gen):
            shift = torch.randint(-1, 2, (2,), generator=gen).tolist()
            x = torch.roll(x, shifts=shift, dims=(2, 3))
            loss = F.cross_entropy(net(x)[1], y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
    return net.eval(), accuracy(net, test_set)


class ClassifierExtractor(FeatureExtractor):
    name, has_logits, classifies_dataset = "classifier", True, True

    def __init__(self, net: SmallCNN, key: str, test_accuracy: float):
        super().__init__()
        self.net, self.key, self.test_accuracy = net.eval(), key, test_accuracy
        self.feature_dim = net.head.in_features

    def cache_key(self) -> dict:
        return {"extractor": self.name, "key": self.key, "arch": ARCH}

    @torch.no_grad()
    def forward(self, images: Tensor) -> dict[str, Tensor | None]:
        feats, logits = self.net(images.float() / 255.0)
        return {"pool": feats, "logits": logits}


def _load_cached(path: Path) -> dict:
    """The cached classifier's fields; ValueError (so it is rebuilt) on a corrupt, foreign or unsafe file."""
    try:
        blob = safe_torch_load(path, "classifier cache entry")
    except CheckpointError as err:  # truncated, foreign, or a pickle that would run code
        raise ValueError(str(err)) from err
    if not isinstance(blob, dict) or not {"state_dict", "test_accuracy", "channels", "num_classes"} <= set(blob):
        raise ValueError("missing fields")
    return blob


#: the classifier sees about this many training images (at most MAX_EPOCHS epochs): 50 epochs of
#: the 1.4k digits, 2 of MNIST's 55k
TRAINING_IMAGES, MAX_EPOCHS = 150_000, 50


def default_epochs(num_train: int) -> int:
    return max(1, min(MAX_EPOCHS, TRAINING_IMAGES // max(num_train, 1)))


def load_or_train_feature_classifier(datamodule, cache_dir: str | Path, seed: int = 0,
                             epochs: int | None = None) -> ClassifierExtractor:
    """The cached classifier of this dataset, trained first if absent (or its cache is corrupt);
    ``epochs`` None: :func:`default_epochs` of its training split."""
    if datamodule.num_classes < 2:
        raise ValueError(f"dataset {datamodule.name!r} has no class labels (num_classes={datamodule.num_classes}); "
                         "the classifier extractor needs them: use evaluation.extractor=inception_pool")
    if epochs is None:
        epochs = default_epochs(len(datamodule.split("train")))
    key = cache_key(datamodule.name, datamodule.image_size, datamodule.channels, datamodule.num_classes, seed, epochs)
    path = Path(cache_dir) / "classifiers" / f"{datamodule.name}-{key}.pt"

    def build() -> dict:
        log.info("training the %s feature classifier for %s (cached at %s)", ARCH, datamodule.name, path)
        net, acc = train_feature_classifier(datamodule.split("train"), datamodule.split("test"),
                                    datamodule.channels, datamodule.num_classes, epochs, seed)
        log.info("classifier test accuracy %.4f", acc)
        return {"state_dict": net.state_dict(), "test_accuracy": acc, "channels": datamodule.channels,
                "num_classes": datamodule.num_classes, "arch": ARCH, "dataset": datamodule.name}

    blob, _ = load_or_build(path, _load_cached, build, lambda p, b: atomic_write(p, lambda f: torch.save(b, f)),
                            "classifier cache entry")
    net = SmallCNN(blob["channels"], blob["num_classes"])
    net.load_state_dict(blob["state_dict"])
    return ClassifierExtractor(net, key, float(blob["test_accuracy"]))
