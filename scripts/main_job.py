"""The main job: the four families x seeds on digits at one matched training budget (equal FLOPs),
unconditional and class-conditional, one shared evaluation, guidance, then tables and plots.

    python scripts/main_job.py                      # what `make main` runs (offline, CPU, 2 cores)
    python scripts/main_job.py --seeds 0 1 2 3 4 --out logs/main/mine
    python scripts/main_job.py --dataset mnist      # `make main-mnist`: experiment=mnist_<family>, unconditional

Steps:
  1. the classifier extractor is trained and the real-image statistics cached (once), while the
     noise-aware classifier of classifier guidance trains beside it;
  2. one real Hydra multirun of scripts/train.py over experiment=digits_matched_<family> x
     conditioning=none,class (class-conditional: every family conditions on the labels; the
     families with a null class train it by label dropout and sample with classifier-free
     guidance, conf/conditioning/class.yaml) x seeds, two single-threaded jobs side by side, every
     run an ordinary run dir; classifier features at every evaluation, the standard Inception
     (inception_pool) in every final evaluation;
  3. two at a time, by what each family declares (models/registry.py): each conditional run of a
     family with classifier guidance evaluated with it (the DDPM); the guidance sweeps of each
     kind a family declares on its seed-0 conditional run; FID against NFE of each family's
     seed-0 unconditional run, with the samplers it declares at 10, 20 and 50 NFE;
  4. make_table for each part (Markdown, LaTeX, CSV) and the plots (PNG + PDF).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from datetime import datetime
from multiprocessing import get_context
from pathlib import Path
from typing import Callable

from metrics.curves import compute_curves, crossover, crossover_text
from metrics.plots import (final_grid, plot_fid_vs_compute, plot_fid_vs_nfe, plot_fid_vs_step, plot_precision_recall,
                           plot_sample_grids)
from metrics.report import build_table, collect_local, sampler_text, to_markdown, write_table
from models.configs import compose
from scripts.overview import clock, watch

ROOT = Path(__file__).resolve().parents[1]


def main_job_families() -> list[str]:
    """The registered families the main job trains by default (their ``in_main_job``; others join
    with --families), the GAN first: it trains longest, and the two workers then finish together."""
    from models.registry import families

    names = [name for name, cls in families().items() if cls.in_main_job]
    return sorted(names, key=lambda name: name != "gan")


#: the two parts of the comparison: every family at the same training budget with the same
#: milestones (conf/budget/main.yaml, which conf/experiment/digits_matched_*.yaml use),
#: unconditional and class-conditional. A part: (the experiment per family, "{}" = the family, or
#: one shared experiment swept over model=...; its conditioning, conf/conditioning/)
PARTS = {"unconditional": ("digits_matched_{}", "none"), "conditional": ("digits_matched_{}", "class")}


def as_part(part) -> tuple[str, str]:
    """A part as (experiment, conditioning); a bare experiment is unconditional."""
    return (part, "none") if isinstance(part, str) else (part[0], part[1])


def part_overrides(part, family: str) -> list[str]:
    """The overrides of ``family``'s run in ``part``."""
    preset, conditioning = as_part(part)
    return ([f"experiment={preset.format(family)}"] if "{}" in preset else [f"experiment={preset}", f"model={family}"]) \
        + [f"conditioning={conditioning}"]
CLASSIFIER_PRESET = "digits_noisy_classifier"
#: the main job's extra overrides that also apply to the noise-aware classifier
CLASSIFIER_OVERRIDES = ("paths.", "logger", "trainer.max_steps")
#: classifier guidance of the conditional DDPMs' table row (ADM's scale for conditional models)
CLASSIFIER_SCALE = 1.0
#: the guidance sweeps on the seed-0 conditional DDPM (Dhariwal & Nichol 2021 Table 4 / Figure 4 shape)
SWEEPS = {"classifier_free": [0.0, 0.5, 1.0, 2.0, 4.0], "classifier": [0.0, 1.0, 2.0, 4.0, 8.0]}
#: the sweeps' sampler: the family's first at 10 NFE (the DDPM's DDIM-10 eta 1: samplers_at_nfe)
#: keeps 2 x 5 scales x 3 sample sets inside the CPU budget
SWEEP_NFE = 10
SWEEP_REPEATS = 3
SWEEP_SAMPLES = 1000
#: what the main job runs per dataset (--dataset): its parts, the overrides of every run, the config
#: its caches are built with, and whether the guidance stage and the FID-vs-NFE curve follow
DATASETS = {
    # 300 real images as the reference of every extractor: the Inception pass is slow on a CPU
    "digits": {"parts": PARTS, "overrides": ["evaluation.reference.num_images=300"], "caches": [],
               "guidance": True, "nfe": True},
    # the 28x28 benchmark: unconditional, N = 2000 against the 10k test set (conf/evaluation/mnist.yaml)
    "mnist": {"parts": {"unconditional": ("mnist_{}", "none")}, "overrides": [], "caches": ["datamodule=mnist", "evaluation=mnist"],
              "guidance": False, "nfe": False},
}
#: the FID-against-NFE curve's points: each sampler a family declares at these NFE (samplers_at_nfe)
NFE_POINTS = (10, 20, 50)
#: the question of the paper the crossover answers: where the first's interval drops below the second's
CROSSOVER = ("ddpm", "gan")


