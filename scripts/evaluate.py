"""Evaluate a checkpoint, or score any sample set against any reference.

    # (a) a checkpoint, with any evaluation settings (sampler, N, extractor, processes)
    python scripts/evaluate.py ckpt_path=logs/train/runs/X/checkpoints/last.ckpt \
        evaluation.num_samples=1000 evaluation.extractor=inception_pool sampler.name=ddim sampler.steps=50
    # (b) a sample set against a reference: folders, guided-diffusion .npz or dataset names
    python scripts/evaluate.py samples=samples.npz reference=cifar10:train evaluation.extractor=inception_pool

Prints one JSON line of metrics and writes <run dir>/results.json (and features.npz with
save_features=true; with save_samples=true a checkpoint's samples as samples_NxHxWxC.npz in the ADM
evaluator's format: arr_0 uint8 NHWC, arr_1 labels of a conditional model). An ADM reference batch
that carries mu/sigma (mu_s/sigma_s) is scored against those statistics without reading its images.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import hydra

import models.configs  # noqa: F401  (registers the config resolvers)
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from metrics.distributed import free_port
from metrics.evaluation import Evaluator, save_png
from metrics.feature_metrics import mean_cov
from metrics.features import NEEDS_REFERENCE_FEATURES, FeatureMetrics, build_extractor, build_feature_metrics
from metrics.image_sets import load_image_set, npz_statistics, save_npz
from metrics.reference import ReferenceStats, load_or_compute_reference, reference_spec
from metrics.results import RESULTS_FILE, results_record, write_json
from models.checkpoints import load_module

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- (a) checkpoints

def load_checkpoint_run(ckpt_path: str | Path, device: str = "cpu"):
    """(model, datamodule, run_config, global_step) rebuilt from a checkpoint's stored config and weights."""
    model, cfg, ckpt = load_module(ckpt_path, device)
    return model, hydra.utils.instantiate(cfg.datamodule), cfg, int(ckpt.get("global_step", 0))


