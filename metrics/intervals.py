"""Means and their 95% confidence intervals (over seeds, or over repeated sample sets)."""
from __future__ import annotations

import math
from typing import Sequence

CONFIDENCE = 0.95


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1); std 0 for a single value."""
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return mean, std


def interval_text(values: Sequence[float], digits: int = 2) -> str:
    """"mean ± 95% t half-width" of ``values`` (the mean alone for one value): genbench's "±"."""
    mean, std = mean_std(values)
    if len(values) < 2:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {t_half_width(std, len(values)):.{digits}f}"


def t_half_width(std: float, n: int, confidence: float = CONFIDENCE) -> float:
    """Half-width of the Student-t confidence interval of a mean: t_{(1+c)/2, n-1} s / sqrt(n)."""
    from scipy import stats
    return float(stats.t.ppf((1 + confidence) / 2, n - 1) * std / math.sqrt(n)) if n > 1 else 0.0
