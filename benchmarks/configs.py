"""The real configs the benchmark measures: conf/ composed with the digits presets."""
from __future__ import annotations

from pathlib import Path

import hydra
import torch
from hydra import compose, initialize_config_dir

import scripts  # noqa: F401  (registers the config resolvers)

ROOT = Path(__file__).resolve().parents[1]


def compose_cfg(overrides: list[str]):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


def build(family: str, device: torch.device, batch_size: int, overrides: tuple[str, ...] = ()):
    """(config, set-up datamodule, module on ``device``) of ``experiment=digits_<family>``."""
    cfg = compose_cfg([f"experiment=digits_{family}", f"datamodule.batch_size={batch_size}", "logger=none",
                       *overrides])
    dm = hydra.utils.instantiate(cfg.datamodule)
    dm.setup()
    model = hydra.utils.instantiate(cfg.model).to(device)
    return cfg, dm, model
