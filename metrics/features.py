"""One extractor pass per generated batch feeds every feature metric (FID, IS, KID, P/R, D/C)."""
from __future__ import annotations

import logging
from typing import Any, Sequence

import torch
from torch import Tensor

from metrics.feature_metrics import (ClassAccuracy, FrechetDistance, GeneratedFeatures, InceptionScore,
                                     KernelInceptionDistance, PrecisionRecall, fid_infinity, intra_fid, is_infinity,
                                     small_sample_warning)
from metrics.reference import ReferenceStats, load_or_compute_reference

log = logging.getLogger(__name__)

ALL_METRICS = ("fid", "sfid", "is", "kid", "prdc")
EXTRACTORS = ("inception", "inception_pool", "classifier")
#: metrics that compare with the reference's features, not only its statistics
NEEDS_REFERENCE_FEATURES = ("kid", "prdc")
#: FID_inf / IS_inf fit sub-samples of FID_INF_MIN_FRACTION * N .. N generated samples
FID_INF_MIN_FRACTION = 0.5


class MetricNotAvailableError(ValueError):
    pass


def synced_features(metric: GeneratedFeatures) -> Tensor:
    """A metric's stored features gathered from every process (collective under DDP), in sample order."""
    with metric.sync_context():
        return metric.ordered()


