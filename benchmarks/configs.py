"""The real configs the benchmark measures: conf/ composed with the digits presets."""
from __future__ import annotations

from pathlib import Path

import hydra
import torch

from models.configs import CONF_DIR, compose

ROOT = Path(__file__).resolve().parents[1]



def family_overrides(family: str) -> list[str]:
    """The family on digits: its preset ``experiment=digits_<family>`` where conf/ has one, else its
    model config ``model=<family>`` on the default datamodule (a family without presets)."""
    if (CONF_DIR / "experiment" / f"digits_{family}.yaml").is_file():
        return [f"experiment=digits_{family}"]
    return [f"model={family}"]


def build(family: str, device: torch.device, batch_size: int, overrides: tuple[str, ...] = ()):
    """(config, set-up datamodule, module on ``device``) of the family on digits (:func:`family_overrides`)."""
    cfg = compose("train", [*family_overrides(family), f"datamodule.batch_size={batch_size}", "logger=none",
                       *overrides])
    dm = hydra.utils.instantiate(cfg.datamodule)
    dm.setup()
    model = hydra.utils.instantiate(cfg.model).to(device)
    return cfg, dm, model
