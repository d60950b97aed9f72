"""train(): the smoke run end to end, results.json, and bad input."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra.errors import ConfigCompositionException, MissingConfigException

from conftest import ROOT

from models.configs import compose
from metrics.results import SCHEMA_KEYS
from scripts.train import CheckpointError, train


def _assert_schema(results: dict):
    for key in SCHEMA_KEYS:
        assert key in results, key
    assert isinstance(results["model"], str) and isinstance(results["dataset"], str)
    assert isinstance(results["seed"], int) and results["num_params"] > 0 and results["train_steps"] > 0
    for name, value in results["metrics"].items():
        assert isinstance(value, float) and math.isfinite(value), (name, value)


def test_cli_smoke_ddpm_writes_results_and_a_syncable_offline_wandb_run(tmp_path):
    """The documented command, as a subprocess, with the default (W&B) logger and no network."""
    run_dir = tmp_path / "run"
    env = {**os.environ, "WANDB_MODE": "offline", "GENBENCH_CACHE": str(tmp_path / "cache")}
    env.pop("WANDB_API_KEY", None)
    proc = subprocess.run([sys.executable, "scripts/train.py", "experiment=smoke", "model=ddpm",
                           f"hydra.run.dir={run_dir}", "callbacks.progress_bar=null"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((run_dir / "results.json").read_text())
    _assert_schema(results)
    assert results["model"] == "ddpm" and results["dataset"] == "digits" and results["status"] == "ok"
    assert results["train_steps"] == 30
    assert {"bpd", "nfe", "sec_per_sample", "train_loss"} <= set(results["metrics"])
    # feature metrics from the classifier (every evaluation) and the standard Inception (final)
    feature_metrics = {"fid", "precision", "recall", "density", "coverage"}
    assert results["feature_extractor"] == "classifier"
    assert feature_metrics | {"is", "kid"} <= set(results["metrics"])
    assert {f"inception_pool/{m}" for m in feature_metrics} <= set(results["metrics"])
    assert "inception_pool/is" not in results["metrics"]  # no logits: unavailable, never faked
    assert "not available" in results["details"]["extractors"]["inception_pool"]["is"]
    assert results["details"]["extractors"]["classifier"]["fid_small_n"] is True
    assert results["metrics"]["nfe"] == 1000.0
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert list((run_dir / "samples").glob("*.png"))
    offline_runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline_runs) == 1 and list(offline_runs[0].glob("*.wandb")), "no syncable offline W&B run"


@pytest.mark.parametrize("override,choice", [("model=diffusion_transformer", "ddpm"),
                                             ("datamodule=imagenet21k", "digits"),
                                             ("logger=tensorboard", "wandb")])
def test_unknown_group_option_lists_the_available_choices(override, choice):
    with pytest.raises((MissingConfigException, ConfigCompositionException), match=rf"(?s)Available options.*{choice}"):
        compose("train", [override])


def test_unknown_key_is_refused():
    with pytest.raises(ConfigCompositionException, match="learning_rate"):
        compose("train", ["model.learning_rate=0.1"])


def test_unsupported_image_size_fails_before_training(tmp_path, smoke_overrides):
    cfg = compose("train", smoke_overrides + ["datamodule.image_size=9"], tmp_path)
    with pytest.raises(Exception, match=r"image_size must be a multiple of 2.*Supported sizes"):
        train(cfg)
    assert not (tmp_path / "checkpoints").exists()


def test_missing_dataset_offline_names_the_folder(tmp_path, smoke_overrides):
    cfg = compose("train", smoke_overrides + ["datamodule=mnist", "datamodule.download=false"], tmp_path)
    with pytest.raises(Exception, match=r"MNIST/raw"):
        train(cfg)


def test_nan_loss_stops_with_a_message_and_keeps_the_last_good_checkpoint(tmp_path, smoke_overrides, monkeypatch):
    from models.diffusion.gaussian_diffusion import GaussianDiffusion

    real_loss, calls = GaussianDiffusion.training_loss, {"n": 0}

    def poisoned(self, model, x0, generator=None):
        loss = real_loss(self, model, x0, generator)
        if torch.is_grad_enabled():
            calls["n"] += 1
            if calls["n"] > 25:  # checkpoint at step 20 is good; step 26 diverges
                return loss * float("nan")
        return loss

    monkeypatch.setattr(GaussianDiffusion, "training_loss", poisoned)
    # without the compute count, whose FLOP probe would be one more (copied) call of the loss
    cfg = compose("train", [*smoke_overrides, "callbacks.compute=null"], tmp_path)
    with pytest.raises(FloatingPointError, match=r"non-finite training loss at step 25.*last good checkpoint"):
        train(cfg)
    good = tmp_path / "checkpoints" / "step0000020.ckpt"
    assert good.is_file()
    state = torch.load(good, map_location="cpu", weights_only=False)["state_dict"]
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["status"] == "failed" and "non-finite" in results["error"]


def test_corrupt_checkpoint_is_refused_with_the_fix(tmp_path, smoke_overrides):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.ckpt").write_bytes(b"PK\x03\x04 truncated")
    cfg = compose("train", smoke_overrides, tmp_path)
    with pytest.raises(CheckpointError, match="corrupt.*ckpt_path=null"):
        train(cfg)


def test_a_failing_job_does_not_stop_the_multirun_and_is_listed(tmp_path, shared_cache):
    """Job 0 fails before training (GAN at 12x12), job 1 still runs; both leave results.json and
    make_table lists the failure."""
    from metrics.report import build_table, collect_local

    env = {**os.environ, "WANDB_MODE": "offline"}
    proc = subprocess.run([sys.executable, "scripts/train.py", "-m", "experiment=smoke", "model=gan",
                           "datamodule.image_size=12,8", "logger=csv", "callbacks.progress_bar=null",
                           "evaluation.final_extractors=[]", f"paths.cache_dir={shared_cache}",
                           f"hydra.sweep.dir={tmp_path}"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0  # Hydra reports the failed job after running the others
    failed = json.loads((tmp_path / "0" / "results.json").read_text())
    assert failed["status"] == "failed" and "must be one of" in failed["error"]
    ok = json.loads((tmp_path / "1" / "results.json").read_text())
    assert ok["status"] == "ok" and ok["train_steps"] == 30
    table = build_table(collect_local([tmp_path]))
    assert len(table.rows) == 1 and len(table.failed) == 1 and "must be one of" in table.failed[0].problem


def test_a_failed_rerun_keeps_the_previous_results(tmp_path, smoke_overrides):
    (tmp_path / "results.json").write_text(json.dumps({"status": "ok", "metrics": {"fid": 1.0}}))
    cfg = compose("train", smoke_overrides + ["datamodule.image_size=9"], tmp_path)
    with pytest.raises(Exception):
        train(cfg)
    assert json.loads((tmp_path / "results.previous.json").read_text())["metrics"] == {"fid": 1.0}
    assert json.loads((tmp_path / "results.json").read_text())["status"] == "failed"


def _multirun(tmp_path, shared_cache, *overrides: str) -> subprocess.CompletedProcess:
    # GENBENCH_ROOT: a process that ignored the job directory would write under <root>/logs
    env = {**os.environ, "WANDB_MODE": "offline", "GENBENCH_ROOT": str(tmp_path / "root")}
    return subprocess.run([sys.executable, "scripts/train.py", "-m", "experiment=smoke", "logger=csv",
                           "callbacks.progress_bar=null", "evaluation.final_extractors=[]",
                           f"paths.cache_dir={shared_cache}", f"hydra.sweep.dir={tmp_path / 'sweep'}", *overrides],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)


def _job_results(sweep: Path, jobs: int) -> list[dict]:
    """One run directory per job (not per process), each with a finished results.json."""
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == [str(i) for i in range(jobs)]
    assert not (sweep.parent / "root" / "logs").exists()  # no process wrote outside its job directory
    results = [json.loads((sweep / str(i) / "results.json").read_text()) for i in range(jobs)]
    for r in results:
        assert r["status"] == "ok" and r["train_steps"] == 30, r.get("error")
        assert {"fid", "precision", "recall", "nfe"} <= set(r["metrics"])
        assert all(math.isfinite(v) for v in r["metrics"].values())
    return results


def test_ddp_cpu_training_of_every_family_under_a_multirun(tmp_path, shared_cache):
    """trainer=ddp_cpu (2 gloo processes, forked): each family trains, the final evaluation made
    in the worker processes reaches its job's results.json."""
    proc = _multirun(tmp_path, shared_cache, "trainer=ddp_cpu", "model=gan,vae,realnvp,ddpm")
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = _job_results(tmp_path / "sweep", 4)
    assert [r["model"] for r in results] == ["gan", "vae", "realnvp", "ddpm"]


