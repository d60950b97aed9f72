"""Optimizer and learning-rate schedule construction shared by every family.

Schedules can be set relative to the run's length (``warmup_fraction``, ``lr_decay``), which is
the planned number of training batches (a FLOP budget's, or ``trainer.max_steps``'s): a short
budget then never leaves the warm-up longer than the run.
"""
from __future__ import annotations

import logging
import math
from typing import Callable, Iterable

import torch

log = logging.getLogger(__name__)
LR_DECAYS = ("constant", "cosine")


def warmup_length(warmup_steps: int, warmup_fraction: float | None, planned_batches: int | None) -> int:
    """Warm-up steps: ``warmup_fraction`` of the planned run when given, else ``warmup_steps``."""
    if warmup_fraction is not None:
        if not 0 <= float(warmup_fraction) < 1:
            raise ValueError(f"model.warmup_fraction must be in [0, 1), got {warmup_fraction}")
        if planned_batches is None:
            raise ValueError("model.warmup_fraction is a fraction of the run, whose length is unknown: set "
                             "trainer.max_steps or budget.train_flops")
        return int(round(float(warmup_fraction) * planned_batches))
    if planned_batches is not None and warmup_steps >= planned_batches:
        log.warning("model.warmup_steps=%d is not shorter than the run's %d training batches: the learning rate "
                    "never reaches its value; use model.warmup_fraction (e.g. 0.1) to scale it with the run",
                    warmup_steps, planned_batches)
    return max(int(warmup_steps), 0)


def lr_factor(step: int, warmup: int, decay: str = "constant", total: int | None = None) -> float:
    """lr(step) / lr: linear warm-up min(1, (step + 1) / warmup) (Ho et al. 2020), then constant or a
    cosine decay to 0 at the planned end of the run (Loshchilov & Hutter 2017, no restarts)."""
    rise = 1.0 if warmup == 0 else min(1.0, (step + 1) / warmup)
    if decay == "constant" or total is None or step < warmup:
        return rise
    progress = min(1.0, (step - warmup) / max(total - warmup, 1))
    return rise * 0.5 * (1.0 + math.cos(math.pi * progress))


def linear_warmup(optimizer: torch.optim.Optimizer, warmup_steps: int, decay: str = "constant",
                  total: int | None = None) -> torch.optim.lr_scheduler.LambdaLR:
    """The per-step schedule of :func:`lr_factor`."""
    warmup = max(int(warmup_steps), 0)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, warmup, decay, total))


def build_optimizer(factory: Callable[..., torch.optim.Optimizer], params: Iterable,
                    warmup_steps: int = 0, warmup_fraction: float | None = None, lr_decay: str = "constant",
                    planned_batches: int | None = None) -> dict:
    """Lightning's optimizer dict: a ``_partial_`` optimizer from the config plus a per-step
    schedule (warm-up, then constant or cosine decay over the planned run)."""
    if lr_decay not in LR_DECAYS:
        raise ValueError(f"model.lr_decay must be one of {LR_DECAYS}, got {lr_decay!r}")
    if lr_decay != "constant" and planned_batches is None:
        raise ValueError(f"model.lr_decay={lr_decay} decays over the run, whose length is unknown: set "
                         "trainer.max_steps or budget.train_flops")
    optimizer = factory(params=params)
    warmup = warmup_length(warmup_steps, warmup_fraction, planned_batches)
    return {"optimizer": optimizer,
            "lr_scheduler": {"scheduler": linear_warmup(optimizer, warmup, lr_decay, planned_batches),
                             "interval": "step"}}
