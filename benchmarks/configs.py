"""The real configs the benchmark measures: conf/ composed with the digits presets."""
from __future__ import annotations

from pathlib import Path

import hydra
import torch

from models.configs import compose

ROOT = Path(__file__).resolve().parents[1]


def compose_cfg(overrides: list[str]):
    return compose("train", overrides)


def build(family: str, device: torch.device, batch_size: int, overrides: tuple[str, ...] = ()):
    """(config, set-up datamodule, module on ``device``) of ``experiment=digits_<family>``."""
    cfg = compose_cfg([f"experiment=digits_{family}", f"datamodule.batch_size={batch_size}", "logger=none",
                       *overrides])
    dm = hydra.utils.instantiate(cfg.datamodule)
    dm.setup()
    model = hydra.utils.instantiate(cfg.model).to(device)
    return cfg, dm, model
