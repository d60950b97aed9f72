"""results.json: the contract between a run and the table script, written atomically."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

RESULTS_FILE = "results.json"
SCHEMA_KEYS = ("model", "dataset", "seed", "num_params", "train_steps", "feature_extractor",
               "num_samples", "sampler", "metrics")


#: likelihood_kind -> what a bits/dim figure is: the exact likelihood of the 8-bit data; the exact
#: density of dequantized data (a bound on the 8-bit likelihood, flows); a variational bound
BPD_KINDS = {"exact": "exact", "dequantized": "dequantized", "elbo": "bound", "ode": "ODE"}


def results_record(model: str | None, dataset: str | None, seed: int, metrics: dict[str, float], *,
                   num_params: int | None = None, train_steps: int | None = None,
                   feature_extractor: str | None = None, num_samples: int | None = None,
                   sampler: dict | None = None, likelihood_kind: str | None = None,
                   details: dict | None = None, status: str = "ok", **extra: Any) -> dict[str, Any]:
    """The one builder of a results.json record (training runs, checkpoint and sample-set
    evaluations): the SCHEMA_KEYS every reader relies on, then ``likelihood_kind``, ``details``,
    ``status`` and whatever else the writer adds (``extra``: compute, config, checkpoint, ...)."""
    return {"model": model, "dataset": dataset, "seed": int(seed), "num_params": num_params,
            "train_steps": train_steps, "feature_extractor": feature_extractor, "num_samples": num_samples,
            "sampler": sampler, "likelihood_kind": likelihood_kind, "metrics": metrics,
            "details": details or {}, "status": status, **extra}


class ResultsWriteError(OSError):
    """The results could not be written; any previous file is left untouched."""


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN; null means "not available"
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
        return _jsonable(value.item())
    return value


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to a temporary file in the same folder, fsync, then rename over ``path``:
    readers see the old file or the new one, never a half-written one."""
    from metrics.cache_files import atomic_write

    path = Path(path)
    try:
        atomic_write(path, lambda f: f.write(text.encode()))
    except OSError as err:
        raise ResultsWriteError(f"cannot write {path}: {err.strerror or err}. The previous file, if any, "
                                "is intact; check that the output folder is writable and has free space, "
                                "then re-run.") from err


def write_json(path: str | os.PathLike, data: dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(_jsonable(data), indent=2, sort_keys=False) + "\n")


def append_jsonl(path: str | os.PathLike, record: dict[str, Any]) -> None:
    """One JSON line per evaluation (StyleGAN's metric-*.jsonl); a line is written whole by one write()."""
    with open(path, "a") as f:
        f.write(json.dumps(_jsonable(record)) + "\n")


def read_results(path: str | os.PathLike) -> dict[str, Any]:
    """Load and check a results.json; raises ValueError naming the problem."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); the run may have been killed while writing") from err
    missing = [k for k in SCHEMA_KEYS if k not in data]
    if missing and data.get("status", "ok") == "ok":
        raise ValueError(f"{path} lacks keys {missing}")
    return data
