"""Figures of the comparison (matplotlib, PNG + PDF): FID vs training step, FID vs NFE, precision
vs recall, and the families' samples side by side."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from metrics.curves import CurvePoint, history  # noqa: E402
from metrics.intervals import mean_std, t_half_width  # noqa: E402
from metrics.report import RunRecord  # noqa: E402


def _save(fig, out_stem: Path) -> list[Path]:
    out_stem.parent.mkdir(parents=True, exist_ok=True)
    paths = [out_stem.with_suffix(".png"), out_stem.with_suffix(".pdf")]
    for p in paths:
        fig.savefig(p, bbox_inches="tight", dpi=150)
    plt.close(fig)
    return paths


def mean_and_interval(values: Sequence[float]) -> tuple[float, float]:
    """Mean and 95% Student-t half-width (0 for one value), as the table shows them."""
    mean, std = mean_std(values)
    return mean, t_half_width(std, len(values))


def plot_fid_vs_step(records: Sequence[RunRecord], out_stem: Path, metric: str = "fid") -> list[Path]:
    """Per family: the mean over seeds at each evaluation step, the 95% interval as a band."""
    fig, ax = plt.subplots(figsize=(5, 3.5))
    extractor = None
    families = sorted({r.results["model"] for r in records if r.ok})
    for i, family in enumerate(families):
        by_step: dict[int, list[float]] = {}
        for r in (r for r in records if r.ok and r.results["model"] == family):
            for h in history(r.source):
                if metric in h["metrics"]:
                    extractor = extractor or h.get("feature_extractor")
                    by_step.setdefault(h["step"], []).append(h["metrics"][metric])
        if not by_step:
            continue
        steps = sorted(by_step)
        stats = [mean_and_interval(by_step[s]) for s in steps]
        ax.plot(steps, [m for m, _ in stats], marker="o", ms=3, color=f"C{i}", label=family)
        ax.fill_between(steps, [m - h for m, h in stats], [m + h for m, h in stats], color=f"C{i}", alpha=0.2)
    ax.set_xlabel("training step (optimizer steps)")
    ax.set_ylabel(f"{metric.upper()} [{extractor}]")
    ax.set_yscale("log")
    ax.legend()
    ax.set_title("FID during training (mean, 95% interval over seeds)")
    return _save(fig, out_stem)


def plot_fid_vs_compute(curves: dict[str, list[CurvePoint]], out_stem: Path, ylabel: str,
                        title: str = "FID against training compute") -> list[Path]:
    """Per family: the mean over seeds at each budget milestone, its 95% interval as a band
    (metrics/curves.py), on log-log axes."""
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for i, (family, curve) in enumerate(sorted(curves.items())):
        x = [p.tflop for p in curve]
        ax.plot(x, [p.mean for p in curve], marker="o", ms=3, color=f"C{i}", label=family)
        ax.fill_between(x, [max(p.low, 1e-3) for p in curve], [p.high for p in curve], color=f"C{i}", alpha=0.2)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("training compute (TFLOP)")
    ax.set_ylabel(ylabel)
    if curves:
        ax.legend(fontsize=8)
    seeds = max((p.n for curve in curves.values() for p in curve), default=0)
    ax.set_title(f"{title}\n(mean, 95% interval over {seeds} seeds)", fontsize=9)
    return _save(fig, out_stem)


def plot_fid_vs_nfe(points: Sequence[dict], out_stem: Path) -> list[Path]:
    """points: {"label": "ddpm DDIM (eta=0) @ 50", "nfe": 50, "fid": ..., "curve": "ddpm: DDIM (eta=0)"};
    the DDIM paper's Table 1 shape: one line per curve (a family's sampler), a star for a curve of
    one point. Without ``curve``, each label is its own curve. Points of one label from several
    seeds' checkpoints are averaged, with their 95% interval as error bars."""
    def curve(p: dict) -> str:
        return p.get("curve") or p["label"]

    fig, ax = plt.subplots(figsize=(6, 4))
    names = list(dict.fromkeys(curve(p) for p in points))
    for i, name in enumerate(names):
        by_label: dict[str, list[dict]] = {}
        for p in points:
            if curve(p) == name:
                by_label.setdefault(p["label"], []).append(p)
        line = []
        for label, group in by_label.items():
            fid, std = mean_std([p["fid"] for p in group])
            line.append((mean_std([p["nfe"] for p in group])[0], fid, t_half_width(std, len(group)), label))
        line.sort()
        style = {"color": f"C{i % 10}", "linestyle": "-" if i < 10 else "--"}
        if len(line) > 1:
            ax.errorbar([x for x, *_ in line], [y for _, y, *_ in line], yerr=[h for _, _, h, _ in line],
                        marker="o", ms=3, capsize=2, label=name, **style)
        else:
            ax.errorbar([line[0][0]], [line[0][1]], yerr=[line[0][2]], marker="*", ms=10, label=line[0][3],
                        zorder=3, **style)
    ax.set_xscale("log")
    ax.set_xlabel("network evaluations per sample (NFE)")
    ax.set_ylabel(f"FID [{points[0].get('extractor', '')}]" if points else "FID")
    ax.legend(fontsize=7)
    ax.set_title("FID against network evaluations per sample", fontsize=9)
    return _save(fig, out_stem)


