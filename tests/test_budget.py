"""Training to a FLOP budget: the run stops at the batch that spends it whatever the width or batch
size, milestones are evaluated once (also across a resume), and schedules scale with the run."""
from __future__ import annotations

import json
import math

import pytest
import pytorch_lightning as pl
import torch

from models.configs import compose


class InterruptAt(pl.Callback):
    """Stops a run with an error at the end of one batch, after the evaluation callback ran and
    before that batch's checkpoint is written (Lightning runs checkpoint callbacks last)."""

    def __init__(self, batch: int):
        self.batch = batch

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if pl_module.batches_started == self.batch:
            raise RuntimeError(f"interrupted at batch {self.batch}")


def test_plan_spends_the_budget_at_the_first_batch_that_reaches_it():
    from models.budget import plan_budget

    plan = plan_budget(1e9, flops_per_image=1e6, global_batch_size=64, milestones=[0.25, 0.5, 1.0])
    assert plan.batches == math.ceil(1e9 / 64e6) == 16
    assert (plan.batches - 1) * plan.flops_per_batch < 1e9 <= plan.batches * plan.flops_per_batch
    assert plan.milestone_batches == (4, 8)        # the end is the final evaluation's
    assert plan_budget(64e6 * 3, 1e6, 64).batches == 3                    # exactly spent: no extra batch


@pytest.mark.parametrize("train_flops, milestones, message", [
    ("lots", [], "must be a number of FLOPs"), (-1, [], "positive"), (1e9, [1.5], r"fractions of the budget in \(0, 1\]"),
    (None, [0.5], "budget.train_flops, which is null")])
def test_bad_budget_settings_are_refused_before_any_work(tmp_path, smoke_overrides, train_flops, milestones, message):
    from models.budget import BudgetError
    from scripts.train import train

    overrides = [*smoke_overrides, f"budget.train_flops={'null' if train_flops is None else train_flops}",
                 f"budget.milestones=[{','.join(map(str, milestones))}]"]
    with pytest.raises(BudgetError, match=message):
        train(compose("train", overrides, tmp_path))
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.parametrize("family, variants", [
    ("ddpm", [["model.net.base_channels=16", "model.net.norm_groups=16", "datamodule.batch_size=64"],
              ["model.net.base_channels=32", "datamodule.batch_size=128"]]),
    ("gan", [["datamodule.batch_size=64"], ["datamodule.batch_size=32", "model.generator.base_channels=32"]]),
])
def test_a_changed_width_or_batch_size_still_spends_the_budget_to_within_one_step(tmp_path, smoke_overrides, family,
                                                                                 variants):
    from scripts.train import train

    budget = 2e10
    for i, variant in enumerate(variants):
        out = tmp_path / str(i)
        train(compose("train", [*smoke_overrides, f"model={family}", f"budget.train_flops={budget}",
                             "evaluation.num_samples=8", "evaluation.bpd_num_images=0", "trainer.max_steps=5",
                             *variant], out))
        results = json.loads((out / "results.json").read_text())
        per_batch = results["flops_per_image"] * results["config"]["datamodule"]["batch_size"]
        assert results["budget"]["planned_batches"] * per_batch == pytest.approx(results["train_flops"])
        assert budget <= results["train_flops"] < budget + per_batch, results     # within one step
        assert results["config"]["trainer"]["max_steps"] != 5                     # the budget decided


