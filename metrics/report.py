"""The reviewer's benchmark table: runs (local results.json or W&B) -> mean ± 95% interval over seeds.

A run record is the results.json contract (metrics/results.py). Runs that failed or lack
metrics are listed separately, never averaged in. Figures from different feature extractors
never share a column: the primary extractor's metrics (``fid``...) form one block, each extra
extractor (``inception_pool/fid``...) its own.
"""
from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from metrics.intervals import CONFIDENCE, mean_std, t_half_width
from metrics.results import BPD_KINDS, RESULTS_FILE

# (key in results["metrics"], column title, higher is better)
FEATURE_COLUMNS = [("fid", "FID", False), ("fid_inf", "FID∞", False), ("sfid", "sFID", False), ("is", "IS", True),
                   ("kid", "KID", False),
                   ("precision", "Prec.", True), ("recall", "Rec.", True),
                   ("density", "Dens.", True), ("coverage", "Cov.", True), ("class_acc", "class acc.", True),
                   ("intra_fid", "intra-FID", False)]
OTHER_COLUMNS = [("bpd", "bits/dim", False), ("nfe", "NFE", False), ("classifier_nfe", "classifier NFE", False),
                 ("sec_per_sample", "s/sample", False)]
INFO_COLUMNS = [("num_params", "params"), ("train_steps", "steps"), ("train_flops", "budget (TFLOP)")]


@dataclass
class RunRecord:
    source: str                       # run dir or W&B run path
    results: dict[str, Any] | None    # the results.json contents (None if unreadable)
    problem: str | None = None        # why the run cannot enter the table

    @property
    def ok(self) -> bool:
        return self.problem is None


def _check(source: str, results: dict | None) -> RunRecord:
    if results is None:
        return RunRecord(source, None, "no results.json")
    if results.get("status", "ok") != "ok":
        return RunRecord(source, results, f"failed: {results.get('error', results.get('status'))}")
    metrics = results.get("metrics") or {}
    finite = [k for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(v)]
    if not finite or not any(k in metrics for k, _, _ in FEATURE_COLUMNS + OTHER_COLUMNS):
        return RunRecord(source, results, "no evaluation metrics")
    bad = [k for k, v in metrics.items() if v is None or (isinstance(v, float) and not math.isfinite(v))]
    if bad:
        return RunRecord(source, results, f"non-finite metrics {bad}")
    return RunRecord(source, results)


def collect_local(paths: Iterable[str | Path]) -> list[RunRecord]:
    """results.json files, run directories, or sweep directories (searched recursively). A job
    directory with a Hydra config but no results.json is reported as failed."""
    records: list[RunRecord] = []
    seen: set[Path] = set()
    for path in map(Path, paths):
        if path.is_file():
            candidates = [path]
        elif path.is_dir():
            candidates = sorted(path.rglob(RESULTS_FILE))
            job_dirs = {p.parent.parent for p in path.rglob(".hydra/config.yaml")}
            candidates += [d / RESULTS_FILE for d in sorted(job_dirs) if not (d / RESULTS_FILE).exists()]
        else:
            records.append(RunRecord(str(path), None, "path does not exist"))
            continue
        for file in candidates:
            if file in seen or "wandb" in file.parts:
                continue
            seen.add(file)
            try:
                results = json.loads(file.read_text()) if file.exists() else None
            except (OSError, json.JSONDecodeError) as err:
                records.append(RunRecord(str(file.parent), None, f"unreadable results.json ({err})"))
                continue
            records.append(_check(str(file.parent), results))
    return records


def record_from_wandb_run(run) -> RunRecord:
    """A W&B run (public API object, or anything with .path/.state/.summary/.config) -> record.
    train.py puts the results.json keys (minus the config) into the run summary."""
    summary = dict(getattr(run, "summary", {}) or {})
    source = "/".join(run.path) if isinstance(getattr(run, "path", None), (list, tuple)) else str(getattr(run, "path", run))
    state = getattr(run, "state", "finished")
    if "model" not in summary or "metrics" not in summary:
        return RunRecord(source, None, f"no genbench results in the W&B summary (state {state})")
    results = {k: summary[k] for k in summary if not k.startswith("_")}
    results.setdefault("config", dict(getattr(run, "config", {}) or {}))
    if state not in ("finished", "running"):
        results.setdefault("status", state)
    return _check(source, results)


def collect_wandb(project: str, entity: str | None = None, group: str | None = None,
                  tags: Sequence[str] = (), api=None) -> list[RunRecord]:
    """Runs of a W&B project through the public API, filtered by group and tags."""
    if api is None:
        import wandb
        api = wandb.Api()
    filters: dict[str, Any] = {}
    if group:
        filters["group"] = group
    if tags:
        filters["tags"] = {"$in": list(tags)}
    path = f"{entity}/{project}" if entity else project
    return [record_from_wandb_run(run) for run in api.runs(path, filters=filters)]


