"""The progress bar: Lightning's Rich bar, showing the training losses without a host sync per step."""
from __future__ import annotations

import pytorch_lightning as pl
from pytorch_lightning.callbacks import RichProgressBar


class TrainingProgressBar(RichProgressBar):
    """Lightning's metrics plus ``pl_module.progress_scalars``: host copies of the training losses
    that :meth:`models.base.GenerativeModule.log_train` takes at logging steps.

    Why not ``self.log(..., prog_bar=True)``: Lightning keeps a value logged at one step in its
    result collection until the epoch ends and converts every progress-bar value to a Python number
    at every batch end, so a loss logged every 50 steps is still copied to the host after each of
    the 49 others: a device-to-host copy that waits for all queued GPU work, every step.
    """

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.update(getattr(pl_module, "progress_scalars", {}))
        return metrics
