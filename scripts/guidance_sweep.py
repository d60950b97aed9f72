"""The guidance sweep: one checkpoint evaluated at a list of guidance scales with the same
per-sample seeds (Dhariwal & Nichol 2021, Table 4 / Figure 4: precision and IS rise, recall falls
as the scale grows; FID is best in between).

    # classifier-free guidance (a DDPM trained with model.label_dropout > 0)
    python scripts/guidance_sweep.py ckpt_path=<ddpm.ckpt> guidance=classifier_free scales=[0,0.5,1,2,4]
    # classifier guidance (any DDPM, with a model=noisy_classifier checkpoint)
    python scripts/guidance_sweep.py ckpt_path=<ddpm.ckpt> guidance=classifier \
        sampler.classifier_ckpt=<classifier.ckpt> scales=[0,1,2,4,8]

Every scale is an ordinary evaluation (scripts/evaluate.py's, so make_table reads its
results.json like any other run) in <out>/scale_<s>/; then <out>/sweep.{md,csv,json}: each metric
per scale as mean ± 95% interval over ``evaluation.repeats`` independent sample sets, and
<out>/plots/: each metric against the scale, and the precision-recall curve the scale traces.
"""
from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from typing import Any

import hydra

import models.configs  # noqa: F401  (registers the config resolvers)
from omegaconf import DictConfig, OmegaConf, open_dict

log = logging.getLogger(__name__)

#: which sampler setting each kind of guidance sweeps
SCALE_KEYS = {"classifier_free": "guidance_scale", "classifier": "classifier_scale"}
#: the sweep table's metrics (each extractor's), in order
SWEEP_METRICS = ("fid", "is", "precision", "recall", "density", "coverage", "class_acc")


def check_scales(scales: Any) -> list[float]:
    """The scales as floats >= 0 (the DDPM's own check of one scale), or an error naming the bad one."""
    from models.ddpm import scale_value

    if isinstance(scales, (int, float, str)) or scales is None:
        scales = [scales]
    out = []
    for s in scales:
        try:
            out.append(scale_value("scale", s))
        except ValueError:
            raise ValueError(f"guidance scales must be numbers >= 0; got {s!r} in scales={list(scales)}") from None
    if not out:
        raise ValueError("give at least one scale, e.g. scales=[0,1,2,4]")
    return out


def scale_config(cfg: DictConfig, key: str, scale: float, out_dir: Path) -> DictConfig:
    """The evaluation of one scale: ``key`` set to it, and the other kind of guidance off unless
    the sweep's sampler sets it (a class-conditional model's own sampler guides with w = 1:
    conf/conditioning/class.yaml, and a classifier sweep must not ride on it)."""
    one = copy.deepcopy(cfg)
    with open_dict(one):
        one.sampler[key] = scale
        for other in SCALE_KEYS.values():
            if other != key and one.sampler.get(other) is None:
                one.sampler[other] = 0.0
        one.paths.output_dir = str(out_dir / f"scale_{scale:g}")
        one.evaluation.bpd_num_images = 0   # guidance leaves the model's likelihood as it is
    return one


def sweep_rows(results: list[dict[str, Any]], scales: list[float]) -> list[dict[str, Any]]:
    """One row per scale: {"scale", metric: value, metric_ci95: half-width, ...} for every extractor."""
    rows = []
    for scale, r in zip(scales, results):
        m = r["metrics"]
        row: dict[str, Any] = {"scale": scale, "nfe": m.get("nfe"), "classifier_nfe": m.get("classifier_nfe", 0.0)}
        for key, value in m.items():
            base = key.split("/")[-1].removesuffix("_ci95")
            if base in SWEEP_METRICS:
                row[key] = value
        rows.append(row)
    return rows


def to_markdown(rows: list[dict[str, Any]], guidance: str) -> str:
    keys = [k for k in rows[0] if k not in ("scale", "nfe", "classifier_nfe") and not k.endswith("_ci95")]
    head = ["scale"] + keys + ["NFE", "classifier NFE"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [f"{row['scale']:g}"]
        for k in keys:
            ci = row.get(f"{k}_ci95")
            cells.append(f"{row[k]:.3f}" + (f" ± {ci:.3f}" if ci is not None else ""))
        cells += [f"{row['nfe']:.0f}", f"{row['classifier_nfe']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + (f"\n\n{guidance} guidance; mean ± half-width of the 95% interval over independent "
                               "sample sets (same per-sample seeds at every scale).\n")


def guidance_sweep(cfg: DictConfig) -> list[dict[str, Any]]:
    """Evaluate ``cfg.ckpt_path`` at every scale in ``cfg.scales``; write the table and plots."""
    from metrics.plots import plot_guidance_sweep
    from scripts.evaluate import evaluate

    if cfg.guidance not in SCALE_KEYS:
        raise ValueError(f"guidance must be one of {sorted(SCALE_KEYS)}, got {cfg.guidance!r}")
    if not cfg.get("ckpt_path"):
        raise ValueError("give ckpt_path=<a DDPM checkpoint>")
    scales = check_scales(OmegaConf.to_container(cfg.scales, resolve=True) if OmegaConf.is_config(cfg.scales)
                          else cfg.scales)
    key = SCALE_KEYS[cfg.guidance]
    if cfg.guidance == "classifier" and not cfg.sampler.get("classifier_ckpt"):
        raise ValueError("guidance=classifier needs sampler.classifier_ckpt=<a model=noisy_classifier checkpoint>")
    out = Path(cfg.paths.output_dir)
    results = []
    for scale in scales:
        log.info("guidance %s, scale %g", cfg.guidance, scale)
        results.append(evaluate(scale_config(cfg, key, scale, out)))
    rows = sweep_rows(results, scales)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.json").write_text(json.dumps({"guidance": cfg.guidance, "checkpoint": str(cfg.ckpt_path),
                                                "num_samples": results[0]["num_samples"],
                                                "repeats": int(cfg.evaluation.repeats), "rows": rows}, indent=2))
    (out / "sweep.md").write_text(to_markdown(rows, cfg.guidance))
    keys = list(rows[0])
    (out / "sweep.csv").write_text(",".join(keys) + "\n" + "".join(
        ",".join("" if row.get(k) is None else str(row.get(k)) for k in keys) + "\n" for row in rows))
    plot_guidance_sweep(rows, out / "plots" / "guidance_sweep", cfg.guidance)
    return rows


@hydra.main(version_base="1.3", config_path="../conf", config_name="guidance_sweep")
def main(cfg: DictConfig) -> None:
    rows = guidance_sweep(cfg)
    print(to_markdown(rows, cfg.guidance))


if __name__ == "__main__":
    main()
