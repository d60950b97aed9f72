"""The main job's pieces: plots from hand-made runs, sampler settings per family, the SLURM preset,
and (slow) the whole job at smoke scale."""
import json

import numpy as np
import pytest
from PIL import Image

from models.configs import compose
from metrics.curves import CurvePoint, compute_curves, crossover
from metrics.plots import (final_grid, plot_fid_vs_compute, plot_fid_vs_nfe, plot_fid_vs_step, plot_precision_recall,
                           plot_sample_grids)
from metrics.report import collect_local


@pytest.fixture
def runs(tmp_path):
    for i, (model, fid) in enumerate([("gan", 30.0), ("ddpm", 10.0)]):
        d = tmp_path / f"{model}_seed0"
        (d / "samples").mkdir(parents=True)
        Image.fromarray(np.full((19, 19), 40 * (i + 1), np.uint8)).save(d / "samples" / "step0000100.png")
        hist = [{"step": s, "batches": s, "feature_extractor": "classifier", "metrics": {"fid": fid * 100 / s}}
                for s in (100, 200, 400)]
        (d / "eval_history.jsonl").write_text("\n".join(json.dumps(h) for h in hist) + "\n")
        (d / "results.json").write_text(json.dumps({
            "model": model, "dataset": "digits", "seed": 0, "num_params": 1, "train_steps": 400,
            "feature_extractor": "classifier", "num_samples": 256, "sampler": {}, "status": "ok",
            "metrics": {"fid": fid, "precision": 0.5, "recall": 0.6},
            "train_flops": 4e11, "budget": {"train_flops_budget": 4e11, "planned_batches": 400}}))
    return tmp_path


def test_plots_are_written_as_png_and_pdf(runs, tmp_path):
    records = collect_local([runs])
    out = tmp_path / "plots"
    written = plot_fid_vs_step(records, out / "fid_vs_step") + plot_precision_recall(records, out / "pr")
    written += plot_fid_vs_compute(compute_curves(records), out / "fid_vs_compute", "FID [classifier]")
    written += plot_fid_vs_nfe([{"label": "DDIM-10", "nfe": 10, "fid": 20.0}, {"label": "DDIM-50", "nfe": 50, "fid": 12.0},
                                {"label": "ancestral-1000", "nfe": 1000, "fid": 10.0}], out / "nfe")
    written += plot_sample_grids({r.results["model"]: final_grid(r) for r in records}, out / "samples")
    assert len(written) == 10
    for path in written:
        assert path.stat().st_size > 1000
    assert Image.open(out / "samples.png").size[0] > 300


def test_compute_curves_put_each_milestone_at_the_flops_spent_by_then(runs):
    curves = compute_curves(collect_local([runs]))
    assert [p.tflop for p in curves["gan"]] == pytest.approx([0.1, 0.2, 0.4])  # batches x 4e11 / 400
    assert [p.mean for p in curves["ddpm"]] == pytest.approx([10.0, 5.0, 2.5])
    assert all(p.n == 1 and p.half_width == 0.0 for p in curves["ddpm"])


def test_crossover_is_the_first_budget_where_one_interval_lies_wholly_below_the_other():
    def curve(means, half):
        return [CurvePoint(t, m, half, 3) for t, m in zip((0.25, 0.5, 1.0, 2.0), means)]
    gan = curve([20.0, 14.0, 12.0, 12.0], 1.0)
    # overlapping at 1.0 (11.5 + 1 > 12 - 1), separated from 2.0 on
    ddpm = curve([60.0, 30.0, 11.5, 8.0], 1.0)
    found = crossover({"ddpm": ddpm, "gan": gan}, "ddpm", "gan")
    assert found["crossover_tflop"] == 2.0 and found["stays_below"]
    assert found["at_largest"]["below"] and found["at_largest"]["ddpm"] == [8.0, 1.0]
    never = crossover({"ddpm": curve([60.0, 30.0, 20.0, 13.0], 1.0), "gan": gan}, "ddpm", "gan")
    assert never["crossover_tflop"] is None and not never["at_largest"]["below"]