# ----------------------------------------------------------------------------- aggregation

#: what changes the meaning of a number: runs that differ in any of these never share a row
ROW_KEYS = ("dataset", "image_size", "conditioning", "sampler", "num_samples", "reference", "feature_extractor")


@dataclass
class Cell:
    mean: float
    std: float
    n: int
    best: bool = False
    half_width: float = 0.0     # of the 95% interval: over seeds (Student t), or over sample sets
    sampling: bool = False      # the interval is over repeated sample sets of one run

    def text(self, digits: int | str) -> str:
        fmt = f".{digits}f" if isinstance(digits, int) else digits
        if self.half_width > 0:
            return f"{self.mean:{fmt}} ± {self.half_width:{fmt}}" + ("†" if self.sampling else "")
        return f"{self.mean:{fmt}}"


@dataclass
class Table:
    group_by: list[str]
    columns: list[tuple[str, str, bool | None]]       # (key, title, higher_is_better or None)
    rows: list[dict[str, Any]]                         # group values + Cell per column key
    caption: str
    failed: list[RunRecord] = field(default_factory=list)


def _group_value(results: dict, key: str):
    if key in results:
        return results[key]
    node: Any = results.get("config", {})
    for part in key.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def sampler_text(sampler: dict | None) -> str:
    """{"name": "ddim", "steps": 50, "eta": 1.0} -> "ddim-50 eta=1"; {} -> "-" (one-shot samplers)."""
    if not sampler:
        return "-"
    shown = {k: v for k, v in sampler.items() if k not in ("name", "steps") and v is not None}
    for scale in ("guidance_scale", "classifier_scale"):   # unguided: nothing to say
        if not shown.get(scale):
            shown.pop(scale, None)
    if shown.get("classifier_ckpt"):  # the classifier's run (its dir), not the whole path
        path = Path(str(shown["classifier_ckpt"]))
        shown["classifier_ckpt"] = path.parent.parent.name if path.parent.name == "checkpoints" else path.name
    rest = " ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(shown.items()))
    head = f"{sampler.get('name', '')}" + (f"-{sampler['steps']}" if sampler.get("steps") else "")
    return (head + " " + rest).strip()


def comparability(results: dict) -> dict[str, str]:
    """The ROW_KEYS of one run, as text."""
    extractor = results.get("feature_extractor")
    ref = (((results.get("details") or {}).get("extractors") or {}).get(extractor) or {}).get("reference") or {}
    classes = _group_value(results, "model.num_classes")
    return {"dataset": str(results.get("dataset")), "image_size": str(_group_value(results, "datamodule.image_size")),
            "conditioning": "class-conditional" if classes else "unconditional",
            "sampler": sampler_text(results.get("sampler")), "num_samples": str(results.get("num_samples")),
            "reference": f"{ref.get('split', '?')}:{ref.get('num_images', '?')}", "feature_extractor": str(extractor)}


def run_filter_keys(results: dict) -> dict:
    """The flat run config W&B panels filter and group on (metrics/dashboard.py): the family, the
    table's row keys, the guidance scales (0 = unguided) and the seed."""
    sampler = results.get("sampler") or {}
    return {"family": results.get("model"), **comparability(results),
            "num_classes": _group_value(results, "model.num_classes"),
            "guidance_scale": float(sampler.get("guidance_scale") or 0.0),
            "classifier_scale": float(sampler.get("classifier_scale") or 0.0), "seed": results.get("seed")}


class IncomparableRunsError(ValueError):
    """Runs asked to share a row differ in a setting that changes what their numbers mean."""


