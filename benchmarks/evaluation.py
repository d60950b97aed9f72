"""Evaluation and sampling figures: FID from features against scipy's sqrtm, extractor passes per
generated image, real-image passes with a cold and a warm reference cache, DDPM sampling cost and
the quality of the fast samplers on a trained model."""
from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.configs import build
from benchmarks.memory import PeakMemory, sync


def fid_vs_sqrtm(dim: int = 2048, n: int = 4096) -> dict:
    from scipy import linalg

    from metrics.feature_metrics import frechet_distance, mean_cov
    rng = np.random.default_rng(0)
    a = rng.normal(size=(n, dim)) @ (rng.normal(size=(dim, dim)) / np.sqrt(dim))
    b = a[: n // 2] * 1.1 + 0.05
    mu1, s1 = mean_cov(torch.from_numpy(a))
    mu2, s2 = mean_cov(torch.from_numpy(b))
    t0 = time.perf_counter()
    ours = float(frechet_distance(mu1, s1, mu2, s2))
    t_ours = time.perf_counter() - t0
    m1, m2, c1, c2 = mu1.numpy(), mu2.numpy(), s1.numpy(), s2.numpy()
    t0 = time.perf_counter()
    covmean = linalg.sqrtm(c1 @ c2)
    ref = float(((m1 - m2) ** 2).sum() + np.trace(c1) + np.trace(c2) - 2 * np.trace(covmean.real))
    t_ref = time.perf_counter() - t0
    return {"dim": dim, "fid_ours": ours, "fid_scipy_sqrtm": ref, "rel_diff": abs(ours - ref) / abs(ref),
            "seconds_ours": t_ours, "seconds_sqrtm": t_ref, "speedup": t_ref / t_ours}


def evaluation_passes(device, cache_dir: Path) -> dict:
    """Extractor calls per generated image for the full metric set, and real-image passes of a first
    and a second (cached) evaluation, on a cold reference cache sharing the trained classifier."""
    shared = Path(cache_dir)
    cold = Path(tempfile.mkdtemp(prefix="benchmark-cache-"))
    (shared / "classifiers").mkdir(parents=True, exist_ok=True)
    (cold / "classifiers").symlink_to((shared / "classifiers").resolve())
    try:
        return _evaluation_passes(device, cold)
    finally:
        shutil.rmtree(cold, ignore_errors=True)


def _evaluation_passes(device, cache_dir: Path) -> dict:
    from metrics.evaluation import Evaluator
    from metrics.features import build_feature_metrics
    from metrics.reference import REAL_IMAGE_PASSES

    _, dm, model = build("gan", device, 128)
    counts = {"calls": 0, "images": 0}
    results = {}
    for attempt in ("first", "second"):
        before = REAL_IMAGE_PASSES["count"]
        fm = build_feature_metrics("classifier", dm, str(cache_dir), "train", None, "auto", device)
        results[f"real_image_passes_{attempt}"] = REAL_IMAGE_PASSES["count"] - before
    forward = fm.extractor.forward

    def counting(images):
        counts["calls"] += 1
        counts["images"] += images.shape[0]
        return forward(images)
    fm.extractor.forward = counting
    ev = Evaluator(num_samples=512, batch_size=128, bpd_num_images=0, grid_size=0)
    result = ev.evaluate(model, None, {}, [fm])
    results.update({"generated_images": 512, "extractor_images": counts["images"],
                    "extractor_passes_per_image": counts["images"] / 512,
                    "metrics_fed": sorted(k for k in result.metrics if k not in ("nfe", "sec_per_sample"))})
    return results


def inception_throughput(device, num_images: int = 256, chunks=(256, 32, 8)) -> list[dict]:
    """Seconds per image of the inception_pool extractor on 8x8 digits-like images (resized to
    299x299 inside) at several images per forward (metrics.extractors.CPU_CHUNK is the default on
    the CPU), with the largest feature difference to the first setting (float rounding only)."""
    from metrics.extractors import InceptionPoolExtractor

    extractor = InceptionPoolExtractor().to(device)
    images = torch.randint(0, 256, (num_images, 1, 8, 8), generator=torch.Generator().manual_seed(0),
                           dtype=torch.uint8).to(device)
    rows, first = [], None
    for chunk in chunks:
        extractor.chunk = chunk
        extractor(images[:min(chunk, num_images)])  # warm-up
        sync(device)
        t0 = time.perf_counter()
        feats = extractor(images)["pool"]
        sync(device)
        seconds = time.perf_counter() - t0
        first = feats if first is None else first
        rows.append({"chunk": chunk, "sec_per_image": seconds / num_images,
                     "max_abs_diff": float((feats - first).abs().max())})
    for row in rows:
        row["speedup"] = rows[0]["sec_per_image"] / row["sec_per_image"]
    return rows


DDPM_SAMPLERS = [("ancestral-1000", {"name": "ancestral", "steps": None})] + [
    (f"DDIM-{steps}", {"name": "ddim", "steps": steps, "eta": 0.0}) for steps in (100, 50, 20, 10)]


def sampling_costs(device, num_samples: int) -> list[dict]:
    _, _, model = build("ddpm", device, 128)
    model.eval()
    rows = []
    for label, kw in DDPM_SAMPLERS:
        with PeakMemory(device) as mem:
            sync(device)
            t0 = time.perf_counter()
            model.sample(num_samples, torch.Generator(device).manual_seed(0), **kw)
            sync(device)
            seconds = time.perf_counter() - t0
        rows.append({"sampler": label, "nfe": model.sampling_cost(**kw)["nfe"], "sec_per_sample": seconds / num_samples,
                     "peak_mb": mem.peak_mb})
    return rows