def nfe_samplers(family: str, nfes=NFE_POINTS) -> list[tuple[str, str, dict]]:
    """(curve, point label, sampler) of ``family``'s FID-against-NFE curve."""
    from models.registry import family_class

    return [(curve, f"{curve} @ {nfe}", sampler) for nfe in nfes
            for curve, sampler in family_class(family).samplers_at_nfe(nfe).items()]


def stage(name: str, started: float) -> None:
    print(f"[{clock(time.perf_counter() - started)}] {name}", flush=True)


def wandb_group(out: Path) -> str:
    """The W&B group of one main job (its runs' task_name): scripts/wandb_dashboard.py --group."""
    return f"main_{out.name}"


def multirun(out: Path, sweep: list[str], seeds: list[int], extra: list[str], log: Path, jobs: int,
             total: int, started: float) -> None:
    """One Hydra multirun; ``jobs`` > 1 runs that many single-threaded jobs side by side (joblib).
    Its output goes to ``log`` (each job also logs to its own run dir); the terminal shows the
    sweep's live overview."""
    parallel = ["hydra/launcher=joblib", f"hydra.launcher.n_jobs={jobs}", "num_threads=1"] if jobs > 1 else []
    cmd = [sys.executable, "scripts/train.py", "-m", *sweep, f"seed={','.join(map(str, seeds))}",
           f"hydra.sweep.dir={out / 'runs'}",
           "hydra.sweep.subdir=${hydra:runtime.choices.experiment}_${hydra:runtime.choices.model}"
           "_${hydra:runtime.choices.conditioning}_seed${seed}",
           "callbacks.progress_bar=null", f"task_name={wandb_group(out)}", *parallel, *extra]
    print("+", " ".join(cmd), flush=True)
    print(f"  jobs log to {log} and to their run directories under {out / 'runs'}", flush=True)
    with open(log, "a") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        code = watch(proc, out / "runs", total, "training sweep", started)
    if code != 0:
        print(f"  (exit {code}; failed jobs are listed in the table; log: {log})", flush=True)


def prepare_caches(extractors: list[str], overrides: list[str]) -> None:
    """Train the classifier and compute the real-image statistics once, before jobs run in parallel
    (otherwise two jobs would compute the same Inception reference at the same time)."""
    import hydra

    from metrics.features import build_feature_metrics

    cfg = compose("train", [o for o in overrides if o.startswith(("paths.", "datamodule", "evaluation"))], Path("unused"))
    datamodule = hydra.utils.instantiate(cfg.datamodule)
    datamodule.prepare_data()  # fetch the dataset once (offline sources too) before any job reads it
    for name in extractors:
        build_feature_metrics(name, datamodule, cfg.paths.cache_dir, cfg.evaluation.reference.split,
                              cfg.evaluation.reference.num_images, "auto", "cpu")



def eval_config(ckpt: Path, out_dir: Path, overrides: list[str], extra: list[str], config_name: str = "eval",
                group: str | None = None):
    """scripts/evaluate.py's config for ``ckpt`` (plus the main job's paths and reference); with
    ``group``, the evaluation is also a W&B run of that group (the dashboard's guidance panels)."""
    return compose(config_name, [
        f"ckpt_path={ckpt}", *overrides, *[o for o in extra if o.startswith(("paths.", "evaluation.reference"))],
        *([f"wandb.enabled={not any(o == 'logger=csv' or o == 'logger=none' for o in extra)}",
           f"wandb.group={group}"] if group else [])], out_dir)


def sampler_overrides(sampler: dict) -> list[str]:
    return [f"sampler.{k}={'null' if v is None else v}" for k, v in sampler.items()]