def _evaluate_checkpoint_worker(rank: int, world: int, port: int, cfg: DictConfig, out: dict | None) -> dict:
    """One process of a checkpoint evaluation; with world > 1 a gloo process group on localhost."""
    if world > 1:
        torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
        torch.set_num_threads(max(1, torch.get_num_threads() // world))
    try:
        model, datamodule, run_cfg, step = load_checkpoint_run(cfg.ckpt_path, cfg.device)
        ev = cfg.evaluation
        evaluator = Evaluator(ev.num_samples, ev.batch_size, ev.bpd_num_images, ev.grid_size, ev.seed, ev.repeats,
                              ev.labels)
        names = ([ev.extractor] if ev.extractor else []) + [e for e in ev.final_extractors if e != ev.extractor]
        feature_sets = [build_feature_metrics(n, datamodule, cfg.paths.cache_dir, ev.reference.split,
                                              ev.reference.num_images, ev.metrics, cfg.device, ev.batch_size,
                                              ev.weights_path, seed=ev.seed, pr_k=ev.pr_k, dc_k=ev.dc_k,
                                              intra_fid=ev.intra_fid)
                        for n in names]
        sampler = OmegaConf.to_container(cfg.sampler, resolve=True) if cfg.get("sampler") else {}
        kept: dict[int, tuple] = {}

        def keep(images, idx, labels):
            for k, i in enumerate(idx):
                kept[i] = (images[k].cpu(), None if labels is None else int(labels[k]))

        result = evaluator.evaluate(model, datamodule.split("test"), sampler, feature_sets,
                                    datamodule.class_frequencies(), sample_sink=keep if cfg.get("save_samples") else None)
        if cfg.get("save_samples") and rank == 0:
            order = sorted(kept)
            images = torch.stack([kept[i][0] for i in order])
            labels = None if kept[order[0]][1] is None else torch.tensor([kept[i][1] for i in order])
            n, c, h, w = images.shape
            save_npz(Path(cfg.paths.output_dir) / f"samples_{n}x{h}x{w}x{c}.npz", images, labels)
        summary = results_record(
            model.family, datamodule.name, int(run_cfg.seed), result.metrics, num_params=model.num_params,
            train_steps=step, feature_extractor=result.feature_extractor, num_samples=result.num_samples,
            sampler=result.sampler, likelihood_kind=model.likelihood_kind, details=result.details,
            checkpoint=str(cfg.ckpt_path), world_size=world,
            config=OmegaConf.to_container(run_cfg, resolve=True))   # what the table's row keys read
        if rank == 0 and out is not None:
            out.update(summary)
            out["_grid"] = result.grid
        return summary
    finally:
        if world > 1:
            torch.distributed.destroy_process_group()


def evaluate_checkpoint(cfg: DictConfig) -> dict[str, Any]:
    world = int(cfg.get("num_processes", 1))
    if cfg.get("save_samples") and world > 1:
        raise ValueError("save_samples=true writes one .npz from one process: use num_processes=1")
    if world <= 1:
        out: dict = {}
        _evaluate_checkpoint_worker(0, 1, 0, cfg, out)
        return out
    import torch.multiprocessing as mp

    manager = mp.Manager()
    shared = manager.dict()
    mp.spawn(_spawn_entry, args=(world, free_port(), cfg, shared), nprocs=world, join=True)
    return dict(shared)


def _spawn_entry(rank, world, port, cfg, shared):
    local: dict = {}
    _evaluate_checkpoint_worker(rank, world, port, cfg, local if rank == 0 else None)
    if rank == 0:
        shared.update(local)


# ----------------------------------------------------------------------------- (b) sample sets

def features_of(extractor, images: torch.Tensor, batch_size: int, device) -> dict[str, torch.Tensor | None]:
    """Every output of ``extractor`` on ``images`` (pool, logits, spatial where it has them), on the CPU."""
    parts: dict[str, list] = {}
    for start in range(0, images.shape[0], batch_size):
        for key, value in extractor(images[start:start + batch_size].to(device)).items():
            if value is not None:
                parts.setdefault(key, []).append(value.cpu())
    return {"pool": torch.cat(parts["pool"]), **{k: torch.cat(parts[k]) if k in parts else None
                                                 for k in ("logits", "spatial")}}


def _needs_reference_features(metrics) -> bool:
    """KID and P/R/D/C compare with the reference's features, not its statistics."""
    return metrics != "auto" and any(m in NEEDS_REFERENCE_FEATURES for m in metrics)


def precomputed_reference(stats: dict, source: str, extractor, image_shape) -> ReferenceStats:
    """ReferenceStats from an ADM reference batch's mu/sigma (and mu_s/sigma_s), checked against the
    extractor's feature sizes; its images are never read (their count comes from the .npy header)."""
    from metrics.image_sets import ImageSetError, npz_count

    if len(stats["mu"]) != extractor.feature_dim:
        raise ImageSetError(f"{source}: its statistics are {len(stats['mu'])}-dimensional, extractor "
                            f"'{extractor.name}' gives {extractor.feature_dim}: they come from another network; use "
                            "evaluation.extractor=inception_pool (the ADM evaluator's pool3) or a reference with images")
    spec = reference_spec(source, "precomputed", npz_count(Path(source)) or 0, image_shape, extractor.cache_key())
    return ReferenceStats(stats["mu"], stats["sigma"], torch.empty(0, extractor.feature_dim), spec, None,
                          stats.get("mu_s"), stats.get("sigma_s"))


def evaluate_sample_sets(cfg: DictConfig) -> dict[str, Any]:
    ev, device = cfg.evaluation, cfg.device
    samples = load_image_set(cfg.samples, cfg.paths.data_dir)
    ref_source = cfg.reference
    from datamodules.datasets import REGISTRY
    is_dataset = Path(ref_source).suffix != ".npz" and not Path(ref_source).is_dir() and ref_source.partition(":")[0] in REGISTRY
    name = ev.extractor or "inception_pool"
    stats = npz_statistics(Path(ref_source)) if Path(ref_source).suffix == ".npz" else None
    datamodule = None
    if name == "classifier":
        if not is_dataset:
            raise ValueError("the classifier extractor needs a dataset reference (its labels), e.g. reference=digits")
        from datamodules import ImageDataModule
        from datamodules.datasets import get_entry
        info = get_entry(ref_source.partition(":")[0]).info
        datamodule = ImageDataModule(name=ref_source.partition(":")[0], data_dir=cfg.paths.data_dir,
                                     image_size=samples.shape[-1], channels=info.channels, num_classes=info.num_classes)
    extractor = build_extractor(name, datamodule, cfg.paths.cache_dir, ev.weights_path).to(device)
    if is_dataset:
        dname, _, split = ref_source.partition(":")
        from datamodules.datasets import load_split
        dataset = load_split(dname, cfg.paths.data_dir, split or "train", samples.shape[-1])
        reference, _ = load_or_compute_reference(extractor, dataset, dname, split or "train", ev.reference.num_images,
                                                 tuple(samples.shape[1:]), cfg.paths.cache_dir, ev.batch_size, device)
        ref_channels = dataset[0][0].shape[0]
    elif stats is not None and not _needs_reference_features(ev.metrics):
        # an ADM reference batch's own statistics: FID (and sFID) without reading its images
        reference = precomputed_reference(stats, str(ref_source), extractor, list(samples.shape[1:]))
        ref_channels = samples.shape[1]
    else:
        ref_images = load_image_set(ref_source)
        ref_channels = ref_images.shape[1]
        ref_out = features_of(extractor, ref_images, ev.batch_size, device)
        feats = ref_out["pool"]
        spec = reference_spec(str(ref_source), "file", feats.shape[0], list(ref_images.shape[1:]), extractor.cache_key())
        spatial = mean_cov(ref_out["spatial"]) if ref_out["spatial"] is not None else (None, None)
        reference = ReferenceStats(*mean_cov(feats), feats, spec, None, *spatial)
    if ref_channels != samples.shape[1]:
        raise ValueError(f"samples have {samples.shape[1]} channel(s), the reference {ref_channels}; "
                         "compare like with like")
    metrics = FeatureMetrics(extractor, reference, ev.metrics, seed=ev.seed, pr_k=ev.pr_k, dc_k=ev.dc_k).to(device)
    gen = features_of(extractor, samples, ev.batch_size, device)
    metrics.reset_generated()
    metrics.update_features({k: v.to(device) if v is not None else None for k, v in gen.items()},
                            range(samples.shape[0]))   # the features above, not a second pass
    values, details = metrics.compute(samples.shape[0])
    summary = results_record(None, str(ref_source), int(ev.seed), values, feature_extractor=name,
                             num_samples=int(samples.shape[0]), details=details, samples=str(cfg.samples))
    if cfg.get("save_features"):
        out_dir = Path(cfg.paths.output_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        arrays = {"samples_pool": gen["pool"].numpy(), "reference_pool": reference.features.numpy()}
        if gen["logits"] is not None:
            arrays["samples_logits"] = gen["logits"].numpy()
        np.savez(out_dir / "features.npz", **arrays)
    return summary


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Dispatch: ckpt_path -> checkpoint evaluation; samples + reference -> sample-set scoring."""
    if cfg.get("ckpt_path"):
        summary = evaluate_checkpoint(cfg)
    elif cfg.get("samples") and cfg.get("reference"):
        summary = evaluate_sample_sets(cfg)
    else:
        raise ValueError("give ckpt_path=<file.ckpt>, or samples=<folder|.npz|dataset> and reference=<...>")
    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    grid = summary.pop("_grid", None)
    if grid is not None:
        save_png(grid, out_dir / "samples.png")
    write_json(out_dir / RESULTS_FILE, summary)
    if cfg.get("wandb") and cfg.wandb.get("enabled"):
        from scripts.loggers import log_results_run
        log_results_run(summary, cfg.wandb.project, str(out_dir), cfg.wandb.group, list(cfg.wandb.tags),
                        cfg.wandb.mode, grid)
    return summary


@hydra.main(version_base="1.3", config_path="../conf", config_name="eval")
def main(cfg: DictConfig) -> None:
    summary = evaluate(cfg)
    print(json.dumps({"metrics": summary["metrics"], "feature_extractor": summary["feature_extractor"],
                      "num_samples": summary["num_samples"]}))


if __name__ == "__main__":
    main()