def build_table(records: Sequence[RunRecord], group_by: Sequence[str] = ("model",), mixed: str = "split") -> Table:
    """Rows of comparable runs. ``group_by`` names the row (results or dotted config keys); runs of
    one row must also agree on every ROW_KEY: with ``mixed="split"`` the keys that differ between
    runs become part of the row (a column each), with ``mixed="refuse"`` a row mixing them raises
    :class:`IncomparableRunsError` naming the differing key and values."""
    if mixed not in ("split", "refuse"):
        raise ValueError(f"mixed must be 'split' or 'refuse', got {mixed!r}")
    ok = [r for r in records if r.ok]
    failed = [r for r in records if not r.ok]
    extractors = sorted({r.results.get("feature_extractor") for r in ok if r.results.get("feature_extractor")})
    if len(extractors) > 1:
        raise IncomparableRunsError(
            f"runs use different primary feature extractors {extractors}; their figures are not comparable: "
            "build one table per extractor (pass only those runs)")
    keys = {id(r): comparability(r.results) for r in ok}
    varying = [k for k in ROW_KEYS if len({keys[id(r)][k] for r in ok}) > 1]
    if mixed == "refuse":
        by_group: dict[tuple, list[RunRecord]] = {}
        for r in ok:
            by_group.setdefault(tuple(_group_value(r.results, k) for k in group_by), []).append(r)
        for gkey, members in by_group.items():
            for k in varying:
                values = sorted({keys[id(m)][k] for m in members})
                if len(values) > 1:
                    raise IncomparableRunsError(
                        f"the runs of row {dict(zip(group_by, gkey))} differ in {k}: {values}; their numbers are "
                        f"not comparable. Add {k} to the row (mixed='split', the default) or pass only comparable runs")
        varying = []
    row_keys = list(group_by) + varying
    extra = sorted({k.split("/")[0] for r in ok for k in r.results["metrics"] if "/" in k})
    columns: list[tuple[str, str, bool | None]] = []
    present = {k for r in ok for k in r.results["metrics"]}
    primary = extractors[0] if extractors else None
    for key, title, hib in FEATURE_COLUMNS:
        if key in present:
            columns.append((key, f"{title} [{primary}]", hib))
    for name in extra:
        for key, title, hib in FEATURE_COLUMNS:
            if f"{name}/{key}" in present:
                columns.append((f"{name}/{key}", f"{title} [{name}]", hib))
    for key, title, hib in OTHER_COLUMNS:
        if key in present:
            columns.append((key, title, hib))
    columns += [(key, title, None) for key, title in INFO_COLUMNS]

    def row_value(r: RunRecord, k: str):
        return keys[id(r)][k] if k in ROW_KEYS and k not in group_by else _group_value(r.results, k)

    groups: dict[tuple, list[dict]] = {}
    for r in ok:
        groups.setdefault(tuple(row_value(r, k) for k in row_keys), []).append(r.results)
    rows = []
    for gkey, members in sorted(groups.items(), key=lambda kv: [str(v) for v in kv[0]]):
        row: dict[str, Any] = dict(zip(row_keys, gkey))
        row["seeds"] = sorted(m.get("seed") for m in members)
        kinds = {BPD_KINDS.get(m.get("likelihood_kind")) for m in members}
        row["bpd_kind"] = kinds.pop() if len(kinds) == 1 else None
        for key, _, _ in columns:
            vals = [float(m["metrics"][key]) if key in m.get("metrics", {}) else m.get(key) for m in members]
            vals = [v for v in vals if isinstance(v, (int, float))]
            if vals:
                mean, std = mean_std(vals)
                cell = Cell(mean, std, len(vals), half_width=t_half_width(std, len(vals)))
                sampling_ci = [m["metrics"].get(f"{key}_ci95") for m in members if key in m.get("metrics", {})]
                if len(vals) == 1 and sampling_ci and isinstance(sampling_ci[0], (int, float)):
                    cell.half_width, cell.sampling = float(sampling_ci[0]), True
                row[key] = cell
        rows.append(row)
    for key, _, hib in columns:
        if hib is None:
            continue
        cells = [row[key] for row in rows if key in row]
        if len(cells) > 1:
            target = (max if hib else min)(c.mean for c in cells)
            for c in cells:
                c.best = math.isclose(c.mean, target, rel_tol=1e-9, abs_tol=1e-12)  # ties share it
    constant = {k: keys[id(ok[0])][k] for k in ROW_KEYS if k not in row_keys} if ok else {}
    seeds = sorted({len(row["seeds"]) for row in rows})
    caption = (f"Mean ± half-width of the {CONFIDENCE:.0%} confidence interval over {'/'.join(map(str, seeds))} "
               "seed(s) (Student t, n - 1 degrees of freedom; † = over repeated sample sets of one run). "
               + ("Same in every row: " + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in constant.items()) + ". "
                  if constant else "")
               + f"Feature metrics from {primary or 'no extractor'}"
               + (f" and {', '.join(extra)} (final evaluation)" if extra else "")
               + ". fid_inf: FID extrapolated to infinitely many samples (Chong & Forsyth 2020). bits/dim on test "
               "images (dequantized = the flow's exact density of dequantized data, a bound on the 8-bit likelihood; "
               "bound = ELBO/IWAE/variational bound; ODE = the density of dequantized data from a continuous flow's "
               "ODE, also a bound). Best per column in bold.")
    return Table(row_keys, columns, rows, caption, failed)


