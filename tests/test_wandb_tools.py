"""W&B as code, offline: the dashboard spec (panels and queries), the run keys it filters on, the
sweep sync script, the wandb-osh callback and the W&B run of an evaluation."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


from metrics.dashboard import BARS, CURVES, DashboardTarget, build_workspace, describe
from metrics.report import run_filter_keys

ROOT = Path(__file__).resolve().parents[1]


def panels_of(workspace):
    return [(section.name, panel) for section in workspace.sections for panel in section.panels]


def names(metrics) -> list[str]:
    return [m if isinstance(m, str) else m.name for m in metrics]


def test_dashboard_has_every_panel_the_issue_lists():
    import wandb_workspaces.reports.v2 as wr

    workspace = build_workspace(DashboardTarget("me", "genbench", "main_2026"))
    panels = panels_of(workspace)
    lines = {(type(p).__name__, tuple(names(p.y))) for _, p in panels if isinstance(p, wr.LinePlot)}
    for metric in ("fid", "sfid", "precision", "recall"):            # vs step, per family, per extractor
        for key in (f"eval/{metric}", f"eval/inception_pool/{metric}"):
            assert ("LinePlot", (key,)) in lines, key
    for _, p in panels:
        if isinstance(p, (wr.LinePlot, wr.BarPlot)):                   # one colour per family, seeds grouped
            assert p.groupby.name == "family" and p.groupby_aggfunc == "mean"
    scatters = [p for _, p in panels if isinstance(p, wr.ScatterPlot)]
    assert any(p.x.name == "eval/recall" and p.y.name == "eval/precision" and p.z is None for p in scatters)
    for scale in ("guidance_scale", "classifier_scale"):                # the guidance sweep
        assert {p.y.name for p in scatters if p.x.name == scale} >= {"eval/fid", "eval/precision", "eval/recall",
                                                                      "eval/class_acc"}
        assert any(p.z is not None and p.z.name == scale for p in scatters)   # the P/R curve along the scale
    bars = {m for _, p in panels if isinstance(p, wr.BarPlot) for m in names(p.metrics)}
    assert {"eval/bpd", "eval/nfe"} <= bars
    media = [p for _, p in panels if isinstance(p, wr.MediaBrowser)]
    assert media and media[0].media_keys == ["eval/samples"]
    assert [p.table_name for _, p in panels if isinstance(p, wr.WeavePanelSummaryTable)] == ["benchmark_table"]
    # the query: this group's runs, grouped by family
    assert str(workspace.runset_settings.filters) == """Metric("Group") == 'main_2026'"""
    assert [g.name for g in workspace.runset_settings.groupby] == ["family"]
    assert workspace.entity == "me" and workspace.project == "genbench" and workspace.name == "genbench: main_2026"
    text = "\n".join(describe(workspace))
    assert text.count("LinePlot") == len(CURVES) * 3 and text.count("BarPlot") == len(BARS)


def test_dashboard_script_dry_run_is_offline_and_saving_needs_credentials(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "WANDB_MODE": "offline"}
    base = [sys.executable, "scripts/wandb_dashboard.py", "--entity", "me", "--group", "g"]
    dry = subprocess.run([*base, "--dry-run"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert dry.returncode == 0, dry.stderr[-2000:]
    assert "guidance sweep" in dry.stdout and "benchmark_table" in dry.stdout
    save = subprocess.run(base, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert save.returncode == 1 and "wandb login" in save.stderr


def results_of(model="ddpm", sampler=None, seed=1, classes=10) -> dict:
    return {"model": model, "dataset": "digits", "seed": seed, "num_samples": 512, "feature_extractor": "classifier",
            "sampler": sampler, "config": {"datamodule": {"image_size": 8}, "model": {"num_classes": classes}},
            "details": {"extractors": {"classifier": {"reference": {"split": "train", "num_images": 300}}}},
            "metrics": {"fid": 12.5, "precision": 0.5}}


def test_run_filter_keys_are_flat_and_name_the_guidance():
    keys = run_filter_keys(results_of(sampler={"name": "ddim", "steps": 10, "eta": 1.0, "guidance_scale": 2.0}))
    assert keys["family"] == "ddpm" and keys["dataset"] == "digits" and keys["image_size"] == "8"
    assert keys["guidance_scale"] == 2.0 and keys["classifier_scale"] == 0.0 and keys["seed"] == 1
    assert keys["num_classes"] == 10 and keys["conditioning"] == "class-conditional"
    assert keys["sampler"] == "ddim-10 eta=1 guidance_scale=2"
    assert all(not isinstance(v, (dict, list)) for v in keys.values())


def test_sync_finds_each_sweeps_unsynced_offline_runs(tmp_path):
    from scripts.sync import main, offline_runs, sync_command

    runs = []
    for job in ("a_seed0", "b_seed1", "c_seed2"):
        run = tmp_path / "sweep" / job / "wandb" / f"offline-run-2026120{len(runs)}_000000-{job}"
        run.mkdir(parents=True)
        (run / f"run-{job}.wandb").write_bytes(b"")
        runs.append(run)
    (runs[1] / "run-b_seed1.wandb.synced").write_text("")
    assert offline_runs([tmp_path / "sweep"]) == [runs[0], runs[2]]
    assert offline_runs([tmp_path / "sweep"], include_synced=True) == runs
    assert sync_command(runs[:1], ["-p", "x"])[-4:] == ["sync", "-p", "x", str(runs[0])]
    assert main([str(tmp_path / "sweep"), "--dry-run"]) == 0
    assert main([str(tmp_path / "nowhere")]) == 2


class FakeExperiment:
    def __init__(self, run_dir: Path):
        self.dir = str(run_dir / "files")


def test_wandb_osh_callback_leaves_command_files_for_the_sync_process(tmp_path):
    from pytorch_lightning.loggers import WandbLogger

    from scripts.loggers import WandbOfflineSync

    run_dir = tmp_path / "wandb" / "offline-run-x"

    class RunDirOnly(WandbLogger):   # no wandb.init: the callback reads only .experiment.dir
        experiment = property(lambda self: FakeExperiment(run_dir))

    class Trainer:
        is_global_zero, loggers, global_step = True, [RunDirOnly.__new__(RunDirOnly)], 0

    comm = tmp_path / "comm"
    cb = WandbOfflineSync(enabled=True, every_n_steps=10, communication_dir=str(comm))
    trainer = Trainer()
    for step in range(1, 26):
        trainer.global_step = step
        cb.on_train_batch_end(trainer, None, None, None, step)
        if step in (5, 10, 20):
            files = list(comm.glob("*.command"))
            assert len(files) == (0 if step == 5 else 1)
            if files:
                assert files[0].read_text() == str(run_dir.resolve())
                files[0].unlink()          # what wandb-osh does once it has synced
    cb.on_train_end(trainer, None)
    assert len(list(comm.glob("*.command"))) == 1
    off = WandbOfflineSync(enabled=False, communication_dir=str(tmp_path / "off"))
    off.on_train_end(trainer, None)
    assert not (tmp_path / "off").exists()


def test_evaluation_run_is_logged_offline_with_its_keys(tmp_path, monkeypatch):
    import numpy as np
    import wandb

    from scripts.loggers import log_results_run

    seen = {}
    real_init = wandb.init

    def init(**kwargs):
        seen.update(kwargs)
        return real_init(**kwargs)

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setattr(wandb, "init", init)
    grid = np.zeros((9, 9, 1), dtype=np.uint8)
    log_results_run(results_of(sampler={"name": "ddim", "steps": 10, "classifier_scale": 4.0}), "genbench",
                    str(tmp_path), group="sweep-1", grid=grid)
    assert seen["group"] == "sweep-1" and seen["job_type"] == "ddpm" and seen["mode"] == "offline"
    assert seen["config"]["classifier_scale"] == 4.0 and seen["config"]["family"] == "ddpm"
    offline = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(offline) == 1 and list(offline[0].glob("*.wandb")), "no syncable offline run"


def test_training_run_carries_group_job_type_and_flat_config(tmp_path, shared_cache, monkeypatch):
    """A real training run with the W&B logger (offline): wandb.init gets group and job_type, the
    run config the flat keys the dashboard filters on."""
    import wandb

    from scripts.train import train
    from models.configs import compose

    runs = []
    real_init = wandb.init

    def init(**kwargs):
        runs.append((kwargs, real_init(**kwargs)))
        return runs[-1][1]

    monkeypatch.setattr(wandb, "init", init)
    cfg = compose("train", ["experiment=smoke", "model=vae", "callbacks.progress_bar=null", "evaluation.final_extractors=[]",
                         f"paths.cache_dir={shared_cache}", "logger.wandb.group=sweep-7", "~logger.csv"], tmp_path)
    train(cfg)
    (kwargs, run), = runs
    assert kwargs["group"] == "sweep-7" and kwargs["job_type"] == "vae"
    config = dict(run.config)
    assert config["family"] == "vae" and config["dataset"] == "digits" and config["seed"] == 0
    assert "guidance_scale" in config and "model" in config         # the flat keys beside the nested config
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["status"] == "ok"