def test_sampler_settings_are_recorded_only_by_the_family_that_uses_them():
    import hydra
    unguided = {"guidance_scale": 0.0, "classifier_ckpt": None, "classifier_scale": 0.0}   # recorded too
    for model, expected in [("gan", {}), ("ddpm", {"name": "ddim", "steps": 50, "eta": 0.0, **unguided})]:
        m = hydra.utils.instantiate(compose("train", [f"model={model}"]).model)
        assert m.sampler_kwargs(name="ddim", steps=50, eta=0.0) == expected


def test_slurm_launcher_preset_composes_one_task_per_gpu():
    cfg = compose("train", ["hydra/launcher=slurm", "trainer=ddp", "trainer.devices=8", "trainer.num_nodes=2",
                         "hydra.launcher.partition=gpu"], keep_hydra=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert launcher.tasks_per_node == launcher.gpus_per_node == 8 and launcher.nodes == 2
    assert launcher.partition == "gpu" and launcher.max_num_timeout > 0


@pytest.mark.slow
def test_main_job_at_smoke_scale(tmp_path, shared_cache):
    from scripts.main_job import run_main_job
    result = run_main_job(tmp_path, [0, 1], parts={"unconditional": "smoke"},
                          extra=[f"paths.cache_dir={shared_cache}", "logger=csv"], nfe_samples=16)
    assert len(result["tables"]["unconditional"].rows) == 4 and not result["failed"]
    for ext in ("md", "tex", "csv"):
        assert (tmp_path / f"table_unconditional.{ext}").is_file()
    for name in ("unconditional_fid_vs_step", "unconditional_precision_recall", "fid_vs_nfe", "unconditional_samples"):
        assert (tmp_path / "plots" / f"{name}.png").is_file() and (tmp_path / "plots" / f"{name}.pdf").is_file()
    assert {p["label"] for p in result["fid_vs_nfe"]} >= {"ddpm ancestral @ 50", "ddpm DDIM (eta=0) @ 10"}


@pytest.mark.parametrize("seed,expected", [(0, ["inception_pool"]), (1, [])])
def test_final_extractors_can_be_limited_to_some_seeds(seed, expected):
    import hydra
    cfg = compose("train", [f"seed={seed}", "evaluation.final_extractors=[inception_pool]",
                         "evaluation.final_extractors_seeds=[0]"], "/tmp/unused")
    callback = hydra.utils.instantiate(cfg.callbacks.evaluation)
    assert callback.final_extractors == expected


def test_sweep_overview_counts_jobs_and_estimates_from_steps(tmp_path):
    """The main job's live overview: done / running / failed / waiting of the total from the run
    directories, a running job counted by its share of training steps."""
    from scripts.overview import overview_line, sweep_status

    def job(name, status=None, step=None, max_steps=100):
        d = tmp_path / name
        (d / ".hydra").mkdir(parents=True)
        (d / ".hydra" / "config.yaml").write_text(f"trainer:\n  max_steps: {max_steps}\n")
        if step is not None:
            (d / "csv").mkdir()
            (d / "csv" / "metrics.csv").write_text("step,train/loss\n" + "".join(f"{s},0.5\n" for s in range(9, step, 10)))
        if status:
            (d / "results.json").write_text(json.dumps({"status": status}))

    job("a", "ok")
    job("b", "failed")
    job("c", step=50)           # half way: last logged row at step 49
    status = sweep_status(tmp_path, total=5)
    assert (status.done, status.failed, status.running, status.pending) == (1, 1, 1, 2)
    assert status.progress == pytest.approx(2.49)
    line = overview_line("training sweep", status, stage_elapsed=249.0, elapsed=300.0)
    assert "1/5 done, 1 running, 1 failed, 2 waiting" in line
    assert "~4:11 left" in line    # 249 s for 2.49 jobs' worth: 2.51 more at the same pace
    assert "estimating" in overview_line("x", sweep_status(tmp_path / "none", 3), 1.0, 1.0)


def test_runs_are_assigned_to_their_part_and_labelled_by_guidance(tmp_path):
    from metrics.report import RunRecord, sampler_text
    from scripts.main_job import PARTS, _part_of, guidance_label, main_job_families

    FAMILIES = main_job_families()

    def record(name):
        return RunRecord(str(tmp_path / name), {})
    assert _part_of(record("digits_matched_gan_gan_class_seed0"), PARTS["conditional"], FAMILIES)
    assert not _part_of(record("digits_matched_gan_gan_class_seed0"), PARTS["unconditional"], FAMILIES)
    assert _part_of(record("digits_matched_gan_gan_none_seed0"), PARTS["unconditional"], FAMILIES)
    assert _part_of(record("smoke_vae_none_seed1"), "smoke", FAMILIES)
    sampler = {"name": "ddim", "steps": 50, "eta": 1.0, "guidance_scale": 0.0, "classifier_scale": 2.0,
               "classifier_ckpt": "/x/logs/main/classifier/checkpoints/last.ckpt"}
    assert sampler_text(sampler) == "ddim-50 classifier_ckpt=classifier classifier_scale=2 eta=1"
    assert guidance_label({"model": "ddpm", "sampler": sampler}) == "ddpm, classifier_scale=2"
    assert guidance_label({"model": "gan", "sampler": {}}) == "gan"


@pytest.mark.parametrize("scales,match", [("[1,-2]", ">= 0"), ("[1,strong]", "numbers"), ("[]", "at least one")])
def test_guidance_sweep_refuses_bad_scales(scales, match):
    from omegaconf import OmegaConf

    from scripts.guidance_sweep import check_scales
    with pytest.raises(ValueError, match=match):
        check_scales(OmegaConf.to_container(OmegaConf.create(f"v: {scales}"))["v"])


def test_mnist_main_job_composes_every_run_and_its_caches(tmp_path):
    """--dataset mnist: the four mnist_<family> presets (one sweep), the MNIST caches and no guidance
    stage; every job's config composes (a full run is the README's measured make main-mnist)."""
    from models.configs import compose
    from scripts.main_job import DATASETS, main_job_families

    profile = DATASETS["mnist"]
    assert profile["parts"] == {"unconditional": ("mnist_{}", "none")} and not profile["guidance"]
    for family in main_job_families():
        cfg = compose("train", [f"experiment=mnist_{family}", *profile["overrides"]])
        assert cfg.datamodule.name == "mnist" and cfg.datamodule.image_size == 32
        assert cfg.evaluation.final_extractors == ["inception_pool"] and cfg.evaluation.num_samples >= 2000
        assert cfg.evaluation.reference.split == "test" and cfg.evaluation.reference.num_images is None
        cond = compose("train", [f"experiment=mnist_{family}", "conditioning=class"])
        assert cond.model.num_classes == 10
    caches = compose("train", profile["caches"])
    assert caches.datamodule.name == "mnist" and caches.evaluation.reference.split == "test"


def test_a_classifier_guided_row_counts_the_classifiers_budget_and_parameters():
    """Classifier guidance needs the noise-aware classifier as much as the DDPM: the row's training
    FLOPs and parameters are both together; unguided rows keep the DDPM's alone."""
    from scripts.main_job import guided_budget

    ddpm = {"flops_per_image": 1e9, "train_images": 300, "train_flops": 0.30e12, "num_params": 180_000}
    classifier = {"train_flops": 1.27e12, "num_params": 330_000}
    guided = guided_budget(ddpm, classifier)
    assert guided["train_flops"] == pytest.approx(1.57e12) and guided["num_params"] == 510_000
    assert guided["classifier"] == classifier
    assert guided_budget(ddpm, None) == ddpm


def test_the_noise_aware_classifier_is_trained_on_the_guided_ddpms_process(tmp_path):
    """A guided DDPM refuses a classifier of another schedule (models/noisy_classifier.py): the main
    job's classifier preset must follow the conditional DDPM's process."""
    from scripts.main_job import CLASSIFIER_PRESET, PARTS, part_overrides

    classifier = compose("train", [f"experiment={CLASSIFIER_PRESET}"], tmp_path).model.diffusion
    ddpm = compose("train", part_overrides(PARTS["conditional"], "ddpm"), tmp_path).model.diffusion
    assert (classifier.schedule, classifier.num_timesteps) == (ddpm.schedule, ddpm.num_timesteps)


def test_the_noise_aware_classifier_trains_in_a_run_dir_of_its_own_cache_key(tmp_path, monkeypatch):
    """Another configuration's classifier run in the job's folder (e.g. of an earlier schedule) must not
    be resumed into this entry: the build trains in <out>/<key>."""
    import subprocess

    from scripts import main_job

    seen = []

    def fake_run(cmd, **kwargs):
        seen.append(next(c for c in cmd if c.startswith("hydra.run.dir=")).split("=", 1)[1])
        raise RuntimeError("stop before training")
    monkeypatch.setattr(subprocess, "run", fake_run)
    out = tmp_path / "classifier"
    with pytest.raises(RuntimeError, match="stop before training"):
        main_job.cached_noisy_classifier(out, [f"paths.cache_dir={tmp_path / 'cache'}"])
    entry_key = next((tmp_path / "cache" / "noisy_classifiers").glob("*.lock")).name.split("-")[1].split(".")[0]
    assert seen == [str(out / entry_key)]


def test_a_failed_task_of_the_guidance_stage_does_not_stop_the_others():
    from scripts.main_job import run_parallel

    def fail():
        raise ValueError("classifier of another schedule")
    results = run_parallel([(abs, -2), (fail,), (abs, -3)], jobs=1, keep_going=True)
    assert results[0] == 2 and isinstance(results[1], ValueError) and results[2] == 3
    with pytest.raises(ValueError):
        run_parallel([(fail,)], jobs=1)


def test_fid_against_nfe_table_is_the_mean_and_t_interval_over_seeds():
    """fid_vs_nfe_markdown: per family and sampler, the mean over seeds and the 95% Student-t
    half-width (scipy's t quantile as the reference)."""
    import numpy as np
    from scipy import stats

    from scripts.main_job import fid_vs_nfe_markdown

    fids = {10: [20.0, 24.0, 23.0], 20: [15.0, 16.0, 14.5]}
    points = [{"curve": "ddpm: DDIM (eta=1)", "label": f"ddpm DDIM (eta=1) @ {nfe}", "fid": fid, "seed": seed,
               "num_samples": 1000, "extractor": "classifier", "nfe": nfe}
              for nfe, values in fids.items() for seed, fid in enumerate(values)]
    row = next(line for line in fid_vs_nfe_markdown(points).splitlines() if line.startswith("| ddpm"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    for cell, values in zip(cells[1:3], fids.values()):
        half = stats.t.ppf(0.975, 2) * np.std(values, ddof=1) / np.sqrt(3)
        assert cell == f"{np.mean(values):.2f} ± {half:.2f}"
    assert cells[3] == "3"


def test_a_guidance_sweep_turns_the_other_guidance_off_unless_told(tmp_path):
    """A class-conditional DDPM samples with w = 1 by default (conditioning=class): a classifier
    sweep evaluates classifier guidance alone (w = 0), unless the sweep's sampler sets w itself."""
    from models.configs import compose
    from scripts.guidance_sweep import SCALE_KEYS, scale_config

    plain = compose("guidance_sweep", ["ckpt_path=x.ckpt", "guidance=classifier"], tmp_path)
    one = scale_config(plain, SCALE_KEYS["classifier"], 2.0, tmp_path)
    assert (one.sampler.classifier_scale, one.sampler.guidance_scale) == (2.0, 0.0)
    told = compose("guidance_sweep", ["ckpt_path=x.ckpt", "guidance=classifier", "sampler.guidance_scale=1"], tmp_path)
    assert scale_config(told, SCALE_KEYS["classifier"], 2.0, tmp_path).sampler.guidance_scale == 1.0
    free = scale_config(compose("guidance_sweep", ["ckpt_path=x.ckpt"], tmp_path), SCALE_KEYS["classifier_free"], 4.0,
                        tmp_path)
    assert (free.sampler.guidance_scale, free.sampler.classifier_scale) == (4.0, 0.0)