# ----------------------------------------------------------------------------- rendering

def _digits(key: str) -> int | str:
    base = key.split("/")[-1]
    return {"fid": 2, "fid_inf": 2, "sfid": 2, "is": 2, "kid": 3, "bpd": 3, "nfe": 0, "classifier_nfe": 0, "sec_per_sample": ".1e",
            "num_params": 0, "train_steps": 0}.get(base, 3)


def _fmt(row: dict, key: str, bold: tuple[str, str]) -> str:
    cell = row.get(key)
    if cell is None:
        return "–"
    if key == "num_params":
        return f"{cell.mean / 1e6:.2f}M"
    if key == "train_flops":
        return f"{cell.mean / 1e12:.3g}"
    text = cell.text(_digits(key))
    if key == "bpd" and row.get("bpd_kind"):
        text += f" ({row['bpd_kind']})"
    return f"{bold[0]}{text}{bold[1]}" if cell.best else text


def to_markdown(table: Table, columns: Sequence[str] | None = None) -> str:
    """The table as Markdown; ``columns``: only these metric keys (in this order), e.g. a headline."""
    shown = table.columns if columns is None else \
        [c for key in columns for c in table.columns if c[0] == key]
    head = table.group_by + ["seeds"] + [title for _, title, _ in shown]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in table.rows:
        vals = [str(row[k]) for k in table.group_by] + [str(len(row["seeds"]))]
        vals += [_fmt(row, key, ("**", "**")) for key, _, _ in shown]
        lines.append("| " + " | ".join(vals) + " |")
    out = "\n".join(lines) + f"\n\n{table.caption}\n"
    if table.failed:
        out += "\nFailed or incomplete runs (not averaged in):\n" + "".join(
            f"- `{r.source}`: {r.problem}\n" for r in table.failed)
    return out


def _latex_escape(text: str) -> str:
    for a, b in [("\\", r"\textbackslash{}"), ("_", r"\_"), ("%", r"\%"), ("&", r"\&"), ("#", r"\#"),
                 ("±", r"$\pm$")]:
        text = text.replace(a, b)
    return text


def to_latex(table: Table) -> str:
    head = table.group_by + ["seeds"] + [title for _, title, _ in table.columns]
    lines = [r"\begin{table}[t]", r"\centering", r"\small",
             r"\begin{tabular}{" + "l" * (len(table.group_by) + 1) + "r" * len(table.columns) + "}", r"\toprule",
             " & ".join(_latex_escape(h) for h in head) + r" \\", r"\midrule"]
    for row in table.rows:
        vals = [_latex_escape(str(row[k])) for k in table.group_by] + [str(len(row["seeds"]))]
        vals += [_latex_escape(_fmt(row, key, ("\x00", "\x01"))).replace("\x00", r"\textbf{").replace("\x01", "}")
                 for key, _, _ in table.columns]
        lines.append(" & ".join(vals) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", r"\caption{" + _latex_escape(table.caption) + "}", r"\end{table}"]
    return "\n".join(lines) + "\n"


def to_csv(table: Table) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf)
    header = table.group_by + ["seeds"]
    for key, _, _ in table.columns:
        header += [f"{key}_mean", f"{key}_std", f"{key}_ci95", f"{key}_best"]
    writer.writerow(header)
    for row in table.rows:
        vals = [row[k] for k in table.group_by] + [" ".join(map(str, row["seeds"]))]
        for key, _, _ in table.columns:
            cell = row.get(key)
            vals += ["", "", "", ""] if cell is None else [repr(cell.mean), repr(cell.std), repr(cell.half_width),
                                                           int(cell.best)]
        writer.writerow(vals)
    for r in table.failed:
        writer.writerow([f"FAILED {r.source}: {r.problem}"])
    return buf.getvalue()


def to_wandb_table(table: Table):
    import wandb
    columns = table.group_by + ["seeds"] + [title for _, title, _ in table.columns]
    data = [[str(row[k]) for k in table.group_by] + [len(row["seeds"])]
            + [_fmt(row, key, ("", "")) for key, _, _ in table.columns] for row in table.rows]
    return wandb.Table(columns=columns, data=data)


def write_table(table: Table, out_dir: str | Path, stem: str = "table") -> dict[str, Path]:
    from metrics.results import atomic_write_text
    out = Path(out_dir)
    paths = {"md": out / f"{stem}.md", "tex": out / f"{stem}.tex", "csv": out / f"{stem}.csv"}
    atomic_write_text(paths["md"], to_markdown(table))
    atomic_write_text(paths["tex"], to_latex(table))
    atomic_write_text(paths["csv"], to_csv(table))
    return paths
