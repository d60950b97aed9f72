"""The training compute of a run as a Lightning callback: images trained times the FLOPs per image
of the family's training step (models/compute.py), for results.json's ``train_flops``."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytorch_lightning as pl

from metrics.results import write_json
from models.compute import training_flops_per_image

COMPUTE_FILE = "compute.json"

log = logging.getLogger(__name__)


class ComputeTracker(pl.Callback):
    """Counts the images a run trains on and the FLOPs per image of its training step; their
    product is the run's training budget (``train_flops`` in results.json). Survives resume."""

    def __init__(self):
        self.flops_per_image: float | None = None
        self.train_images = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.flops_per_image is None:
            try:
                self.flops_per_image = training_flops_per_image(pl_module, batch[0], batch[1])
            except NotImplementedError as err:   # a family without training_loss: no budget, no failure
                log.warning("training compute not counted: %s", err)
                self.flops_per_image = 0.0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.train_images += int(batch[0].shape[0]) * trainer.world_size

    def state_dict(self) -> dict:
        return {"flops_per_image": self.flops_per_image, "train_images": self.train_images}

    def load_state_dict(self, state_dict: dict) -> None:
        self.flops_per_image = state_dict.get("flops_per_image")
        self.train_images = int(state_dict.get("train_images", 0))

    def on_train_end(self, trainer, pl_module) -> None:
        # read back by train() when training ran in forked/spawned processes (their counts stay there)
        if trainer.is_global_zero:
            write_json(Path(trainer.default_root_dir) / COMPUTE_FILE, self.record())

    def record(self, output_dir: str | Path | None = None) -> dict:
        """{"flops_per_image", "train_images", "train_flops"} for results.json; from the file rank 0
        wrote in ``output_dir`` when this process did not train itself."""
        file = Path(output_dir) / COMPUTE_FILE if output_dir is not None else None
        if self.train_images == 0 and file is not None and file.is_file():
            return json.loads(file.read_text())
        per = self.flops_per_image or 0.0
        return {"flops_per_image": per, "train_images": self.train_images, "train_flops": per * self.train_images}
