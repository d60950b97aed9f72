"""FID against training compute, from the evaluations each run logged at its budget milestones
(``eval_history.jsonl``: models/budget.py, metrics/callback.py), and the crossover budget of two
families: the smallest compute at which one family's 95% interval lies wholly below the other's.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from metrics.intervals import mean_std, t_half_width
from metrics.report import RunRecord


@dataclass(frozen=True)
class CurvePoint:
    tflop: float          # training compute spent by this evaluation (10^12 FLOPs)
    mean: float           # mean over seeds
    half_width: float     # 95% Student-t half-width over seeds (0 for one seed)
    n: int                # seeds evaluated at this point

    @property
    def low(self) -> float:
        return self.mean - self.half_width

    @property
    def high(self) -> float:
        return self.mean + self.half_width


def history(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "eval_history.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def flops_per_batch(results: dict) -> float | None:
    """Training FLOPs one batch spends: the run's spent FLOPs over its batches."""
    batches = (results.get("budget") or {}).get("planned_batches")
    flops = results.get("train_flops")
    if not flops or not batches:
        return None
    return float(flops) / int(batches)


def compute_curves(records: Sequence[RunRecord], metric: str = "fid",
                   label: Callable[[dict], str] = lambda results: results["model"]) -> dict[str, list[CurvePoint]]:
    """Per label (the family by default): ``metric`` against the compute spent, mean and 95%
    interval over the seeds evaluated at the same number of batches. ``metric`` is a key of the
    history's metrics (``fid`` is the primary extractor's, ``inception_pool/fid`` another's)."""
    by_label: dict[str, dict[int, list[float]]] = {}
    per_batch: dict[str, float] = {}
    for record in records:
        if not record.ok:
            continue
        flops = flops_per_batch(record.results)
        if flops is None:
            continue
        name = label(record.results)
        per_batch.setdefault(name, flops)
        for entry in history(record.source):
            value = entry.get("metrics", {}).get(metric)
            if value is not None and entry.get("batches") is not None:
                by_label.setdefault(name, {}).setdefault(int(entry["batches"]), []).append(float(value))
    curves = {}
    for name, points in sorted(by_label.items()):
        curve = []
        for batches, values in sorted(points.items()):
            mean, std = mean_std(values)
            curve.append(CurvePoint(batches * per_batch[name] / 1e12, mean, t_half_width(std, len(values)), len(values)))
        curves[name] = curve
    return curves


def crossover(curves: dict[str, list[CurvePoint]], better: str, than: str, rel_tol: float = 0.02) -> dict:
    """The smallest compute at which ``better``'s interval lies wholly below ``than``'s (lower is
    better), comparing points at the same compute (within ``rel_tol``), and whether it stays below
    at every larger point. ``than``'s points are matched to ``better``'s nearest compute."""
    a, b = curves.get(better, []), curves.get(than, [])
    pairs = []
    for p in a:
        q = min(b, key=lambda q: abs(q.tflop - p.tflop), default=None)
        if q is not None and abs(q.tflop - p.tflop) <= rel_tol * max(p.tflop, q.tflop):
            pairs.append((p, q))
    below = [p.high < q.low for p, q in pairs]
    first = next((k for k, flag in enumerate(below) if flag), None)
    return {
        "better": better, "than": than, "compared_at_tflop": [p.tflop for p, _ in pairs],
        "crossover_tflop": None if first is None else pairs[first][0].tflop,
        "stays_below": first is not None and all(below[first:]),
        "at_largest": None if not pairs else {
            better: [pairs[-1][0].mean, pairs[-1][0].half_width], than: [pairs[-1][1].mean, pairs[-1][1].half_width],
            "tflop": pairs[-1][0].tflop, "below": below[-1]},
    }


def crossover_text(result: dict, metric: str = "FID") -> str:
    """One sentence for the job's summary."""
    largest = result["at_largest"]
    if largest is None:
        return f"{result['better']} vs {result['than']}: no common budget points"
    a, b = largest[result["better"]], largest[result["than"]]
    at = (f"at {largest['tflop']:.2g} TFLOP {result['better']} {metric} {a[0]:.1f} ± {a[1]:.1f} vs "
          f"{result['than']} {b[0]:.1f} ± {b[1]:.1f} (95% interval over seeds)")
    if result["crossover_tflop"] is None:
        return f"no crossover up to {largest['tflop']:.2g} TFLOP: {at}"
    return (f"{result['better']} below {result['than']} from {result['crossover_tflop']:.2g} TFLOP"
            f"{'' if result['stays_below'] else ' (not at every larger budget)'}; {at}")