def test_ddp_relaunching_the_script_under_a_multirun_keeps_one_directory_per_job(tmp_path, shared_cache):
    """strategy=ddp re-runs the script for rank 1 (as on a GPU node): the child must run its job,
    not the sweep, and write into its job's directory; the second job must launch its own ranks."""
    proc = _multirun(tmp_path, shared_cache, "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
                     "model=ddpm,gan")
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = _job_results(tmp_path / "sweep", 2)
    assert [r["model"] for r in results] == ["ddpm", "gan"]


@pytest.mark.parametrize("override, message", [
    ("model.optimizer.lr=fast", r"model.optimizer.lr='fast' \(str\): Adam's lr must be a number, e.g. model.optimizer.lr="),
    ("+model.optimizer.betas=[0.9]", r"model.optimizer.betas=\[0.9\] .*must be a list of 2 numbers"),
    ("model.optimizer.lr=-1", r"model.optimizer: Adam refuses these settings \(Invalid learning rate: -1"),
    ("+model.optimizer.momentum=0.9", r"model.optimizer.momentum is not an option of Adam"),
])
def test_a_wrongly_typed_optimizer_value_is_refused_before_any_work(tmp_path, smoke_overrides, override, message):
    from models.config_checks import ConfigValueError
    from scripts.train import train

    with pytest.raises(ConfigValueError, match=message):
        train(compose("train", [*smoke_overrides, override], tmp_path))
    assert not (tmp_path / "checkpoints").exists()
