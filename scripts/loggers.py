"""Logger factories referenced from conf/logger/*.yaml."""
from __future__ import annotations

import logging
import netrc
import os
from pathlib import Path

from pytorch_lightning.loggers import WandbLogger

log = logging.getLogger(__name__)


def has_wandb_credentials() -> bool:
    """An API key in the environment or in ~/.netrc (what `wandb login` writes)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        auth = netrc.netrc().authenticators(os.environ.get("WANDB_BASE_URL", "api.wandb.ai").split("//")[-1])
        return bool(auth and auth[2])
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def resolve_wandb_mode(mode: str = "auto") -> str:
    """'online' only when asked for (or auto with credentials and WANDB_MODE not offline/disabled)."""
    if mode not in ("auto", "online", "offline"):
        raise ValueError(f"logger.wandb.mode must be auto, online or offline, got {mode!r}")
    if mode != "auto":
        return mode
    if os.environ.get("WANDB_MODE", "").lower() in ("offline", "dryrun", "disabled"):
        return "offline"
    return "online" if has_wandb_credentials() else "offline"


def wandb_logger(project: str, save_dir: str, group: str | None = None, name: str | None = None,
                 tags: list[str] | None = None, mode: str = "auto", **kwargs) -> WandbLogger:
    """A WandbLogger that never needs a network unless online mode was chosen.

    Offline runs are written to ``<save_dir>/wandb/offline-run-*`` and uploaded later with
    ``wandb sync <that folder>``.
    """
    mode = resolve_wandb_mode(mode)
    if mode == "offline":
        os.environ["WANDB_MODE"] = "offline"
        log.info("W&B runs offline (no credentials or WANDB_MODE=offline); sync later with "
                 "`wandb sync %s/wandb/offline-run-*`", save_dir)
    Path(save_dir).mkdir(parents=True, exist_ok=True)
    return WandbLogger(project=project, save_dir=save_dir, group=group, name=name, tags=list(tags or []),
                       offline=mode == "offline", log_model=False, **kwargs)
