"""genbench's Hydra configs (conf/) from Python: the one way to compose a preset.

    from models.configs import compose
    cfg = compose("train", ["experiment=adm_imagenet64_cond"])     # what scripts/train.py would see
    model = hydra.utils.instantiate(cfg.model)

Importing this module (or anything under ``models``) registers the OmegaConf resolvers the configs
use, so a config composed with Hydra's own ``compose`` resolves too.
"""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Sequence

from omegaconf import DictConfig, OmegaConf, open_dict

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
_COMPOSING = threading.Lock()


def register_resolvers() -> None:
    """The configs' resolvers (idempotent)."""
    # ${div:a,b} = a // b, e.g. attention at half the image size: ${div:${datamodule.image_size},2}
    OmegaConf.register_new_resolver("div", lambda a, b: int(a) // int(b), replace=True)
    # ${positive:x} = x > 0, e.g. a null class exactly when labels are dropped: ${positive:${..label_dropout}}
    OmegaConf.register_new_resolver("positive", lambda x: float(x) > 0, replace=True)


register_resolvers()


def compose(config_name: str = "train", overrides: Sequence[str] = (), output_dir: str | Path | None = None,
            keep_hydra: bool = False) -> DictConfig:
    """The config ``python scripts/<config_name>.py <overrides>`` would see (train, eval,
    guidance_sweep, ...), with its run directory at ``output_dir`` when given. ``keep_hydra``
    keeps the ``hydra`` section (launcher settings); it is dropped otherwise, as in a run."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    with _COMPOSING:  # Hydra's global state: one composition at a time (the main job composes in threads)
        if GlobalHydra.instance().is_initialized():  # e.g. a notebook that initialized Hydra itself
            GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = hydra_compose(config_name=config_name, overrides=list(overrides), return_hydra_config=True)
            HydraConfig.instance().set_config(cfg)  # ${hydra:...} interpolations resolve as in a run
    with open_dict(cfg):
        if output_dir is not None:
            cfg.paths.output_dir = str(output_dir)
        if not keep_hydra:
            del cfg["hydra"]
    return cfg