def fid_vs_nfe(run: Path, out: Path, num_samples: int, extra: list[str], family: str, seed: int = 0) -> list[dict]:
    """The DDIM paper's Table 1 shape on one checkpoint: each sampler ``family`` declares at each
    of NFE_POINTS (samplers_at_nfe), evaluated with scripts/evaluate.py's evaluate(); written to
    ``out/fid_vs_nfe/<family>_seed<seed>.json`` (read back when the job runs again in its folder)."""
    from scripts.evaluate import evaluate

    written = out / "fid_vs_nfe" / f"{family}_seed{seed}.json"
    expected = [label for _, label, _ in nfe_samplers(family)]
    if written.is_file():
        done = json.loads(written.read_text())
        if [p["label"] for p in done] == [f"{family} {label}" for label in expected] and \
                all(p["num_samples"] == num_samples for p in done):
            return done
    points = []
    for curve, label, sampler in nfe_samplers(family):
        slug = label.replace(" @ ", "-").replace(" ", "_").replace("(", "").replace(")", "").replace("=", "")
        cfg = eval_config(run / "checkpoints" / "last.ckpt", out / "fid_vs_nfe" / family / f"seed{seed}" / slug,
                          [f"evaluation.num_samples={num_samples}", "evaluation.bpd_num_images=0",
                           "evaluation.grid_size=0", *sampler_overrides(sampler)], extra)
        r = evaluate(cfg)
        points.append({"family": family, "seed": seed, "label": f"{family} {label}", "curve": f"{family}: {curve}",
                       "nfe": r["metrics"]["nfe"], "fid": r["metrics"]["fid"], "sampler": sampler,
                       "extractor": r["feature_extractor"], "num_samples": num_samples,
                       "sec_per_sample": r["metrics"]["sec_per_sample"]})
        print(f"  {family} {label}: NFE {points[-1]['nfe']:.0f}, FID {points[-1]['fid']:.2f} "
              f"[{points[-1]['extractor']}]", flush=True)
    written.parent.mkdir(parents=True, exist_ok=True)
    written.write_text(json.dumps(points, indent=2))
    return points


def fid_vs_nfe_markdown(points: list[dict]) -> str:
    """Per family and sampler, FID at each NFE: mean ± 95% Student-t interval over the seeds."""
    from metrics.intervals import interval_text

    nfes = sorted({p["label"].rsplit(" @ ", 1)[1] for p in points}, key=int)
    curves = list(dict.fromkeys(p["curve"] for p in points))
    lines = ["| family: sampler | " + " | ".join(f"FID @ {n} NFE" for n in nfes) + " | seeds |",
             "|---|" + "---|" * (len(nfes) + 1)]
    for curve in curves:
        cells, seeds = [], set()
        for nfe in nfes:
            values = [p["fid"] for p in points if p["curve"] == curve and p["label"].endswith(f" @ {nfe}")]
            seeds |= {p.get("seed") for p in points if p["curve"] == curve}
            cells.append(interval_text(values) if values else "")
        lines.append(f"| {curve} | " + " | ".join(cells) + f" | {len(seeds)} |")
    extractor = points[0].get("extractor", "") if points else ""
    lines.append(f"\nFID [{extractor}] of N = {points[0]['num_samples'] if points else 0} samples per point; "
                 "mean ± 95% Student-t interval over the seeds' checkpoints (NFE as counted: network calls per sample).")
    return "\n".join(lines) + "\n"


def classifier_guided(ddpm_run: Path, classifier_ckpt: Path, out_dir: Path, sampler: dict, num_samples: int,
                      extra: list[str], final_extractors: list[str], group: str | None = None) -> dict:
    """A conditional DDPM evaluated with classifier guidance: an ordinary results.json (a table row)."""
    from scripts.evaluate import evaluate

    overrides = [*sampler_overrides({**sampler, "classifier_ckpt": classifier_ckpt,
                                     "classifier_scale": CLASSIFIER_SCALE, "guidance_scale": 0.0}),
                 f"evaluation.num_samples={num_samples}",
                 "evaluation.bpd_num_images=0", f"evaluation.final_extractors=[{','.join(final_extractors)}]"]
    summary = evaluate(eval_config(ddpm_run / "checkpoints" / "last.ckpt", out_dir, overrides, extra, group=group))
    trained = json.loads((ddpm_run / "results.json").read_text())
    record = classifier_record(classifier_ckpt)
    summary.update(guided_budget(trained, record))
    from metrics.results import RESULTS_FILE, write_json
    write_json(out_dir / RESULTS_FILE, summary)
    return summary


def guided_budget(ddpm: dict, classifier: dict | None) -> dict:
    """A classifier-guided row's training budget and size: the DDPM's (the same trained model) plus
    the noise-aware classifier's, which the row needs as much as the DDPM."""
    budget = {k: ddpm[k] for k in ("flops_per_image", "train_images", "train_flops", "num_params") if k in ddpm}
    if classifier is None:
        return budget
    budget["train_flops"] = float(budget.get("train_flops") or 0.0) + float(classifier.get("train_flops") or 0.0)
    budget["num_params"] = int(budget.get("num_params") or 0) + int(classifier.get("num_params") or 0)
    budget["classifier"] = {k: classifier.get(k) for k in ("train_flops", "num_params")}
    return budget


