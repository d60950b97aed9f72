"""One extractor pass per generated batch feeds every feature metric (FID, IS, KID, P/R, D/C)."""
from __future__ import annotations

import logging
from typing import Any, Sequence

import torch
from torch import Tensor

from metrics.feature_metrics import (FrechetDistance, InceptionScore, KernelInceptionDistance, PrecisionRecall,
                                     small_sample_warning)
from metrics.reference import ReferenceStats, load_or_compute_reference

log = logging.getLogger(__name__)

ALL_METRICS = ("fid", "is", "kid", "prdc")
EXTRACTORS = ("inception", "inception_pool", "classifier")


class MetricNotAvailableError(ValueError):
    pass


class FeatureMetrics:
    """Generated-side metrics for one extractor against one reference.

    Args:
        extractor: a metrics.extractors.FeatureExtractor.
        reference: its ReferenceStats.
        metrics: subset of ALL_METRICS, or "auto" (every metric the extractor supports).
    """

    def __init__(self, extractor, reference: ReferenceStats, metrics: Sequence[str] | str = "auto",
                 k: int = 3, kid_subsets: int = 100, kid_subset_size: int = 1000, is_splits: int = 10,
                 seed: int = 0, chunk: int = 1024):
        if metrics == "auto":
            metrics = [m for m in ALL_METRICS if m != "is" or extractor.has_logits]
        unknown = [m for m in metrics if m not in ALL_METRICS]
        if unknown:
            raise ValueError(f"unknown evaluation metrics {unknown}; choose from {list(ALL_METRICS)}")
        if "is" in metrics and not extractor.has_logits:
            raise MetricNotAvailableError(
                f"Inception Score is not available from extractor '{extractor.name}' (it has no logits); use "
                "evaluation.extractor=inception or classifier, or drop 'is' from evaluation.metrics")
        self.extractor, self.reference, self.names = extractor, reference, list(metrics)
        self.extractor_name = extractor.name
        self.k = k
        self.fid = FrechetDistance(reference.mu, reference.sigma) if "fid" in metrics else None
        self.inception_score = InceptionScore(is_splits) if "is" in metrics else None
        self.kid = KernelInceptionDistance(reference.features, kid_subsets, kid_subset_size, seed) if "kid" in metrics else None
        self.prdc = PrecisionRecall(reference.features, k, chunk) if "prdc" in metrics else None

    @property
    def _metrics(self):
        return [m for m in (self.fid, self.inception_score, self.kid, self.prdc) if m is not None]

    def to(self, device) -> "FeatureMetrics":
        self.extractor.to(device)
        for m in self._metrics:
            m.to(device)
        return self

    def reset_generated(self) -> None:
        for m in self._metrics:
            m.reset()

    @torch.no_grad()
    def update_generated(self, images: Tensor, indices: Sequence[int]) -> None:
        """images: uint8 (B, C, H, W). One extractor call feeds all metrics."""
        self.update_features(self.extractor(images), indices)

    def update_features(self, out: dict[str, Tensor | None], indices: Sequence[int]) -> None:
        """Feed already extracted {"pool", "logits"} features of generated images to every metric."""
        pool, logits = out["pool"], out["logits"]
        idx = torch.as_tensor(list(indices), device=pool.device)
        if self.fid is not None:
            self.fid.update(pool)
        if self.inception_score is not None:
            self.inception_score.update(logits, idx)
        if self.kid is not None:
            self.kid.update(pool, idx)
        if self.prdc is not None:
            self.prdc.update(pool, idx)

    def compute(self, num_samples: int) -> tuple[dict[str, float], dict[str, Any]]:
        values: dict[str, float] = {}
        details: dict[str, Any] = {"reference": {k: self.reference.spec[k] for k in ("dataset", "split", "num_images")},
                                   "extractor": self.reference.spec["extractor"], "prdc_k": self.k}
        if getattr(self.extractor, "test_accuracy", None) is not None:
            details["extractor_test_accuracy"] = self.extractor.test_accuracy
        if self.fid is not None:
            values["fid"] = float(self.fid.compute())
            warning = small_sample_warning(min(num_samples, self.reference.num_images), self.extractor.feature_dim)
            details["fid_small_n"] = warning is not None
            if warning:
                log.warning(warning)
                details["fid_warning"] = warning
        if self.inception_score is not None:
            values["is"], values["is_std"] = self.inception_score.compute()
        else:
            details["is"] = f"not available: extractor '{self.extractor_name}' has no logits"
        if self.kid is not None:
            values["kid"], values["kid_std"] = self.kid.compute()
        if self.prdc is not None:
            values.update(self.prdc.compute())
        return values, details


def build_extractor(name: str, datamodule=None, cache_dir: str = ".cache", weights_path: str | None = None,
                    classifier_seed: int = 0, classifier_epochs: int = 50):
    if name == "inception_pool":
        from metrics.extractors import InceptionPoolExtractor
        return InceptionPoolExtractor(weights_path)
    if name == "inception":
        from metrics.extractors import InceptionExtractor
        return InceptionExtractor(weights_path)
    if name == "classifier":
        from metrics.classifier import load_or_train_classifier
        if datamodule is None:
            raise ValueError("the classifier extractor needs a datamodule (its labels)")
        return load_or_train_classifier(datamodule, cache_dir, classifier_seed, classifier_epochs)
    raise ValueError(f"unknown feature extractor {name!r}; choose one of {list(EXTRACTORS)}")


def build_feature_metrics(name: str, datamodule, cache_dir: str, reference_split: str = "train",
                          reference_num_images: int | None = None, metrics: Sequence[str] | str = "auto",
                          device="cpu", batch_size: int = 256, weights_path: str | None = None, seed: int = 0,
                          **metric_kwargs) -> FeatureMetrics:
    """Extractor + cached reference statistics of ``datamodule``'s ``reference_split``."""
    extractor = build_extractor(name, datamodule, cache_dir, weights_path).to(device)
    reference, _ = load_or_compute_reference(extractor, datamodule.split(reference_split), datamodule.name,
                                             reference_split, reference_num_images, datamodule.image_shape,
                                             cache_dir, batch_size, device)
    return FeatureMetrics(extractor, reference, metrics, seed=seed, **metric_kwargs).to(device)
