"""The main job: the four families x seeds on digits at one matched training budget (equal FLOPs),
one shared evaluation, then table and plots.

    python scripts/main_job.py                      # what `make main` runs (offline, CPU, <= 15 min on 2 cores)
    python scripts/main_job.py --seeds 0 1 2 3 4 --out logs/main/mine

Steps:
  1. the classifier extractor is trained and the real-image statistics cached (once);
  2. one real Hydra multirun of scripts/train.py over families x seeds (two single-threaded jobs
     side by side), every run an ordinary run dir; the classifier extractor at every evaluation,
     the standard Inception (inception_pool) added to the final evaluation of the first seed;
  3. the first seed's DDPM checkpoint sampled with DDIM-{10,20,50,100} and 1000-step ancestral
     sampling (FID vs NFE);
  4. make_table over all runs (Markdown, LaTeX, CSV) and the plots (PNG + PDF).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

from metrics.plots import final_grid, plot_fid_vs_nfe, plot_fid_vs_step, plot_precision_recall, plot_sample_grids
from metrics.report import build_table, collect_local, to_markdown, write_table
from scripts.overview import clock, watch

ROOT = Path(__file__).resolve().parents[1]
FAMILIES = ("gan", "ddpm", "realnvp", "vae")  # longest first: the two parallel workers finish together
#: every family at the same training budget (1.0 TFLOP; conf/experiment/digits_matched_*.yaml);
#: "digits_{}" trains each at its own preset's budget instead
MATCHED_PRESET = "digits_matched_{}"
MAIN_OVERRIDES = ["evaluation.reference.num_images=300"]
NFE_SAMPLERS = [(f"DDIM-{steps}" + (" eta=1" if eta else ""), {"name": "ddim", "steps": steps, "eta": eta})
                for eta in (0.0, 1.0) for steps in (10, 20, 50, 100)]
NFE_SAMPLERS.append(("ancestral-1000", {"name": "ancestral", "steps": None, "eta": 1.0}))


def stage(name: str, started: float) -> None:
    print(f"[{clock(time.perf_counter() - started)}] {name}", flush=True)


def multirun(out: Path, sweep: list[str], seeds: list[int], extra: list[str], log: Path, jobs: int,
             total: int, started: float) -> None:
    """One Hydra multirun; ``jobs`` > 1 runs that many single-threaded jobs side by side (joblib).
    Its output goes to ``log`` (each job also logs to its own run dir); the terminal shows the
    sweep's live overview."""
    parallel = ["hydra/launcher=joblib", f"hydra.launcher.n_jobs={jobs}", "num_threads=1"] if jobs > 1 else []
    cmd = [sys.executable, "scripts/train.py", "-m", *sweep, f"seed={','.join(map(str, seeds))}",
           f"hydra.sweep.dir={out / 'runs'}", "hydra.sweep.subdir=${model._target_}_seed${seed}",
           "callbacks.progress_bar=null", "task_name=main", *parallel, *extra]
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
    from hydra import compose, initialize_config_dir

    import scripts  # noqa: F401  (resolvers)
    from metrics.features import build_feature_metrics

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[o for o in overrides if o.startswith(("paths.", "datamodule", "evaluation."))])
    datamodule = hydra.utils.instantiate(cfg.datamodule)
    for name in extractors:
        build_feature_metrics(name, datamodule, cfg.paths.cache_dir, cfg.evaluation.reference.split,
                              cfg.evaluation.reference.num_images, "auto", "cpu")


def fid_vs_nfe(ddpm_run: Path, out: Path, num_samples: int, extra: list[str],
               samplers: list[tuple[str, dict]] = NFE_SAMPLERS) -> list[dict]:
    """The DDIM paper's Table 1 shape on one checkpoint: DDIM-{10,20,50,100} and ancestral-1000,
    evaluated in this process with scripts/evaluate.py's evaluate()."""
    from hydra import compose, initialize_config_dir
    from omegaconf import open_dict

    from scripts.evaluate import evaluate

    points = []
    for label, sampler in samplers:
        run_dir = out / "fid_vs_nfe" / label.replace(" ", "_")
        overrides = [f"sampler.{k}={'null' if v is None else v}" for k, v in sampler.items()]
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            cfg = compose(config_name="eval", overrides=[
                f"ckpt_path={ddpm_run / 'checkpoints' / 'last.ckpt'}", f"evaluation.num_samples={num_samples}",
                "evaluation.bpd_num_images=0", "evaluation.grid_size=0", *overrides,
                *[o for o in extra if o.startswith(("paths.", "evaluation.reference"))]])
        with open_dict(cfg):
            cfg.paths.output_dir = str(run_dir)
        r = evaluate(cfg)
        points.append({"label": label, "nfe": r["metrics"]["nfe"], "fid": r["metrics"]["fid"], "eta": sampler["eta"],
                       "extractor": r["feature_extractor"], "num_samples": num_samples,
                       "sec_per_sample": r["metrics"]["sec_per_sample"]})
        print(f"  {label}: NFE {points[-1]['nfe']:.0f}, FID {points[-1]['fid']:.2f} [{points[-1]['extractor']}]", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "fid_vs_nfe.json").write_text(json.dumps(points, indent=2))
    return points