class FeatureMetrics:
    """Generated-side metrics for one extractor against one reference.

    Args:
        extractor: a metrics.extractors.FeatureExtractor.
        reference: its ReferenceStats.
        metrics: subset of ALL_METRICS, or "auto" (every metric the extractor supports).
        intra_fid: also the per-class FID of labelled samples (needs the reference's labels).

    Labelled samples (a conditional model's) also give ``class_acc`` when the extractor is the
    dataset's classifier: its prediction against the intended label, from the same forward pass.
    """

    def __init__(self, extractor, reference: ReferenceStats, metrics: Sequence[str] | str = "auto",
                 pr_k: int = 3, dc_k: int = 5, kid_subsets: int = 100, kid_subset_size: int = 1000, is_splits: int = 10,
                 seed: int = 0, chunk: int = 1024, intra_fid: bool = False):
        has_spatial = getattr(extractor, "has_spatial", False)
        has_features = reference.features.shape[0] > 0   # not for precomputed statistics alone
        if metrics == "auto":
            metrics = [m for m in ALL_METRICS if (m != "is" or extractor.has_logits)
                       and (m != "sfid" or (has_spatial and reference.spatial_mu is not None))
                       and (m not in NEEDS_REFERENCE_FEATURES or has_features)]
        unknown = [m for m in metrics if m not in ALL_METRICS]
        if unknown:
            raise ValueError(f"unknown evaluation metrics {unknown}; choose from {list(ALL_METRICS)}")
        if "is" in metrics and not extractor.has_logits:
            raise MetricNotAvailableError(
                f"Inception Score is not available from extractor '{extractor.name}' (it has no logits); use "
                "evaluation.extractor=inception or classifier, or drop 'is' from evaluation.metrics")
        if not has_features and any(m in NEEDS_REFERENCE_FEATURES for m in metrics):
            raise MetricNotAvailableError(
                "KID and precision/recall/density/coverage compare with the reference's features, and this reference "
                "holds precomputed statistics only: give a reference with images, or drop kid/prdc from evaluation.metrics")
        if "sfid" in metrics and not has_spatial:
            raise MetricNotAvailableError(
                f"sFID is not available from extractor '{extractor.name}' (no spatial features); use "
                "evaluation.extractor=inception_pool (mixed_6/conv), or drop 'sfid' from evaluation.metrics")
        if "sfid" in metrics and reference.spatial_mu is None:
            raise MetricNotAvailableError(
                f"sFID was asked for but the reference {reference.spec.get('dataset')!r} has no spatial statistics "
                "(a precomputed statistics file without mu_s/sigma_s): give a reference with images or with "
                "mu_s/sigma_s, or drop 'sfid' from evaluation.metrics")
        self.extractor, self.reference, self.names = extractor, reference, list(metrics)
        self.extractor_name = extractor.name
        self.pr_k, self.dc_k = pr_k, dc_k
        self.fid = FrechetDistance(reference.mu, reference.sigma) if "fid" in metrics else None
        self.sfid = FrechetDistance(reference.spatial_mu, reference.spatial_sigma) if "sfid" in metrics else None
        self.inception_score = InceptionScore(is_splits) if "is" in metrics else None
        self.kid = KernelInceptionDistance(reference.features, kid_subsets, kid_subset_size, seed) if "kid" in metrics else None
        self.prdc = PrecisionRecall(reference.features, pr_k, dc_k, chunk, seed) if "prdc" in metrics else None
        # FID_inf sub-samples the generated pool features: KID and P/R keep them already; only
        # without both does FID keep its own copy
        self.intra_fid = bool(intra_fid)
        self.pool_store = GeneratedFeatures() if (self.fid is not None or self.intra_fid) and not (self.kid or self.prdc) \
            else None
        self.class_accuracy = ClassAccuracy() if getattr(extractor, "classifies_dataset", False) else None
        self.label_store = GeneratedFeatures()   # the intended labels, in sample order (intra-FID, records)
        self.seed = seed

    @property
    def _metrics(self):
        return [m for m in (self.fid, self.sfid, self.inception_score, self.kid, self.prdc, self.pool_store,
                            self.class_accuracy, self.label_store) if m is not None]

    def generated_pool(self) -> Tensor:
        """The generated pool features of all processes in sample order, from whichever metric keeps them."""
        return synced_features(next(m for m in (self.prdc, self.kid, self.pool_store) if m is not None))

    def to(self, device) -> "FeatureMetrics":
        self.extractor.to(device)
        for m in self._metrics:
            m.to(device)
        return self

    def reset_generated(self) -> None:
        for m in self._metrics:
            m.reset()

    @torch.no_grad()
    def update_generated(self, images: Tensor, indices: Sequence[int], labels: Tensor | None = None) -> None:
        """images: uint8 (B, C, H, W), labels: their intended classes or None. One extractor call
        feeds all metrics."""
        self.update_features(self.extractor(images), indices, labels)

    def update_features(self, out: dict[str, Tensor | None], indices: Sequence[int],
                        labels: Tensor | None = None) -> None:
        """Feed already extracted {"pool", "logits"[, "spatial"]} features of generated images to every metric."""
        pool, logits = out["pool"], out["logits"]
        idx = torch.as_tensor(list(indices), device=pool.device)
        if labels is not None:
            labels = labels.to(pool.device)
            self.label_store.update(labels[:, None].double(), idx)
            if self.class_accuracy is not None:
                self.class_accuracy.update(logits, labels)
        if self.fid is not None:
            self.fid.update(pool)
        if self.sfid is not None:
            self.sfid.update(out["spatial"])
        if self.inception_score is not None:
            self.inception_score.update(logits, idx)
        if self.kid is not None:
            self.kid.update(pool, idx)
        if self.prdc is not None:
            self.prdc.update(pool, idx)
        if self.pool_store is not None:
            self.pool_store.update(pool, idx)

    def compute(self, num_samples: int) -> tuple[dict[str, float], dict[str, Any]]:
        values: dict[str, float] = {}
        details: dict[str, Any] = {"reference": {k: self.reference.spec[k] for k in ("dataset", "split", "num_images")},
                                   "extractor": self.reference.spec["extractor"], "pr_k": self.pr_k, "dc_k": self.dc_k}
        if getattr(self.extractor, "test_accuracy", None) is not None:
            details["extractor_test_accuracy"] = self.extractor.test_accuracy
        if self.fid is not None:
            values["fid"] = float(self.fid.compute())
            warning = small_sample_warning(min(num_samples, self.reference.num_images or num_samples),
                                           self.extractor.feature_dim)
            details["fid_small_n"] = warning is not None
            if warning:
                log.warning(warning)
                details["fid_warning"] = warning
            if FID_INF_MIN_FRACTION * num_samples > self.extractor.feature_dim:
                fit = fid_infinity(self.generated_pool(), self.fid.ref_mu, self.fid.ref_sigma,
                                   min_fraction=FID_INF_MIN_FRACTION, seed=self.seed)
                values["fid_inf"], values["fid_inf_residual"] = fit["fid_inf"], fit["residual"]
                details["fid_inf"] = fit
            else:
                details["fid_inf"] = (f"not computed: every sub-sample ({FID_INF_MIN_FRACTION:g} N to N) must exceed "
                                      f"the feature dimension {self.extractor.feature_dim}; N = {num_samples}")
        if self.sfid is not None:
            values["sfid"] = float(self.sfid.compute())
            details["sfid"] = "Frechet distance of mixed_6/conv[:7] (7 x 17 x 17, NHWC) features (Nash et al. 2021; ADM evaluator)"
        elif not getattr(self.extractor, "has_spatial", False):
            details["sfid"] = f"not available: extractor '{self.extractor_name}' has no spatial features"
        if self.inception_score is not None:
            values["is"], values["is_std"] = self.inception_score.compute()
            fit = is_infinity(synced_features(self.inception_score), min_fraction=FID_INF_MIN_FRACTION,
                              seed=self.seed)
            values["is_inf"], details["is_inf"] = fit["is_inf"], fit
        else:
            details["is"] = f"not available: extractor '{self.extractor_name}' has no logits"
        if self.kid is not None:
            values["kid"], values["kid_std"] = self.kid.compute()
        if self.prdc is not None:
            values.update(self.prdc.compute())
            sizes = self.prdc.compared
            details["prdc_sizes"] = sizes
            details["prdc"] = (f"precision/recall (k={self.pr_k}) and density/coverage (k={self.dc_k}) on {sizes['compared']} "
                               f"real and {sizes['compared']} generated features (of {sizes['real']} real and "
                               f"{sizes['generated']} generated; the larger set subsampled, Kynkaanniemi et al. 2019)")
        labelled = bool(self.label_store.indices)
        if self.class_accuracy is not None and labelled:
            values["class_acc"] = float(self.class_accuracy.compute())
        if self.intra_fid:
            if not labelled or self.reference.labels is None:
                details["intra_fid"] = "not computed: it needs labelled samples (a conditional model) and a labelled reference"
            else:
                fit = intra_fid(self.generated_pool(), synced_features(self.label_store)[:, 0].long(),
                                self.reference.features, self.reference.labels, int(self.reference.labels.max()) + 1)
                values["intra_fid"], details["intra_fid"] = fit["intra_fid"], fit
        return values, details


def build_extractor(name: str, datamodule=None, cache_dir: str = ".cache", weights_path: str | None = None,
                    classifier_seed: int = 0, classifier_epochs: int | None = None):
    if name == "inception_pool":
        from metrics.extractors import InceptionPoolExtractor
        return InceptionPoolExtractor(weights_path)
    if name == "inception":
        from metrics.extractors import InceptionExtractor
        return InceptionExtractor(weights_path)
    if name == "classifier":
        from metrics.classifier import load_or_train_feature_classifier
        if datamodule is None:
            raise ValueError("the classifier extractor needs a datamodule (its labels)")
        return load_or_train_feature_classifier(datamodule, cache_dir, classifier_seed, classifier_epochs)
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