def classifier_record(classifier_ckpt: Path) -> dict | None:
    """The noise-aware classifier's results (parameters, training FLOPs) kept beside its cache entry."""
    path = Path(classifier_ckpt).with_suffix(".json")
    return json.loads(path.read_text()) if path.is_file() else None


def sweep(run: Path, guidance: str, out_dir: Path, num_samples: int, extra: list[str],
          classifier_ckpt: Path | None, group: str | None = None, family: str = "ddpm") -> list:
    """The guidance sweep (scripts/guidance_sweep.py) of one conditional run at SWEEP_NFE."""
    from scripts.guidance_sweep import guidance_sweep

    _, _, sampler = nfe_samplers(family, (SWEEP_NFE,))[0]
    overrides = [f"guidance={guidance}", f"scales=[{','.join(map(str, SWEEPS[guidance]))}]",
                 f"evaluation.repeats={SWEEP_REPEATS}", f"evaluation.num_samples={num_samples}",
                 *sampler_overrides(sampler)]
    if classifier_ckpt is not None:
        overrides.append(f"sampler.classifier_ckpt={classifier_ckpt}")
    return guidance_sweep(eval_config(run / "checkpoints" / "last.ckpt", out_dir, overrides, extra,
                                      config_name="guidance_sweep", group=group))


def _single_threaded(fn, *args):
    """Run ``fn`` in a worker process on one thread (two workers share the two cores)."""
    import torch

    torch.set_num_threads(1)
    return fn(*args)


def run_parallel(tasks: list[tuple], jobs: int, keep_going: bool = False) -> list:
    """(fn, *args) tasks on ``jobs`` worker processes (spawned: clean torch and Hydra state), in order.
    With ``keep_going`` a failed task's result is its exception and the others still run."""
    def outcome(call):
        if not keep_going:
            return call()
        try:
            return call()
        except Exception as err:  # noqa: BLE001  (the caller reports it)
            return err
    if jobs <= 1:
        return [outcome(lambda fn=fn, args=args: fn(*args)) for fn, *args in tasks]
    with ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("spawn")) as pool:
        futures = [pool.submit(_single_threaded, fn, *args) for fn, *args in tasks]
        return [outcome(f.result) for f in futures]


def cached_noisy_classifier(out: Path, extra: list[str]) -> Path:
    """The noise-aware classifier's checkpoint, an entry of the shared cache
    (``<cache_dir>/noisy_classifiers/<preset>-<key>.ckpt``, key = hash of its composed model, data,
    trainer and seed). When absent it is trained once by scripts/train.py (one seed, in
    ``out/<key>``), however many jobs ask for it at the same time (metrics/cache_files.py)."""
    import hashlib

    from omegaconf import OmegaConf

    from metrics.cache_files import atomic_write, load_or_build
    from models.checkpoints import CheckpointError, read_checkpoint

    overrides = [f"experiment={CLASSIFIER_PRESET}", *[o for o in extra if o.startswith(CLASSIFIER_OVERRIDES)]]
    # the key is composed with a fixed run dir: where a job writes is no part of what is trained
    cfg = compose("train", overrides, Path("run"))
    spec = {key: OmegaConf.to_container(cfg[key], resolve=True) for key in ("model", "datamodule", "trainer")}
    spec["seed"] = int(cfg.seed)
    spec["datamodule"].pop("data_dir", None)
    key = hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:16]
    entry = Path(cfg.paths.cache_dir) / "noisy_classifiers" / f"{CLASSIFIER_PRESET}-{key}.ckpt"

    def load(path: Path) -> Path:
        try:
            read_checkpoint(path)
        except CheckpointError as err:
            raise ValueError(str(err)) from err
        return path

    def build() -> Path:
        # its run dir is named by the key: a run dir of another configuration (say an earlier
        # schedule) is never resumed into this entry; an interrupted one of this key is
        run = out / key
        cmd = [sys.executable, "scripts/train.py", *overrides, f"hydra.run.dir={run}", "callbacks.progress_bar=null",
               "num_threads=1", f"task_name={wandb_group(out.parent)}"]
        run.mkdir(parents=True, exist_ok=True)
        with open(out.parent / "classifier.log", "a") as log:
            code = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                  env={**os.environ, "PYTHONUNBUFFERED": "1"}).returncode
        trained = run / "checkpoints" / "last.ckpt"
        if code != 0 or not trained.is_file():
            raise RuntimeError(f"training the noise-aware classifier failed (exit {code}; log: {out.parent / 'classifier.log'})")
        return trained

    def save(path: Path, trained: Path) -> None:
        # its size and training budget first (guided rows add them: guided_budget), then the entry
        results = json.loads((trained.parent.parent / "results.json").read_text())
        record = {k: results.get(k) for k in ("num_params", "train_flops", "train_steps")}
        atomic_write(path.with_suffix(".json"), lambda f: f.write(json.dumps(record).encode()))
        atomic_write(path, lambda f: f.write(trained.read_bytes()))

    load_or_build(entry, load, build, save, "noise-aware classifier")
    return entry