def run_main_job(out: Path, seeds: list[int], families=FAMILIES, preset: str = MATCHED_PRESET,
                 extra: list[str] = (), nfe_samples: int = 128, jobs: int = 2) -> dict:
    """``preset`` with "{}" is one experiment per family (digits_gan, ...); without, one shared
    experiment swept over model=... (e.g. "smoke")."""
    out.mkdir(parents=True, exist_ok=True)
    log = out / "main_job.log"
    start = time.perf_counter()
    # 300 real images as the reference of every extractor: the Inception pass is slow on a CPU
    extra = [*MAIN_OVERRIDES, *extra]
    stage("caches: the classifier extractor and the real-image statistics (once per cache dir)", start)
    prepare_caches(["classifier", "inception_pool"], extra)
    sweep = [f"experiment={','.join(preset.format(f) for f in families)}"] if "{}" in preset \
        else [f"experiment={preset}", f"model={','.join(families)}"]
    # one multirun over every family and seed (the two workers stay busy to the end); the standard
    # Inception is added to the final evaluation of the first seed only
    multirun(out, sweep, seeds, ["evaluation.final_extractors=[inception_pool]",
                                 f"evaluation.final_extractors_seeds=[{seeds[0]}]", *extra], log, jobs,
             len(families) * len(seeds), start)
    records = collect_local([out / "runs"])
    ddpm0 = next((Path(r.source) for r in records if r.ok and r.results["model"] == "ddpm" and r.results["seed"] == seeds[0]), None)
    if ddpm0:
        stage(f"FID vs NFE: the seed-{seeds[0]} DDPM with {len(NFE_SAMPLERS)} samplers, {nfe_samples} samples each", start)
    points = fid_vs_nfe(ddpm0, out, nfe_samples, extra) if ddpm0 else []
    stage("table and plots", start)
    table = build_table(records)
    files = write_table(table, out)
    plots = out / "plots"
    plot_fid_vs_step(records, plots / "fid_vs_step")
    plot_fid_vs_step(records, plots / "fid_vs_compute", compute=True)
    plot_precision_recall(records, plots / "precision_recall")
    if points:
        plot_fid_vs_nfe(points, plots / "fid_vs_nfe")
    grids = {r.results["model"]: final_grid(r) for r in records if r.ok and r.results["seed"] == seeds[0]}
    plot_sample_grids({k: v for k, v in grids.items() if v is not None}, plots / "samples")
    wall = time.perf_counter() - start
    summary = {"wall_seconds": wall, "runs": len(records), "failed": [r.source for r in table.failed],
               "table_files": {k: str(v) for k, v in files.items()}, "plots": str(plots), "fid_vs_nfe": points}
    (out / "main_job.json").write_text(json.dumps(summary, indent=2))
    return {"table": table, **summary}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--families", nargs="+", default=list(FAMILIES))
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--nfe-samples", type=int, default=128, help="samples per point of the FID-vs-NFE curve")
    p.add_argument("--jobs", type=int, default=2, help="jobs run side by side (1 thread each)")
    p.add_argument("--preset", default=MATCHED_PRESET,
                   help='experiment per family ("{}" = family) or one shared one; default: the compute-matched '
                        'presets; "digits_{}" = each family at its own preset budget')
    p.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run, e.g. trainer.max_steps=100")
    args = p.parse_args(argv)
    out = args.out or ROOT / "logs" / "main" / datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    result = run_main_job(out, args.seeds, args.families, args.preset, args.overrides, args.nfe_samples, args.jobs)
    print(to_markdown(result["table"]))
    print(f"main job finished in {result['wall_seconds'] / 60:.1f} min")
    print(f"runs:   {out / 'runs'}")
    print(f"table:  {out / 'table.md'}, {out / 'table.tex'}, {out / 'table.csv'}")
    print(f"plots:  {out / 'plots'}")


if __name__ == "__main__":
    main()
