"""Checking a checkpoint file before anything is built from it."""
from __future__ import annotations

from pathlib import Path

import torch


class CheckpointError(RuntimeError):
    """A checkpoint that was asked for cannot be used."""


def check_checkpoint(path: Path) -> Path:
    """Fail early, with the fix, on a missing or unreadable checkpoint."""
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; pass ckpt_path=null to start fresh "
                              "or point ckpt_path to an existing .ckpt file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # truncated zip, pickle errors, ...
        raise CheckpointError(f"checkpoint {path} is corrupt or not a checkpoint ({type(err).__name__}: {err}); "
                              "delete it and resume from an earlier one in the same folder, or pass ckpt_path=null") from err
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise CheckpointError(f"{path} holds no Lightning state_dict; it is not a training checkpoint")
    return path


def load_module(ckpt_path: str | Path, device: torch.device | str = "cpu"):
    """(module in eval mode, run config, checkpoint dict) rebuilt from a checkpoint that
    scripts/train.py wrote: the stored run config builds the module, the state dict fills it."""
    import hydra
    from omegaconf import OmegaConf

    path = check_checkpoint(Path(ckpt_path))
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    run_config = ckpt.get("genbench_config")
    if not run_config:
        raise CheckpointError(f"{path} carries no genbench run config; it was not written by scripts/train.py")
    cfg = OmegaConf.create(run_config)
    module = hydra.utils.instantiate(cfg.model)
    module.load_state_dict(ckpt["state_dict"])
    module.run_config = run_config
    return module.to(device).eval(), cfg, ckpt