def noisy_classifier_in_background(out: Path, extra: list[str]) -> Callable[[], Path | None]:
    """Start :func:`cached_noisy_classifier` beside the other caches; the returned function waits
    for it and gives its checkpoint, or None (with the reason printed) if it failed."""
    result: dict = {}

    def work() -> None:
        try:
            result["ckpt"] = cached_noisy_classifier(out, extra)
        except Exception as err:  # the job goes on without classifier guidance
            result["error"] = err

    thread = threading.Thread(target=work, daemon=True)
    thread.start()

    def wait() -> Path | None:
        thread.join()
        if "error" in result:
            print(f"  the noise-aware classifier failed ({result['error']}); no classifier guidance", flush=True)
        return result.get("ckpt")
    return wait


def guidance_label(results: dict) -> str:
    """The family and how it is guided, e.g. "ddpm, guidance_scale=1" (a plot legend)."""
    text = sampler_text(results.get("sampler"))
    guided = [part for part in text.split() if part.startswith(("guidance_scale", "classifier_scale"))]
    return ", ".join([results["model"], *guided])


def grid_title(results: dict) -> str:
    """A sample grid's panel title: the run's label and its FID (the grid sits beside its number)."""
    fid = results.get("metrics", {}).get("fid")
    score = "" if fid is None else f"\nFID {fid:.1f} [{results.get('feature_extractor', '')}], seed {results.get('seed')}"
    return guidance_label(results) + score


def write_part(name: str, records: list, out: Path, seeds: list[int]) -> dict:
    """One part's table (table_<part>.{md,tex,csv}) and plots (plots/<part>_*.png|pdf)."""
    table = build_table(records)
    files = write_table(table, out, stem=f"table_{name}")
    plots = out / "plots"
    plot_fid_vs_step(records, plots / f"{name}_fid_vs_step")
    curves = compute_curves([r for r in records if not _guided(r)])
    extractor = next((r.results.get("feature_extractor") for r in records if r.ok), "")
    plot_fid_vs_compute(curves, plots / f"{name}_fid_vs_compute", f"FID [{extractor}]",
                        title=f"{name}: FID against training compute")
    plot_precision_recall(records, plots / f"{name}_precision_recall", label=guidance_label)
    grids = {grid_title(r.results): final_grid(r) for r in records if r.ok and r.results["seed"] == seeds[0]}
    plot_sample_grids({k: v for k, v in grids.items() if v is not None}, plots / f"{name}_samples")
    result = {"table": table, "files": {k: str(v) for k, v in files.items()},
              "curves": {family: [vars(p) for p in curve] for family, curve in curves.items()}}
    if set(CROSSOVER) <= set(curves):
        result["crossover"] = crossover(curves, *CROSSOVER)
        result["crossover"]["text"] = crossover_text(result["crossover"], f"FID [{extractor}]")
    return result


def _guided(record) -> bool:
    """A classifier-guided evaluation of a trained run (it has no training curve of its own)."""
    return "classifier" in (record.results or {})  # guided_budget() adds the classifier's share