def test_each_milestone_is_evaluated_once_also_across_a_resume(tmp_path, smoke_overrides, monkeypatch):
    """Interrupted right after the milestone at batch 4 was evaluated but before that batch's
    checkpoint: the resumed run re-trains batch 4 without evaluating it again."""
    from models.budget import plan_budget
    from models.compute import training_flops_per_image
    import scripts.train as train_script

    overrides = [*smoke_overrides, "model.net.base_channels=16", "model.net.norm_groups=16",
                 "datamodule.batch_size=16", "evaluation.num_samples=8", "evaluation.bpd_num_images=0",
                 "callbacks.model_checkpoint.every_n_train_steps=1", "budget.milestones=[0.25,0.5,0.75]"]
    cfg = compose("train", [*overrides, "budget.train_flops=1"], tmp_path / "probe")
    import hydra
    model = hydra.utils.instantiate(cfg.model)
    dm = hydra.utils.instantiate(cfg.datamodule)
    images = torch.stack([dm.split("train")[i][0] for i in range(2)])
    per_image = training_flops_per_image(model, images, torch.zeros(2, dtype=torch.long))
    budget = 8 * 16 * per_image                                   # exactly 8 batches of 16
    assert plan_budget(budget, per_image, 16, [0.25, 0.5, 0.75]).milestone_batches == (2, 4, 6)

    out = tmp_path / "run"
    real_instantiate_group = train_script.instantiate_group
    monkeypatch.setattr(train_script, "instantiate_group",
                        lambda group: real_instantiate_group(group) + ([InterruptAt(4)] if group is not None
                                                                       and "model_checkpoint" in group else []))
    with pytest.raises(RuntimeError, match="interrupted at batch 4"):
        train_script.train(compose("train", [*overrides, f"budget.train_flops={budget}"], out))
    monkeypatch.setattr(train_script, "instantiate_group", real_instantiate_group)
    assert (out / "checkpoints" / "last.ckpt").is_file()
    train_script.train(compose("train", [*overrides, f"budget.train_flops={budget}"], out))   # resumes from batch 3
    history = [json.loads(line) for line in (out / "eval_history.jsonl").read_text().splitlines()]
    milestones = [h["milestone_batch"] for h in history if h.get("milestone_batch") is not None]
    assert milestones == [2, 4, 6], history                       # each once, in order
    assert [h["batches"] for h in history if h["final"]] == [8]
    results = json.loads((out / "results.json").read_text())
    assert results["status"] == "ok" and results["budget"]["planned_batches"] == 8


def test_warmup_and_decay_scale_with_the_planned_run():
    from models.optim import build_optimizer, lr_factor, warmup_length

    assert warmup_length(100, 0.1, planned_batches=96) == 10          # not 100 steps of a 96-step run
    assert warmup_length(100, None, planned_batches=1000) == 100
    with pytest.raises(ValueError, match="trainer.max_steps or budget.train_flops"):
        warmup_length(0, 0.1, planned_batches=None)
    assert lr_factor(9, 10) == 1.0 and lr_factor(4, 10) == pytest.approx(0.5)
    assert lr_factor(10, 10, "cosine", 110) == pytest.approx(1.0)
    assert lr_factor(60, 10, "cosine", 110) == pytest.approx(0.5)      # half way through the decay
    assert lr_factor(110, 10, "cosine", 110) == pytest.approx(0.0, abs=1e-12)
    param = torch.nn.Parameter(torch.zeros(1))
    sched = build_optimizer(lambda params: torch.optim.SGD(params, lr=1.0), [param], 0, 0.25, "cosine", 8)
    optimizer, scheduler = sched["optimizer"], sched["lr_scheduler"]["scheduler"]
    lrs = []
    for _ in range(8):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[0] == pytest.approx(0.5) and lrs[1] == pytest.approx(1.0) and lrs[-1] < 0.1


def test_ema_half_life_grows_with_the_run():
    """EDM's ramp-up: the half-life is at most r x (updates so far), capped by the fixed decay."""
    from models.components.ema import EMA

    ema = EMA(torch.nn.Linear(1, 1), decay=0.999, rampup=0.1)
    for n, expected in ((0, 0.5 ** 10), (99, 0.5 ** (1 / 10)), (10**6, 0.999)):
        ema._host_updates = n
        assert ema.current_decay() == pytest.approx(expected)
    with pytest.raises(ValueError, match="ema_rampup"):
        EMA(torch.nn.Linear(1, 1), rampup=0)
