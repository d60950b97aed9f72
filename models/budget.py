"""Training to a budget of training FLOPs.

The budget is turned into a number of training batches before the trainer is built:
FLOPs per image of the family's own training step (models/compute.py, counted on a probe batch of
the real data) x the global batch size is what one batch spends, and the run stops at the batch that
spends the budget (the first whose cumulative FLOPs reach it). Changing a width or a batch size
changes the batch count, not the budget. Evaluations can sit at fractions of the budget
(``milestones``), so that one run gives an FID-against-compute curve; schedules read the planned
length (:meth:`models.training_loop.TrainingLoopMixin.planned_batches`) so that warm-up, decay and
the EMA horizon scale with it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import pytorch_lightning as pl


class BudgetError(ValueError):
    """A budget setting that cannot be planned."""


@dataclass(frozen=True)
class BudgetPlan:
    train_flops: float                 # the budget
    flops_per_image: float             # one training step's FLOPs per image (forward + backward)
    global_batch_size: int             # images per batch over all processes
    batches: int                       # training batches that spend the budget
    milestone_batches: tuple[int, ...] = field(default=())   # batches after which an evaluation runs

    @property
    def flops_per_batch(self) -> float:
        return self.flops_per_image * self.global_batch_size

    def as_record(self) -> dict:
        return {"train_flops_budget": self.train_flops, "planned_batches": self.batches,
                "milestone_batches": list(self.milestone_batches)}


def check_budget_settings(train_flops, milestones: Sequence[float] | None) -> tuple[float | None, list[float]]:
    """(budget, milestones) checked before any work: a positive number of FLOPs (or null) and
    fractions in (0, 1]."""
    if train_flops is None:
        if milestones:
            raise BudgetError("budget.milestones are fractions of budget.train_flops, which is null: set "
                              "budget.train_flops=<FLOPs> (e.g. 3e11) or budget.milestones=[]")
        return None, []
    try:
        flops = float(train_flops)
    except (TypeError, ValueError):
        raise BudgetError(f"budget.train_flops must be a number of FLOPs (e.g. 3e11), got {train_flops!r}") from None
    if not math.isfinite(flops) or flops <= 0:
        raise BudgetError(f"budget.train_flops must be a positive number of FLOPs (e.g. 3e11), got {train_flops!r}")
    fractions = []
    for m in milestones or []:
        try:
            f = float(m)
        except (TypeError, ValueError):
            raise BudgetError(f"budget.milestones must be fractions of the budget in (0, 1], got {m!r}") from None
        if not 0 < f <= 1:
            raise BudgetError(f"budget.milestones must be fractions of the budget in (0, 1], got {m!r}")
        fractions.append(f)
    return flops, sorted(set(fractions))


def plan_budget(train_flops: float, flops_per_image: float, global_batch_size: int,
                milestones: Sequence[float] = ()) -> BudgetPlan:
    """The batch count that spends ``train_flops``: ceil(budget / FLOPs per batch), the batch whose
    cumulative FLOPs first reach the budget; each milestone f at batch ceil(f x batches)."""
    if flops_per_image <= 0:
        raise BudgetError("this family's training step counted 0 FLOPs, so a FLOP budget cannot be planned; "
                          "set trainer.max_steps instead of budget.train_flops")
    per_batch = flops_per_image * global_batch_size
    batches = max(1, math.ceil(train_flops / per_batch - 1e-9))
    marks = tuple(sorted({max(1, math.ceil(f * batches - 1e-9)) for f in milestones if f < 1}))
    return BudgetPlan(train_flops, flops_per_image, global_batch_size, batches, marks)


class BudgetStop(pl.Callback):
    """Stops training after the planned batch, whatever the optimizer steps per batch (a GAN with
    several critic steps takes a varying number); ``trainer.max_steps`` is set to an upper bound."""

    def __init__(self, batches: int):
        self.batches = int(batches)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if pl_module.batches_started >= self.batches:
            trainer.should_stop = True
