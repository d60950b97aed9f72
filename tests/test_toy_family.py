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