def run_main_job(out: Path, seeds: list[int], families=None, parts: dict[str, str] | None = None,
                 extra: list[str] = (), nfe_samples: int = 128, jobs: int = 2, guidance: bool = True,
                 sweep_samples: int = SWEEP_SAMPLES, dataset: str = "digits", nfe_all_seeds: bool = False) -> dict:
    """``parts``: {part name: experiment per family ("{}" = family), or one shared experiment swept
    over model=... (e.g. "smoke")}; default: the dataset's (DATASETS). ``guidance``: classifier
    guidance and the sweeps (step 3), where the dataset has them. ``nfe_all_seeds``: the FID-against-NFE
    points of every seed's checkpoint (intervals over seeds), not the first seed's only."""
    if dataset not in DATASETS:
        raise ValueError(f"unknown main-job dataset {dataset!r}; choose one of {sorted(DATASETS)}")
    profile = DATASETS[dataset]
    parts = {name: as_part(part) for name, part in (profile["parts"] if parts is None else parts).items()}
    presets = sorted({preset for preset, _ in parts.values()})
    if len(presets) != 1:   # one multirun: experiments x conditionings x seeds
        raise ValueError(f"the parts of one main job share their experiment; got {presets}")
    families = main_job_families() if families is None else list(families)
    nfe_samples = nfe_samples if profile["nfe"] else 0
    out.mkdir(parents=True, exist_ok=True)
    log = out / "main_job.log"
    start = time.perf_counter()
    extra = [*profile["overrides"], *extra]
    conditional = "conditional" in parts and guidance and profile["guidance"]
    stage("caches: the classifier extractor and the real-image statistics (once per cache dir)"
          + (", the noise-aware classifier beside them" if conditional else ""), start)
    classifier_job = noisy_classifier_in_background(out / "classifier", extra) if conditional else None
    prepare_caches(["classifier", "inception_pool"], [*profile["caches"], *extra])
    preset = presets[0]
    sweep_args = [f"experiment={','.join(preset.format(f) for f in families)}"] if "{}" in preset else \
        [f"experiment={preset}", f"model={','.join(families)}"]
    sweep_args.append(f"conditioning={','.join(dict.fromkeys(c for _, c in parts.values()))}")
    expected = len(families) * len(seeds) * len(parts)
    reused_training = False
    finished = [r for r in collect_local([out / "runs"]) if r.ok] if (out / "runs").is_dir() else []
    if len(finished) >= expected:   # a main job run again in its directory reuses its finished runs
        stage(f"training: all {expected} runs already finished in {out / 'runs'}; reusing them", start)
        reused_training = True
    else:
        multirun(out, sweep_args, seeds, extra, log, jobs, expected, start)
    records = collect_local([out / "runs"])
    by_part = {name: [r for r in records if _part_of(r, preset, families)] for name, preset in parts.items()}
    summary: dict = {"fid_vs_nfe": [], "sweeps": {}}

    def run_of(part: str, family: str, seed: int) -> Path | None:
        return next((Path(r.source) for r in by_part.get(part, []) if r.ok and r.results["model"] == family
                     and r.results["seed"] == seed), None)

    # what follows training asks each family what it can do (models/registry.py), never its name
    from models.registry import family_class

    capable = {family: family_class(family) for family in families}
    tasks, labels = [], []
    classifier_ckpt = None
    if classifier_job is not None:
        stage("waiting for the noise-aware classifier", start)
        classifier_ckpt = classifier_job()
    for family, cls in capable.items():
        cond0 = run_of("conditional", family, seeds[0]) if conditional else None
        for guidance_kind in SWEEPS if cond0 is not None else ():
            if guidance_kind in cls.guidance_kinds and (guidance_kind != "classifier" or classifier_ckpt is not None):
                tasks.append((sweep, cond0, guidance_kind, out / "sweeps" / family / guidance_kind, sweep_samples,
                              extra, classifier_ckpt if guidance_kind == "classifier" else None, wandb_group(out),
                              family))
                labels.append(f"sweep:{family}/{guidance_kind}")
        for seed in (seeds if nfe_all_seeds else seeds[:1]):
            uncond = run_of(next(iter(parts)), family, seed)
            if uncond is not None and nfe_samples > 0 and cls.samplers_at_nfe(NFE_POINTS[0]):
                tasks.append((fid_vs_nfe, uncond, out, nfe_samples, extra, family, seed))
                labels.append(f"fid_vs_nfe:{family}:{seed}")
        if conditional and classifier_ckpt is not None and "classifier" in cls.guidance_kinds:
            for r in by_part["conditional"]:
                if r.ok and r.results["model"] == family:
                    seed = r.results["seed"]
                    tasks.append((classifier_guided, Path(r.source), classifier_ckpt,
                                  out / "guided" / f"{preset.format(family)}_class_classifier_seed{seed}",
                                  r.results["sampler"], r.results["num_samples"], extra, [], wandb_group(out)))
                    labels.append(f"guided:{family}:{seed}")
    if tasks:
        stage(f"guidance and samplers, {jobs} at a time: " + ", ".join(labels), start)
        for label, result in zip(labels, run_parallel(tasks, jobs, keep_going=True)):
            if isinstance(result, Exception):   # the tables still come; the summary says what is missing
                print(f"  {label} failed: {result}", flush=True)
                summary.setdefault("failed_stages", {})[label] = str(result)
            elif label.startswith("sweep:"):
                summary["sweeps"][label.split(":")[1]] = result
            elif label.startswith("fid_vs_nfe:"):
                summary["fid_vs_nfe"] += result
    stage("tables and plots", start)
    if (out / "guided").is_dir():
        by_part.setdefault("conditional", []).extend(collect_local([out / "guided"]))
    tables = {name: write_part(name, recs, out, seeds) for name, recs in by_part.items() if recs}
    if summary["fid_vs_nfe"]:
        plot_fid_vs_nfe(summary["fid_vs_nfe"], out / "plots" / "fid_vs_nfe")
        (out / "fid_vs_nfe.md").write_text(fid_vs_nfe_markdown(summary["fid_vs_nfe"]))
    wall = time.perf_counter() - start
    failed = [r.source for t in tables.values() for r in t["table"].failed]
    summary.update({"wall_seconds": wall, "runs": len(records), "failed": failed,
                    "table_files": {name: t["files"] for name, t in tables.items()}, "plots": str(out / "plots"),
                    "curves": {name: t["curves"] for name, t in tables.items()},
                    "crossover": {name: t["crossover"] for name, t in tables.items() if "crossover" in t}})
    summary["provenance"] = provenance(wall) + (" (its training runs reused from an earlier run of this job in "
                                                     "the same folder; the time excludes them)" if reused_training else "")
    summary["seeds"] = list(seeds)
    (out / "main_job.json").write_text(json.dumps(summary, indent=2))
    (out / "summary.md").write_text(headline(out, {name: t["table"] for name, t in tables.items()}, summary))
    return {"tables": {name: t["table"] for name, t in tables.items()}, **summary}


