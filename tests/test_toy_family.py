"""The family registry's promise: a family defined outside genbench (tests/toy_family.py, with its
model config tests/conf/model/toy_gaussian.yaml on Hydra's search path) trains, evaluates, joins
the table, runs in the benchmark's bare loop and has its compute counted, without any list in
genbench naming it."""
from __future__ import annotations

import pytest
import torch

from conftest import ROOT

from models.configs import compose

SEARCH_PATH = f"hydra.searchpath=[file://{ROOT / 'tests' / 'conf'}]"


@pytest.fixture
def toy_registered(monkeypatch):
    """The toy family registered for this test only (other tests iterate over the registry)."""
    from models import registry

    monkeypatch.setattr(registry, "_FAMILIES", dict(registry._FAMILIES))
    import toy_family

    registry.register(toy_family.ToyGaussian)
    return toy_family.ToyGaussian


def test_a_toy_family_goes_through_every_stage_without_editing_a_list(toy_registered, tmp_path, shared_cache):
    from benchmarks.bare_loop import bare_loop
    from metrics.report import build_table, collect_local, to_markdown
    from metrics.results import read_results
    from models.registry import families
    from scripts.evaluate import evaluate
    from scripts.train import train

    assert families()["toy_gaussian"] is toy_registered
    base = [SEARCH_PATH, "model=toy_gaussian", "logger=csv", "callbacks.progress_bar=null",
            f"paths.cache_dir={shared_cache}", "evaluation.final_extractors=[]", "evaluation.every_n_steps=0",
            "evaluation.num_samples=64", "evaluation.bpd_num_images=16", "evaluation.grid_size=16",
            "datamodule.batch_size=32"]
    train(compose("train", [*base, "trainer.max_steps=40"], tmp_path / "run"))
    trained = read_results(tmp_path / "run" / "results.json")
    assert trained["status"] == "ok" and trained["model"] == "toy_gaussian" and trained["train_steps"] == 40
    # the compute count: forward W 1 (2 FLOPs per output) and its weight gradient (2 more), per dimension
    dims = 64
    assert trained["flops_per_image"] == pytest.approx(4 * dims)
    assert trained["train_flops"] == pytest.approx(4 * dims * 40 * 32)
    assert trained["likelihood_kind"] == "dequantized" and 0 < trained["metrics"]["bpd"] < 20   # plumbing, not learning

    evaluated = evaluate(compose("eval", [SEARCH_PATH, f"ckpt_path={tmp_path / 'run' / 'checkpoints' / 'last.ckpt'}",
                                        f"paths.cache_dir={shared_cache}", "evaluation.num_samples=64",
                                        "evaluation.bpd_num_images=16", "evaluation.final_extractors=[]"],
                                       tmp_path / "eval"))
    assert evaluated["model"] == "toy_gaussian" and evaluated["metrics"]["nfe"] == 1.0

    table = build_table(collect_local([tmp_path / "run"]))
    assert [row["model"] for row in table.rows] == ["toy_gaussian"] and "bpd" in table.rows[0]
    assert "toy_gaussian" in to_markdown(table)

    # the benchmark's bare loop: the family's own loss terms and optimizer, plain PyTorch
    step = bare_loop("toy_gaussian", torch.device("cpu"), 16, (SEARCH_PATH,))
    for _ in range(3):
        step()


def test_a_second_class_cannot_take_a_registered_familys_name(monkeypatch):
    """Two classes claiming "ddpm" would make the registry's answer depend on import order."""
    from models import registry
    from models.base import GenerativeModule

    monkeypatch.setattr(registry, "_FAMILIES", dict(registry._FAMILIES))
    registry.families()
    with pytest.raises(ValueError, match="family 'ddpm' is already models.ddpm.DDPM"):
        type("Impostor", (GenerativeModule,), {"family": "ddpm"})
    with pytest.raises(ValueError, match="unknown family 'nope'"):
        registry.family_class("nope")


def test_the_likelihood_table_is_the_mean_and_t_interval_and_refuses_a_malformed_estimator():
    """scripts/likelihood_table.py: each estimator's row over seeds (scipy's t quantile as the
    reference); a --estimator it cannot read stops with the form it expects, before any work."""
    import numpy as np
    from scipy import stats

    from scripts.likelihood_table import markdown, parse_estimator

    values = [5.0, 5.2, 4.9]
    rows = {"ddpm": {"_seeds": [0, 1, 2], "elbo": {str(i): {"bpd": v, "seconds": 1.0} for i, v in enumerate(values)}},
            "gan": {"_seeds": [0]}}
    text = markdown(rows, 8)
    half = stats.t.ppf(0.975, 2) * np.std(values, ddof=1) / np.sqrt(3)
    assert f"| ddpm | elbo | {np.mean(values):.3f} ± {half:.3f} | 3 |" in text
    assert "| gan | none (no likelihood) | – | 1 | – |" in text
    assert parse_estimator("ddpm/k10:likelihood.kind=ode,likelihood.start_step=10") == \
        ("ddpm", "k10", {"likelihood.kind": "ode", "likelihood.start_step": "10"})
    with pytest.raises(SystemExit, match="FAMILY/LABEL:key=value"):
        parse_estimator("ddpm:likelihood.kind")
