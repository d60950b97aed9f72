"""scripts/benchmark.py runs and writes comparable figures (no timing assertions: targets live in
the benchmark output, not in tests)."""
import json

import pytest

from models.registry import families, family_class
from scripts.benchmark import main

#: every registered family (models/registry.py)
FAMILIES = list(families())


def test_benchmark_writes_json_and_markdown(tmp_path, shared_cache):
    main(["--quick", "--families", "gan", "--fid-dim", "128", "--sample-n", "4", "--out", str(tmp_path),
          "--cache-dir", str(shared_cache), "--fast-paths", "fused Adam", "--fast-repeats", "1", "--batches", "4"])
    result = json.loads((tmp_path / "benchmark.json").read_text())
    (row,) = result["training"]
    assert row["family"] == "gan" and row["genbench_img_s"] > 0 and row["bare_img_s"] > 0
    assert result["fid_vs_sqrtm"]["rel_diff"] < 1e-6
    assert result["evaluation"]["extractor_passes_per_image"] == 1.0
    assert result["evaluation"]["real_image_passes_first"] > 0      # a cold reference cache ...
    assert result["evaluation"]["real_image_passes_second"] == 0    # ... then none
    head, default, fused = result["fast_paths"]
    assert head["gflop_per_image"] > 0 and default["vs_default"] == 1.0 and fused["img_s"] > 0
    assert fused["method"] == "interleaved" and len(fused["ratio_to_bare"]) == 1
    assert [s["nfe"] for s in result["sampling"]] == [1000, 100, 50, 20, 10]
    assert "| gan |" in (tmp_path / "benchmark.md").read_text()


def test_benchmark_training_only_at_another_size_with_the_allocator_row(tmp_path):
    """--image-size reaches both loops; --training-only stops after the training tables; the
    allocator switch and its default are measured in fresh interpreters."""
    main(["--families", "gan", "--image-size", "16", "--training-only", "--repeats", "1", "--batches", "3",
          "--fast-paths", "glibc malloc defaults (cpu_malloc_cache=false)", "--fast-family", "gan",
          "--fast-repeats", "1", "--out", str(tmp_path)])
    result = json.loads((tmp_path / "benchmark.json").read_text())
    assert result["settings"]["image_size"] == 16 and "fid_vs_sqrtm" not in result and "sampling" not in result
    head, default, malloc_row = result["fast_paths"]
    assert malloc_row["overrides"] == ["callbacks.fast_paths.cpu_malloc_cache=false"]
    assert len(malloc_row["default_fresh_process"]) == 1 and malloc_row["img_s"] > 0
    md = (tmp_path / "benchmark.md").read_text()
    assert "digits at 16x16" in md and "FID at" not in md


def test_interleaved_measurement_runs_one_bare_step_per_genbench_batch_as_plain_pytorch(monkeypatch):
    """Each genbench batch starts with one bare step, run without the NVML flag Lightning's import
    sets (a script importing only torch has none); the flag is back for genbench's own step."""
    import os

    import pytorch_lightning as pl
    import torch

    from benchmarks import training
    from models.fast_paths import NVML_CHECK_FLAG

    monkeypatch.setenv(NVML_CHECK_FLAG, "1")
    seen_by_bare, seen_by_genbench = [], []
    paired = training.InterleavedBareStep(lambda: seen_by_bare.append(os.environ.get(NVML_CHECK_FLAG)), warmup=1)

    class Watch(pl.Callback):
        def on_train_batch_end(self, *args):
            seen_by_genbench.append(os.environ.get(NVML_CHECK_FLAG))

    training.fit_genbench("vae", torch.device("cpu"), 16, 4, ("callbacks.fast_paths.skip_missing_nvml=false",),
                          [paired, Watch()])
    assert seen_by_bare == [None] * 4 and seen_by_genbench == ["1"] * 4
    bare, ours = paired.step_times()
    assert len(bare) == len(ours) == 3 and (bare > 0).all() and (ours > 0).all()


def test_bare_loop_iterates_the_training_loader_epoch_after_epoch():
    import itertools

    import torch

    from benchmarks.bare_loop import bare_batches
    from benchmarks.configs import build

    _, dm, _ = build("gan", torch.device("cpu"), 128)
    per_epoch = len(dm.train_dataloader())
    batches = list(itertools.islice(bare_batches(dm, torch.device("cpu")), per_epoch + 1))
    loader = dm.train_dataloader()
    loader.sampler.set_epoch(1)
    epoch_one_first = next(iter(loader))[0]                    # the loader's own order at epoch 1 ...
    assert torch.equal(batches[per_epoch], epoch_one_first)    # ... is where the bare loop continues
    assert not torch.equal(batches[0], batches[per_epoch])     # a new shuffle, not a replay of epoch 0