#: the headline table's columns (the full tables have them all)
HEADLINE_COLUMNS = ("fid", "inception_pool/fid", "precision", "recall", "class_acc", "train_flops")
#: the figures the headline shows, by their stem under plots/ (and the sweeps' own)
HEADLINE_FIGURES = ("unconditional_fid_vs_compute", "conditional_fid_vs_compute", "unconditional_samples",
                    "conditional_samples")


def provenance(wall_seconds: float, where: Path = ROOT) -> str:
    """The command, commit (of the checkout holding ``where``), machine and wall time a main job
    was measured with."""
    import platform

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=where, capture_output=True,
                                text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=where,
                               capture_output=True, text=True, check=True).stdout.strip()
        commit += " (with uncommitted changes)" if dirty else ""
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown (not a git checkout)"
    cpu = platform.processor() or platform.machine()
    try:
        names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"`{' '.join(['python', *sys.argv]) if sys.argv and sys.argv[0].endswith('main_job.py') else 'make main'}` at "
            f"commit {commit}, {datetime.now():%Y-%m-%d}; {os.cpu_count()} cores ({cpu}), {device}; "
            f"{wall_seconds / 60:.1f} minutes")


def headline(out: Path, tables: dict, summary: dict) -> str:
    """summary.md: per part the headline columns and the crossover, the guidance sweeps, the
    figures (relative to ``out``), and how it was measured."""
    lines = [f"Measured by {summary['provenance']}; seeds {', '.join(map(str, summary['seeds']))}.", ""]
    for name, table in tables.items():
        lines += [f"**{name.capitalize()}**, every family at the same training budget:", "",
                  to_markdown(table, HEADLINE_COLUMNS).rstrip(), ""]
        crossing = summary.get("crossover", {}).get(name)
        if crossing:
            lines += [f"Crossover ({name}): {crossing['text']}.", ""]
    for key, rows in (summary.get("sweeps") or {}).items():
        family, _, kind = key.rpartition("/")   # sweeps/<family>/<kind>
        sweep_md = out / "sweeps" / key / "sweep.md"
        if rows and sweep_md.is_file():
            lines += [f"**{kind.replace('_', '-')} guidance sweep** (seed-0 conditional {family or 'model'}):", "",
                      sweep_md.read_text().rstrip(), ""]
    figures = [f"plots/{stem}.png" for stem in HEADLINE_FIGURES if (out / "plots" / f"{stem}.png").is_file()]
    figures += [str(p.relative_to(out)) for p in sorted((out / "sweeps").glob("*/*/plots/guidance_sweep.png"))]
    lines += [f"![{Path(f).stem}]({f})" for f in figures]
    return "\n".join(lines) + "\n"


def rebuild_summary(out: Path, families=None) -> str:
    """summary.md of a main job from its run directories and main_job.json (the tables, curves and
    crossover recomputed as the job computes them)."""
    job = json.loads((out / "main_job.json").read_text())
    families = main_job_families() if families is None else families
    records = collect_local([out / "runs"])
    seeds = job.get("seeds") or sorted({r.results["seed"] for r in records if r.ok})
    by_part = {name: [r for r in records if _part_of(r, preset, families)] for name, preset in PARTS.items()}
    if (out / "guided").is_dir():
        by_part.setdefault("conditional", []).extend(collect_local([out / "guided"]))
    tables = {name: write_part(name, recs, out, seeds) for name, recs in by_part.items() if recs}
    job["crossover"] = {name: t["crossover"] for name, t in tables.items() if "crossover" in t}
    job.setdefault("provenance", provenance(job["wall_seconds"]))
    job["seeds"] = seeds
    text = headline(out, {name: t["table"] for name, t in tables.items()}, job)
    (out / "summary.md").write_text(text)
    return text


def published_name(figure: Path) -> str:
    """A figure's file name under docs/figures/main/: sweeps/<family>/<kind>/plots/guidance_sweep.png
    becomes <family>_<kind>_sweep.png, plots/<name> stays <name>."""
    if figure.stem != "guidance_sweep":
        return figure.name
    sweep_dir = figure.parent.parent
    return f"{sweep_dir.parent.name}_{sweep_dir.name}_sweep{figure.suffix}"


