"""Reference (real-image) features and statistics, cached on disk.

Key = sha256 of {dataset, split, N, image shape, extractor weights and preprocessing}. The file
(``<cache_dir>/reference/<dataset>-<split>-<extractor>-<key>.npz``) stores the key's spec too; a
file that fails to load, does not match its spec or holds non-finite numbers is rebuilt with a
warning, never used. The file is plain arrays (read with ``allow_pickle=False``); concurrent jobs
build one entry under a file lock and write it whole (metrics/cache_files.py).
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from metrics.cache_files import CacheWarning, atomic_write, load_or_build
from metrics.distributed import is_distributed, rank_and_world
from metrics.feature_metrics import mean_and_covariance

log = logging.getLogger(__name__)

#: real images passed through an extractor in this process (a second evaluation must add 0)
REAL_IMAGE_PASSES = {"count": 0}


#: an invalid reference cache entry (or an interrupted build) is rebuilt with this warning
ReferenceCacheWarning = CacheWarning


@dataclass
class ReferenceStats:
    mu: Tensor           # (D,) float64
    sigma: Tensor        # (D, D) float64
    features: Tensor     # (N, D) float32
    spec: dict
    labels: Tensor | None = None   # (N,) long: the class of each image (per-class statistics, intra-FID)
    spatial_mu: Tensor | None = None      # (D_s,) float64: sFID's statistics, for extractors with spatial features
    spatial_sigma: Tensor | None = None   # (D_s, D_s) float64

    @property
    def num_images(self) -> int:
        """Images behind the statistics: the features' count, or for precomputed statistics without
        features (an ADM reference batch) the count its spec records (0 = unknown)."""
        return int(self.features.shape[0]) or int(self.spec.get("num_images") or 0)


def reference_spec(dataset_name: str, split: str, num_images: int, image_shape, extractor_key: dict) -> dict:
    return {"dataset": dataset_name, "split": split, "num_images": int(num_images),
            "image_shape": list(image_shape), "extractor": extractor_key, "version": 2}


def spec_key(spec: dict) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def cache_path(cache_dir: str | Path, spec: dict) -> Path:
    name = f"{spec['dataset']}-{spec['split']}-{spec['extractor']['extractor']}-n{spec['num_images']}-{spec_key(spec)}.npz"
    return Path(cache_dir) / "reference" / name


def _save(path: Path, stats: ReferenceStats) -> None:
    extra = {} if stats.labels is None else {"labels": stats.labels.numpy()}
    if stats.spatial_mu is not None:
        extra.update(spatial_mu=stats.spatial_mu.numpy(), spatial_sigma=stats.spatial_sigma.numpy())
    atomic_write(path, lambda f: np.savez(f, mu=stats.mu.numpy(), sigma=stats.sigma.numpy(),
                                          features=stats.features.numpy(),
                                          spec=np.array(json.dumps(stats.spec, sort_keys=True)), **extra))


def _load(path: Path, spec: dict) -> ReferenceStats:
    """Load and validate; raises ValueError naming what is wrong."""
    try:
        with np.load(path, allow_pickle=False) as data:  # arrays only, never a pickle
            stored = json.loads(str(data["spec"]))
            mu, sigma, feats = (torch.from_numpy(data[k].copy()) for k in ("mu", "sigma", "features"))
            labels = torch.from_numpy(data["labels"].copy()).long() if "labels" in data.files else None
            spatial = [torch.from_numpy(data[k].copy()) for k in ("spatial_mu", "spatial_sigma") if k in data.files]
    except Exception as err:
        raise ValueError(f"unreadable ({type(err).__name__}: {err})") from err
    if stored != json.loads(json.dumps(spec, sort_keys=True)):
        raise ValueError("its recorded spec does not match the requested one")
    d = mu.shape[0]
    if sigma.shape != (d, d) or feats.ndim != 2 or feats.shape[1] != d or feats.shape[0] != spec["num_images"]:
        raise ValueError(f"array shapes do not match (mu {tuple(mu.shape)}, sigma {tuple(sigma.shape)}, "
                         f"features {tuple(feats.shape)})")
    if not (torch.isfinite(mu).all() and torch.isfinite(sigma).all() and torch.isfinite(feats).all()):
        raise ValueError("it holds non-finite values")
    if spatial and (len(spatial) != 2 or spatial[1].shape != (spatial[0].shape[0],) * 2
                    or not all(torch.isfinite(a).all() for a in spatial)):
        raise ValueError("its spatial statistics are malformed")
    if labels is not None and labels.shape != (feats.shape[0],):
        raise ValueError(f"labels {tuple(labels.shape)} do not match the {feats.shape[0]} features")
    return ReferenceStats(mu.double(), sigma.double(), feats.float(), stored, labels,
                          *(a.double() for a in spatial) if spatial else (None, None))


@torch.no_grad()
def extract_dataset_features(extractor, dataset: Dataset, num_images: int, batch_size: int,
                             device: torch.device) -> tuple[Tensor, Tensor, tuple[Tensor, Tensor] | None]:
    """Features of the first ``num_images`` items of ``dataset`` (one pass), (N, D) float32 on CPU,
    their labels (N,), and for extractors with spatial features their (mean, covariance) in float64
    (running sums: the spatial features themselves are not kept)."""
    from metrics.evaluation import quantize

    out, labels, sums = [], [], None
    extractor.to(device)
    for start in range(0, num_images, batch_size):
        items = [dataset[i] for i in range(start, min(start + batch_size, num_images))]
        batch = torch.stack([item[0] for item in items])
        result = extractor(quantize(batch).to(device))
        out.append(result["pool"].float().cpu())
        if result.get("spatial") is not None:
            x = result["spatial"].double().cpu()
            sums = (x.sum(0), x.T @ x) if sums is None else (sums[0] + x.sum(0), sums[1] + x.T @ x)
        labels.extend(int(item[1]) for item in items)
        REAL_IMAGE_PASSES["count"] += batch.shape[0]
    spatial = mean_and_covariance(*sums, num_images) if sums is not None else None
    return torch.cat(out), torch.tensor(labels, dtype=torch.long), spatial


def load_or_compute_reference(extractor, dataset: Dataset, dataset_name: str, split: str, num_images: int | None,
                              image_shape, cache_dir: str | Path, batch_size: int = 256,
                              device: torch.device | str = "cpu") -> tuple[ReferenceStats, bool]:
    """Cached reference stats, computed (by rank 0 under DDP) when missing or invalid.
    Returns (stats, computed_now)."""
    n = len(dataset) if num_images in (None, 0) else min(int(num_images), len(dataset))
    spec = reference_spec(dataset_name, split, n, image_shape, extractor.cache_key())
    path = cache_path(cache_dir, spec)
    rank, _ = rank_and_world()
    computed = False

    def build() -> ReferenceStats:
        log.info("computing reference features: %d %s/%s images with %s", n, dataset_name, split, spec["extractor"]["extractor"])
        feats, labels, spatial = extract_dataset_features(extractor, dataset, n, batch_size, torch.device(device))
        mu = feats.double().mean(0)
        xc = feats.double() - mu
        return ReferenceStats(mu, xc.T @ xc / (n - 1), feats, spec, labels, *(spatial or (None, None)))

    if rank == 0:
        stats, computed = load_or_build(path, lambda p: _load(p, spec), build, _save, "reference cache")
    if is_distributed():
        torch.distributed.barrier()
    if rank != 0:
        stats = _load(path, spec)
    return stats, computed
