"""Optimizer and learning-rate schedule construction shared by every family."""
from __future__ import annotations

from typing import Callable, Iterable

import torch


def linear_warmup(optimizer: torch.optim.Optimizer, warmup_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """lr(step) = lr * min(1, (step + 1) / warmup_steps): the warm-up of Ho et al. 2020 (5000 steps)."""
    warmup = max(int(warmup_steps), 0)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 1.0 if warmup == 0 else min(1.0, (step + 1) / warmup))


def build_optimizer(factory: Callable[..., torch.optim.Optimizer], params: Iterable,
                    warmup_steps: int = 0) -> dict:
    """Lightning's optimizer dict: a ``_partial_`` optimizer from the config plus a per-step warm-up."""
    optimizer = factory(params=params)
    return {"optimizer": optimizer,
            "lr_scheduler": {"scheduler": linear_warmup(optimizer, warmup_steps), "interval": "step"}}
