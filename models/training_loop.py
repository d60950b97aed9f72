"""Training-loop helpers every family's ``training_step`` uses: which steps log (the logging
gate) and the queued NaN/inf check.

Why a gate: each ``self.log`` is Lightning bookkeeping and each host copy is a pipeline stall on
a GPU, against a few milliseconds for a small network's whole step; logging only at Lightning's
``log_every_n_steps`` keeps both out of the other steps.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import pytorch_lightning as pl
import torch
from torch import Tensor


def attached_trainer(module: pl.LightningModule) -> pl.Trainer | None:
    """The module's trainer, or None outside a fit (Lightning's ``trainer`` property raises then)."""
    try:
        return module.trainer
    except RuntimeError:
        return None


class TrainingLoopMixin:
    """Mixed into :class:`models.base.GenerativeModule` (a LightningModule)."""

    #: optimizer steps (Lightning global steps) one batch may take: finds the last batch
    max_optimizer_steps_per_batch: int = 1

    def init_training_loop(self) -> None:
        #: training losses as host floats, taken at logging steps, for the progress bar
        self.progress_scalars: dict[str, float] = {}
        self._logging_step_key: tuple[int, int] | None = None
        self._logging_step = True
        #: per loss name, (step, loss on the device) of the steps since the last NaN check
        self._unchecked_losses: dict[str, list[tuple[int, Tensor]]] = {}
        #: training batches started in this run, across epochs and resumes (stored in checkpoints);
        #: counted here because Lightning's own count lives in its loops, which are not public API
        self.batches_started = 0
        self._in_batch = False

    #: the run's length in training batches when a FLOP budget planned it (scripts/train.py)
    budget_batches: int | None = None

    def planned_batches(self) -> int | None:
        """Training batches this run will take: the budget's plan, else ``trainer.max_steps`` over
        the optimizer steps a batch takes; None when unknown (outside a fit, or no step limit)."""
        if self.budget_batches:
            return int(self.budget_batches)
        trainer = attached_trainer(self)
        if trainer is None or trainer.max_steps is None or trainer.max_steps <= 0:
            return None
        return max(1, math.ceil(trainer.max_steps / self.max_optimizer_steps_per_batch))

    def current_batch_index(self) -> int:
        """The 0-based index of the batch under way, also when asked from a callback's
        ``on_train_batch_start`` (Lightning runs those before this module's hook counts the batch)."""
        return self.batches_started - 1 if self._in_batch else self.batches_started

    def on_train_batch_start(self, batch, batch_idx: int):
        self.batches_started += 1
        self._in_batch = True
        return super().on_train_batch_start(batch, batch_idx)

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        self._in_batch = False
        return super().on_train_batch_end(outputs, batch, batch_idx)

    def is_logging_step(self) -> bool:
        """The steps on which training scalars are logged and the NaN check synchronises: the
        first, every ``trainer.log_every_n_steps``-th batch (when Lightning writes its loggers) and
        the last. Decided once per batch, at its first call, so every call within a batch gets the
        same answer."""
        trainer = attached_trainer(self)
        if trainer is None:
            return True
        batch = self.current_batch_index()
        key = (id(trainer), batch)
        if self._logging_step_key != key:
            every = max(int(trainer.log_every_n_steps), 1)
            last = 0 < trainer.max_steps <= self.global_step + self.max_optimizer_steps_per_batch
            self._logging_step_key = key
            self._logging_step = batch == 0 or (batch + 1) % every == 0 or last
        return self._logging_step

    def log_train(self, scalars: dict[str, Tensor] | Callable[[], dict[str, Tensor]], batch_size: int,
                  prog_bar: Sequence[str] = ("train/loss",)) -> None:
        """Log training scalars on logging steps only. ``scalars`` may be a function returning
        them, so that scalars computed only for the log cost nothing on the other steps. The
        ``prog_bar`` ones are also copied to the host here, in one transfer, for
        :class:`models.progress.TrainingProgressBar` (Lightning's own progress-bar path would copy
        them again at every later step of the epoch)."""
        if not self.is_logging_step():
            return
        values = {name: value.detach() for name, value in (scalars() if callable(scalars) else scalars).items()}
        for name, value in values.items():
            self.log(name, value, on_step=True, on_epoch=False, batch_size=batch_size)
        shown = [name for name in values if name in prog_bar]
        if shown:
            host = torch.stack([values[name].float().reshape(()) for name in shown]).tolist()
            self.progress_scalars.update(zip(shown, host))

    def check_finite_loss(self, loss: Tensor, name: str = "loss") -> None:
        """Queue ``loss`` for the NaN/inf check, which runs at the next logging step or before the
        next checkpoint is written, whichever comes first, so a diverged model is never saved over
        the last good checkpoint. Queueing is free (no device op, no host sync); the check is one
        stacked ``isfinite``."""
        self._unchecked_losses.setdefault(name, []).append((self.global_step, loss.detach()))
        if self.is_logging_step():
            self.raise_on_nonfinite_loss()

    def raise_on_nonfinite_loss(self) -> None:
        """Stop on NaN/inf, on every rank at once (a rank raising alone would hang DDP)."""
        trainer = attached_trainer(self)
        for name in sorted(self._unchecked_losses):  # the same order on every rank
            queued = self._unchecked_losses[name]
            step = -1
            if queued:
                finite = torch.isfinite(torch.stack([loss.float().sum() for _, loss in queued]))
                bad = torch.nonzero(~finite).flatten().tolist()  # the host sync: logging steps and checkpoints only
                step = queued[bad[0]][0] if bad else -1
                queued.clear()
            bad = step >= 0
            if trainer is not None:
                bad = trainer.strategy.reduce_boolean_decision(bad, all=False)
            if bad:
                where = f"step {step}" if step >= 0 else "a step of another process"
                raise FloatingPointError(
                    f"non-finite training {name} at {where} of {type(self).__name__} (detected at step "
                    f"{self.global_step}): training stopped. The last good checkpoint is kept in the run's "
                    "checkpoints/ folder; lower the learning rate or enable gradient clipping, then resume "
                    "with ckpt_path=last.")