def publish(out: Path, readme: Path = ROOT / "README.md", docs: Path = ROOT / "docs") -> list[Path]:
    """Copy a finished main job's summary into the README (between its ``main-job`` markers) and
    docs/main_job.md (with the full tables), and its figures into docs/figures/main/."""
    import shutil

    summary = (out / "summary.md").read_text() if (out / "summary.md").is_file() else rebuild_summary(out)
    figures = docs / "figures" / "main"
    figures.mkdir(parents=True, exist_ok=True)
    for line in summary.splitlines():
        if line.startswith("!["):
            source = out / line[line.index("](") + 2:-1]
            shutil.copyfile(source, figures / published_name(source))

    def relink(text: str, prefix: str) -> str:
        import re
        def target(match) -> str:
            return f"![{match.group(1)}]({prefix}{published_name(Path(match.group(2)))})"
        return re.sub(r"!\[([^\]]*)\]\(([^)]*)\)", target, text)

    full = [relink(summary, "figures/main/"), "## Full tables", ""]
    for md in sorted(out.glob("table_*.md")):
        full += [f"### {md.stem.removeprefix('table_')}", "", md.read_text().rstrip(), ""]
    written = []
    for path, text in ((readme, relink(summary, "docs/figures/main/")), (docs / "main_job.md", "\n".join(full))):
        current = path.read_text()
        start, end = "<!-- main-job:start -->", "<!-- main-job:end -->"
        if start not in current or end not in current:
            raise ValueError(f"{path} has no {start} ... {end} markers to fill")
        head, rest = current.split(start, 1)
        path.write_text(head + start + "\n" + text.rstrip() + "\n" + end + rest.split(end, 1)[1])
        written.append(path)
    return written


def _part_of(record, part, families) -> bool:
    """Whether a run dir (<experiment>_<model>_<conditioning>_seed<seed>) belongs to a part: its
    experiment is the part's for some family, its conditioning the part's."""
    preset, conditioning = as_part(part)
    name = Path(record.source).name
    ours = any(name.startswith(preset.format(f) + "_") for f in families) if "{}" in preset \
        else name.startswith(preset + "_")
    return ours and f"_{conditioning}_seed" in name


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", choices=sorted(DATASETS), default="digits",
                   help="digits: both parts with guidance (make main); mnist: the 28x28 benchmark, unconditional, "
                        "N = 2000 Inception samples per run (make main-mnist)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--families", nargs="+", default=None,
                   help="the families to compare (default: every registered family whose in_main_job is true: "
                        f"{' '.join(main_job_families())})")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--nfe-samples", type=int, default=128, help="samples per point of the FID-vs-NFE curve")
    p.add_argument("--nfe-all-seeds", action="store_true",
                   help="FID against NFE on every seed's checkpoint (intervals over seeds), not the first seed's only")
    p.add_argument("--jobs", type=int, default=2, help="jobs run side by side (1 thread each)")
    p.add_argument("--sweep-samples", type=int, default=SWEEP_SAMPLES,
                   help="samples per scale and sample set of the guidance sweeps")
    p.add_argument("--preset", default=None,
                   help='only this part: experiment per family ("{}" = family) or one shared one, e.g. '
                        '"digits_{}" = each family at its own preset budget, unconditional; default: both parts '
                        '(digits_matched_{} with conditioning=none and conditioning=class) with guidance')
    p.add_argument("--publish", type=Path, default=None, metavar="MAIN_JOB_DIR",
                   help="run nothing: copy that finished main job's summary, tables and figures into README.md "
                        "and docs/main_job.md (what regenerates them)")
    p.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run, e.g. budget.train_flops=1e11 (the matched presets train to a FLOP budget)")
    args = p.parse_args(argv)
    if args.publish is not None:
        for path in publish(args.publish):
            print(f"written: {path}")
        return
    out = args.out or ROOT / "logs" / ("main" if args.dataset == "digits" else f"main_{args.dataset}") \
        / datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    parts = None if args.preset is None else {"unconditional": args.preset}
    result = run_main_job(out, args.seeds, args.families, parts, args.overrides, args.nfe_samples, args.jobs,
                          sweep_samples=args.sweep_samples, dataset=args.dataset, nfe_all_seeds=args.nfe_all_seeds)
    for name, table in result["tables"].items():
        print(f"\n{name}:\n" + to_markdown(table))
    for name, found in result["crossover"].items():
        print(f"crossover, {name}: {found['text']}")
    print(f"main job finished in {result['wall_seconds'] / 60:.1f} min")
    print(f"runs:   {out / 'runs'}")
    print(f"tables: {out}/table_<part>.md|tex|csv; guidance sweeps: {out / 'sweeps'}")
    print(f"plots:  {out / 'plots'}")


if __name__ == "__main__":
    main()