def plot_precision_recall(records: Sequence[RunRecord], out_stem: Path,
                          label: Callable[[dict], str] = lambda results: results["model"]) -> list[Path]:
    """Per family (or per ``label`` of a run's results): each seed faint, the mean over seeds with
    95% interval bars."""
    fig, ax = plt.subplots(figsize=(4, 4))
    families = sorted({label(r.results) for r in records if r.ok})
    for i, family in enumerate(families):
        pts = [(r.results["metrics"]["recall"], r.results["metrics"]["precision"]) for r in records
               if r.ok and label(r.results) == family and "precision" in r.results["metrics"]]
        if pts:
            ax.scatter(*zip(*pts), color=f"C{i}", s=12, alpha=0.35)
            (rx, rh), (px, ph) = mean_and_interval([p[0] for p in pts]), mean_and_interval([p[1] for p in pts])
            ax.errorbar([rx], [px], xerr=[rh], yerr=[ph], color=f"C{i}", marker="o", capsize=3, label=family)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    first = next((r.results for r in records if r.ok), {})
    extractor = first.get("feature_extractor", "")
    k = ((first.get("details") or {}).get("extractors") or {}).get(extractor, {}).get("pr_k", 3)
    ax.set_title(f"improved precision/recall (k={k}) [{extractor}]")
    ax.legend()
    return _save(fig, out_stem)


def plot_guidance_sweep(rows: Sequence[dict], out_stem: Path, guidance: str) -> list[Path]:
    """Each metric against the guidance scale (95% interval bars over sample sets), and the
    precision-recall curve the scale traces (Dhariwal & Nichol 2021, Figure 4)."""
    keys = [k for k in rows[0] if k not in ("scale", "nfe", "classifier_nfe") and not k.endswith("_ci95")]
    scales = [r["scale"] for r in rows]
    fig, axes = panels(len(keys) + 1, panel=(2.6, 2.4))
    for ax, key in zip(axes, keys):
        ax.errorbar(scales, [r[key] for r in rows], yerr=[r.get(f"{key}_ci95") or 0.0 for r in rows],
                    marker="o", capsize=3)
        ax.set_xlabel("guidance scale")
        ax.set_title(key, fontsize=9)
    pr = axes[-1]
    for prefix in sorted({k[: -len("precision")] for k in keys if k.endswith("precision")}):
        rec, prec = [r[prefix + "recall"] for r in rows], [r[prefix + "precision"] for r in rows]
        pr.plot(rec, prec, marker="o", label=prefix.rstrip("/") or "primary")
        for x, y, s in zip(rec, prec, scales):
            pr.annotate(f"{s:g}", (x, y), textcoords="offset points", xytext=(3, 3), fontsize=7)
    pr.set_xlabel("recall")
    pr.set_ylabel("precision")
    pr.set_title("precision-recall vs scale", fontsize=9)
    for ax in axes[len(keys) + 1:]:
        ax.axis("off")
    fig.suptitle(f"{guidance.replace('_', '-')} guidance sweep")
    fig.tight_layout()
    return _save(fig, out_stem)


def panels(count: int, panel: tuple[float, float], columns: int = 4):
    """A figure of ``count`` panels in rows of at most ``columns`` (readable at page width); the
    axes in reading order, spare ones included (turn them off)."""
    cols = max(1, min(columns, count))
    rows = -(-count // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(panel[0] * cols, panel[1] * rows), squeeze=False)
    return fig, list(axes.flat)


def plot_sample_grids(grids: dict[str, Path], out_stem: Path) -> list[Path]:
    """One panel per family, titled with its label (e.g. the family and its FID): its final sample
    grid (the PNG the evaluation saved), at most three panels per row."""
    from PIL import Image

    fig, axes = panels(len(grids), panel=(3.0, 3.4), columns=3)
    for ax in axes:
        ax.axis("off")
    for ax, (family, path) in zip(axes, sorted(grids.items())):
        img = Image.open(path)
        ax.imshow(img, cmap="gray" if img.mode == "L" else None, interpolation="nearest")
        ax.set_title(family, fontsize=9)
    fig.tight_layout()
    return _save(fig, out_stem)


def final_grid(record: RunRecord) -> Path | None:
    grids = sorted((Path(record.source) / "samples").glob("step*.png"))
    return grids[-1] if grids else None
