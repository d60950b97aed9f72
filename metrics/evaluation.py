"""Model-agnostic evaluation: uses only the GenerativeModule interface and a test split.

One call of :meth:`Evaluator.evaluate` draws exactly ``num_samples`` images in total, sharded
across processes (sample i is seeded by ``seed * 10**9 + i`` so results do not depend on world or
batch size), quantizes them to 8 bits as a saved PNG would, and measures:
  - bits/dim on ``bpd_num_images`` test images (families with a likelihood; marked exact or bound),
  - network evaluations per sample (``sampling_cost``) and device-seconds per sample,
  - a sample grid (the first ``grid_size`` samples).
Feature-space metrics (FID, IS, KID, P/R, D/C) come from :class:`metrics.features.FeatureMetrics`
sets: the same generated batch is fed to each set's extractor once. The first set's figures are
reported as ``fid``, ``precision``, ...; further sets as ``<extractor>/fid``, ...
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import Tensor
from torch.utils.data import Dataset

from metrics.intervals import mean_std, t_half_width
from metrics.results import BPD_KINDS
from metrics.distributed import all_reduce_sum, gather_by_index, rank_and_world, shard
from models.images import bits_per_dim, check_images
from models.noise import SampleNoise, sample_labels

LABEL_DISTRIBUTIONS = ("uniform", "dataset")

SEED_STRIDE = 10 ** 9


def label_classes(module, sampler: dict[str, Any]) -> int | None:
    """The classes a module's samples are drawn for (None: it takes no labels; also for a model
    that predates class conditioning and lacks ``label_classes``)."""
    ask = getattr(module, "label_classes", None)
    return None if ask is None else ask(**sampler)


def quantize(images: Tensor) -> Tensor:
    """[0, 1] floats -> uint8 by clamp and round (the same for real and generated images)."""
    return images.clamp(0.0, 1.0).mul(255.0).round().to(torch.uint8)


def image_grid(images: Tensor, nrow: int | None = None, pad: int = 1) -> Tensor:
    """(N, C, H, W) uint8 -> one (H', W', C) uint8 grid image (``nrow`` images per row, square-ish
    by default, white padding), by torchvision.utils.make_grid."""
    from torchvision.utils import make_grid

    n, c = images.shape[:2]
    nrow = nrow or max(1, math.ceil(math.sqrt(n)))
    grid = make_grid(images, nrow=nrow, padding=pad, pad_value=255)
    return grid[:c].permute(1, 2, 0)  # make_grid repeats one channel to three


def grid_order(num_samples: int, grid_size: int, labels: Tensor | None) -> tuple[list[int], int]:
    """Which samples the grid shows, in order, and how many per row. Unconditional: the first
    ``grid_size``, square-ish. Class-conditional (``labels``: each sample's intended class): one
    class per row, its first samples, the same number for every class."""
    n = min(grid_size, num_samples)
    if labels is None:
        return list(range(n)), max(1, math.ceil(math.sqrt(n)))
    num_classes = int(labels.max()) + 1 if len(labels) else 1
    by_class = [torch.nonzero(labels == c).flatten().tolist() for c in range(num_classes)]
    per_row = min(math.ceil(n / num_classes), *(len(idx) for idx in by_class))
    return [i for idx in by_class for i in idx[:per_row]], max(1, per_row)


def save_png(array_hwc: Tensor, path) -> None:
    from PIL import Image

    arr = array_hwc.cpu().numpy()
    Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr).save(path)


@dataclass
class EvaluationResult:
    metrics: dict[str, float]
    grid: Tensor | None                      # (H, W, C) uint8
    num_samples: int
    sampler: dict[str, Any]
    feature_extractor: str | None = None
    details: dict[str, Any] = field(default_factory=dict)


class Evaluator:
    """Args:
        num_samples: generated images in total across processes.
        batch_size: images per ``sample`` call on each process.
        bpd_num_images: test images for bits/dim (0 = skip).
        grid_size: images in the sample grid.
        seed: base seed of the per-sample streams.
        repeats: independent sample sets scored (a sampling interval for one checkpoint).
        labels: the classes of a conditional model's samples: "uniform", or "dataset" (the training
            split's class frequencies, passed to :meth:`evaluate`).
    """

    def __init__(self, num_samples: int = 256, batch_size: int = 256, bpd_num_images: int = 64,
                 grid_size: int = 64, seed: int = 0, repeats: int = 1, labels: str = "uniform"):
        if labels not in LABEL_DISTRIBUTIONS:
            raise ValueError(f"evaluation.labels must be one of {LABEL_DISTRIBUTIONS}, got {labels!r}")
        self.label_distribution = labels
        if num_samples < 1:
            raise ValueError(f"evaluation.num_samples must be >= 1, got {num_samples}")
        if int(repeats) < 1:
            raise ValueError(f"evaluation.repeats must be >= 1 (independent sample sets), got {repeats}")
        self.repeats = int(repeats)
        self.num_samples, self.batch_size = int(num_samples), int(batch_size)
        self.bpd_num_images, self.grid_size, self.seed = int(bpd_num_images), int(grid_size), int(seed)

    def _seeds(self, indices: list[int], offset: int = 0) -> list[int]:
        return [(self.seed + offset) * SEED_STRIDE + i for i in indices]

    def labels_of(self, indices: Sequence[int], num_classes: int | None, offset: int = 0,
                  frequencies: Sequence[float] | None = None) -> Tensor | None:
        """The intended class of each sample (from its own seed); None for a model that takes none."""
        if num_classes is None:
            return None
        probabilities = frequencies if self.label_distribution == "dataset" else None
        if self.label_distribution == "dataset" and frequencies is None:
            raise ValueError("evaluation.labels=dataset needs the training split's class frequencies")
        return sample_labels(self._seeds(indices, offset), num_classes, probabilities)

    @torch.no_grad()
    def generate(self, module, sampler: dict[str, Any],
                 consume: Callable[[Tensor, list[int], Tensor | None], None], offset: int = 0,
                 frequencies: Sequence[float] | None = None) -> float:
        """Draw this rank's share of the samples in batches, pass each uint8 batch (with its global
        indices and intended labels) to ``consume``; return the seconds spent sampling on this rank.
        ``offset`` selects an independent set of per-sample seeds (a repeat)."""
        rank, world = rank_and_world()
        mine = list(shard(self.num_samples, rank, world))
        num_classes = label_classes(module, sampler)
        seconds = 0.0
        for start in range(0, len(mine), self.batch_size):
            idx = mine[start:start + self.batch_size]
            noise = SampleNoise(self._seeds(idx, offset), module.device)
            labels = self.labels_of(idx, num_classes, offset, frequencies)
            if labels is not None:
                labels = labels.to(module.device)
            if module.device.type == "cuda":
                torch.cuda.synchronize(module.device)
            t0 = time.perf_counter()
            conditioning = {} if labels is None else {"labels": labels}
            images = module.sample(len(idx), generator=noise, **conditioning, **sampler)
            if module.device.type == "cuda":
                torch.cuda.synchronize(module.device)
            seconds += time.perf_counter() - t0
            check_images(images, module.image_shape, f"{type(module).__name__}.sample")
            consume(quantize(images), idx, labels)
        return seconds

    @torch.no_grad()
    def bits_per_dim(self, module, test_set: Dataset) -> tuple[float, float]:
        """Mean bits/dim over the first ``bpd_num_images`` test images, sharded across processes
        (a conditional model's: -log p(x | y) with each image's own label), and its standard error
        over the images (which holds a stochastic estimator's own noise, e.g. Hutchinson's)."""
        n = min(self.bpd_num_images, len(test_set))
        rank, world = rank_and_world()
        mine = list(shard(n, rank, world))
        total = torch.zeros(3, dtype=torch.float64, device=module.device)   # sum, count, sum of squares
        for start in range(0, len(mine), self.batch_size):
            idx = mine[start:start + self.batch_size]
            items = [test_set[i] for i in idx]
            x = torch.stack([item[0] for item in items]).to(module.device)
            conditioning = {} if getattr(module, "num_classes", None) is None else \
                {"labels": torch.tensor([int(item[1]) for item in items], device=module.device)}
            nats = -module.log_likelihood(x, generator=SampleNoise(self._seeds(idx, offset=1), module.device),
                                          **conditioning)
            bpd = bits_per_dim(nats.double(), module.num_dims)
            if not torch.isfinite(bpd).all():
                raise FloatingPointError(f"{type(module).__name__}.log_likelihood returned non-finite values")
            total += torch.stack([bpd.sum(), torch.tensor(float(len(idx)), dtype=torch.float64, device=bpd.device),
                                  bpd.pow(2).sum()])
        total = all_reduce_sum(total)
        mean, n = float(total[0] / total[1]), float(total[1])
        variance = max(float(total[2] / n) - mean ** 2, 0.0) * n / (n - 1) if n > 1 else 0.0
        return mean, math.sqrt(variance / n)

    @staticmethod
    def repeat_offset(repeat: int) -> int:
        """Seed offset of sample set ``repeat``: 0 for the first, never 1 (the bits/dim noise's)."""
        return 0 if repeat == 0 else repeat + 1

    @torch.no_grad()
    def evaluate(self, module, test_set: Dataset | None, sampler: dict[str, Any] | None = None,
                 feature_sets: Sequence = (), class_frequencies: Sequence[float] | None = None,
                 sample_sink: Callable[[Tensor, list[int], Tensor | None], None] | None = None) -> EvaluationResult:
        """Draw ``repeats`` independent sets of ``num_samples`` samples and score each; the metrics
        are the means over the sets and, with more than one set, ``<metric>_ci95`` the half-width
        of their 95% Student-t interval (the sampling uncertainty of this one model). Samples of a
        class-conditional model (or a classifier-guided one) carry intended labels, recorded in
        ``details["labels"]``, which the feature sets score as ``class_acc`` (and intra-FID).
        ``sample_sink`` also receives the first set's uint8 batches (scripts/evaluate.py saves them)."""
        sampler = module.sampler_kwargs(**(sampler or {}))
        was_training = module.training
        module.eval()
        try:
            grid_parts: list[Tensor] = []
            grid_idx: list[int] = []  # each kept image's position in the grid
            num_classes = label_classes(module, sampler)
            all_labels = None if num_classes is None else \
                self.labels_of(range(self.num_samples), num_classes, 0, class_frequencies)
            order, per_row = grid_order(self.num_samples, self.grid_size if self.grid_size > 0 else 0, all_labels)
            position = {i: p for p, i in enumerate(order)}
            sets: list[dict[str, float]] = []
            details: dict[str, Any] = {"extractors": {}}
            for repeat in range(self.repeats):
                for fs in feature_sets:
                    fs.reset_generated()

                def consume(images: Tensor, idx: list[int], labels: Tensor | None) -> None:
                    keep = [k for k, i in enumerate(idx) if i in position] if repeat == 0 else []
                    if keep:
                        grid_parts.append(images[keep].cpu())
                        grid_idx.extend(position[idx[k]] for k in keep)
                    for fs in feature_sets:
                        fs.update_generated(images, idx, labels)
                    if sample_sink is not None and repeat == 0:
                        sample_sink(images, idx, labels)

                seconds = self.generate(module, sampler, consume, self.repeat_offset(repeat), class_frequencies)
                total_seconds = float(all_reduce_sum(torch.tensor([seconds], dtype=torch.float64,
                                                                  device=module.device))[0])
                metrics: dict[str, float] = {**{k: float(v) for k, v in module.sampling_cost(**sampler).items()},
                                             "sec_per_sample": total_seconds / self.num_samples}
                for k, fs in enumerate(feature_sets):
                    values, fs_details = fs.compute(self.num_samples)
                    prefix = "" if k == 0 else f"{fs.extractor_name}/"
                    metrics.update({prefix + name: v for name, v in values.items()})
                    if repeat == 0:
                        details["extractors"][fs.extractor_name] = {"metrics": values, **fs_details}
                sets.append(metrics)
            metrics = {key: mean_std([m[key] for m in sets])[0] for key in sets[0]}
            if self.repeats > 1:
                for key in sets[0]:
                    if key not in ("nfe", "classifier_nfe", "sec_per_sample"):
                        metrics[f"{key}_ci95"] = t_half_width(mean_std([m[key] for m in sets])[1], self.repeats)
                details["repeats"] = {"count": self.repeats, "per_set": sets}
            if all_labels is not None:  # a pure function of the seeds: every rank can list them all
                details["labels"] = {"distribution": self.label_distribution, "num_classes": num_classes,
                                     "counts": torch.bincount(all_labels, minlength=num_classes).tolist(),
                                     "sampled": all_labels.tolist()}
            if module.likelihood_kind is not None and self.bpd_num_images > 0 and test_set is not None:
                metrics["bpd"], details["bpd_stderr"] = self.bits_per_dim(module, test_set)
                details["bpd_kind"] = BPD_KINDS[module.likelihood_kind]
                details.update({f"bpd_{k}": v for k, v in module.likelihood_details().items()})
                details["bpd_num_images"] = min(self.bpd_num_images, len(test_set))
            grid = None
            if order:
                c, h, w = module.image_shape
                local = torch.cat(grid_parts) if grid_parts else torch.zeros((0, c, h, w), dtype=torch.uint8)
                grid = image_grid(gather_by_index(local.to(module.device), grid_idx, len(order)).cpu(), per_row)
                if all_labels is not None:
                    details["grid"] = {"rows": "one class per row, classes 0.. in order", "per_row": per_row}
            extractor = feature_sets[0].extractor_name if feature_sets else None
            return EvaluationResult(metrics, grid, self.num_samples, sampler, extractor, details)
        finally:
            module.train(was_training)