def test_fast_path_table_compares_switches_through_the_default_bare_clock(monkeypatch):
    """On the CPU every switch runs beside the default bare loop (never beside a bare loop with the
    switch's overrides) and vs_default = ratio(switch) / ratio(default) of the same round."""
    import torch

    from benchmarks import fast_paths, training

    calls = []
    ratios = {(): [0.9, 0.8], ("model.g_optimizer.fused=true",): [0.99, 0.96]}   # per round

    def fake_interleaved(family, device, batch_size, batches, overrides, warmup, bare_overrides):
        calls.append((overrides, bare_overrides))
        switch = tuple(o for o in overrides if o != "datamodule.image_size=16")
        ratio = ratios[switch][sum(1 for o, _ in calls if o == overrides) - 1]
        return {"bare_img_s": 1000.0, "genbench_img_s": 1000.0 * ratio, "ratio": ratio}

    monkeypatch.setattr(training, "interleaved_throughput", fake_interleaved)
    monkeypatch.setattr(fast_paths, "training_flops_per_image", lambda *a: 1e9)
    data = ("datamodule.image_size=16",)
    head, default, fused = fast_paths.fast_path_table("gan", torch.device("cpu"), 8, 2, 2, ["default", "fused Adam"],
                                                      None, data)
    assert {bare for _, bare in calls} == {data}
    assert fused["vs_default"] == pytest.approx(((0.99 / 0.9) + (0.96 / 0.8)) / 2)
    assert default["vs_default"] == 1.0 and fused["ratio_to_bare"] == [0.99, 0.96]
    assert fused["overrides"] == ["model.g_optimizer.fused=true"]   # the GAN's optimizers (D's interpolates G's)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_fast_path_switch_composes_for_every_family(family):
    """Each switch that applies to the family (all but the EMA one for a family that keeps no EMA,
    such as the VAE and RealNVP) composes with the family's config (the GAN's optimizers are
    g_optimizer and d_optimizer) and reaches it."""
    import inspect

    from omegaconf import OmegaConf

    from models.configs import compose
    from benchmarks.fast_paths import FAST_PATHS, applicable_switches, switch_overrides

    names = applicable_switches(family, list(FAST_PATHS))
    ema = "per-tensor EMA (ema_foreach=false)"
    keeps_ema = "ema_foreach" in inspect.signature(family_class(family).__init__).parameters
    assert set(FAST_PATHS) - set(names) == (set() if keeps_ema else {ema})
    for name in names:
        overrides = switch_overrides(family, name)
        cfg = compose("train", [f"experiment=digits_{family}", *overrides])
        for override in overrides:
            key, value = override.split("=", 1)
            assert str(OmegaConf.select(cfg, key)).lower() == value.lower(), (name, override)
    if family == "gan":
        cfg = compose("train", ["experiment=digits_gan", *switch_overrides("gan", "fused Adam")])
        assert cfg.model.d_optimizer.fused is True


def test_fast_path_table_skips_switches_the_family_has_no_key_for(monkeypatch):
    """The VAE keeps no EMA: its table measures the rest instead of stopping at a Hydra error."""
    import torch

    from benchmarks import fast_paths, training

    measured = []
    monkeypatch.setattr(training, "interleaved_throughput", lambda family, device, batch_size, batches, overrides,
                        warmup, bare_overrides: measured.append(overrides) or
                        {"bare_img_s": 1.0, "genbench_img_s": 1.0, "ratio": 1.0})
    monkeypatch.setattr(fast_paths, "training_flops_per_image", lambda *a: 1e9)
    head, *rows = fast_paths.fast_path_table("vae", torch.device("cpu"), 8, 2, 1,
                                             ["default", "per-tensor EMA (ema_foreach=false)", "fused Adam"], None)
    assert [r["fast_path"] for r in rows] == ["default", "fused Adam"]
    assert measured == [(), ("model.optimizer.fused=true",)]


@pytest.mark.parametrize("family", FAMILIES)
def test_bare_loop_calls_the_modules_own_loss_functions(family, monkeypatch):
    """The bare loop and Lightning's training_step call the same loss functions of the module (so
    the two loops cannot drift apart); and one bare step updates the weights like a training step."""
    import torch

    from benchmarks.bare_loop import bare_step_fn
    from benchmarks.configs import build

    from models.base import GenerativeModule

    _, dm, model = build(family, torch.device("cpu"), 16)
    # the loss functions the family itself defines (its training_step calls them)
    names = [n for n in ("training_loss", "discriminator_step_loss", "generator_step_loss")
             if getattr(type(model), n, None) not in (None, getattr(GenerativeModule, n, None))]
    called = []
    for name in names:
        real = getattr(model, name)
        monkeypatch.setattr(model, name, lambda *a, _real=real, _name=name, **k: called.append(_name) or _real(*a, **k))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    bare_step_fn(model)(next(iter(dm.train_dataloader()))[0])
    assert called == names and names
    changed = [k for k, v in model.state_dict().items() if v.is_floating_point() and not torch.equal(v, before[k])]
    assert changed and (not hasattr(model, "ema") or any(k.startswith("ema.") for k in changed))
