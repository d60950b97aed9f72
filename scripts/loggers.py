"""Logger factories referenced from conf/logger/*.yaml, the W&B run of an evaluation outside
training, and the wandb-osh callback that syncs offline runs while training goes on."""
from __future__ import annotations

import logging
import netrc
import os
from pathlib import Path

from pytorch_lightning import Callback
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


def _offline_notice(mode: str, save_dir: str) -> None:
    if mode == "offline":
        os.environ["WANDB_MODE"] = "offline"
        log.info("W&B runs offline (no credentials or WANDB_MODE=offline); sync later with "
                 "`wandb sync %s/wandb/offline-run-*` (or scripts/sync.py for a whole sweep)", save_dir)
    Path(save_dir).mkdir(parents=True, exist_ok=True)


def wandb_logger(project: str, save_dir: str, group: str | None = None, name: str | None = None,
                 tags: list[str] | None = None, mode: str = "auto", **kwargs) -> WandbLogger:
    """A WandbLogger that never needs a network unless online mode was chosen.

    Offline runs are written to ``<save_dir>/wandb/offline-run-*`` and uploaded later with
    ``wandb sync <that folder>`` (scripts/sync.py: a whole sweep), or while training goes on by
    wandb-osh (:class:`WandbOfflineSync`).
    """
    mode = resolve_wandb_mode(mode)
    _offline_notice(mode, save_dir)
    return WandbLogger(project=project, save_dir=save_dir, group=group, name=name, tags=list(tags or []),
                       offline=mode == "offline", log_model=False, **kwargs)


class WandbOfflineSync(Callback):
    """Offline W&B runs on compute nodes without internet, synced while training goes on: every
    ``every_n_steps`` optimizer steps and at the end, rank 0 leaves a command file for the run in
    ``communication_dir`` (a shared file system); the ``wandb-osh`` process on a node with internet
    (a login node) watches that folder and runs ``wandb sync`` for it (wandb-osh, the kept library
    for this; README: SLURM). ``enabled: false`` (the default) does nothing."""

    def __init__(self, enabled: bool = False, every_n_steps: int = 500,
                 communication_dir: str = "~/.wandb_osh_command_dir"):
        super().__init__()
        self.enabled, self.every_n_steps = bool(enabled), int(every_n_steps)
        self.communication_dir = Path(os.path.expanduser(communication_dir))
        self._hook = None
        self._last = 0

    def _run_dirs(self, trainer) -> list[Path]:
        # run.dir is <run>/files; wandb sync takes <run>
        return [Path(lg.experiment.dir).parent for lg in trainer.loggers if isinstance(lg, WandbLogger)
                and getattr(lg.experiment, "dir", None)]

    def trigger(self, trainer) -> None:
        if not (self.enabled and trainer.is_global_zero):
            return
        if self._hook is None:
            from wandb_osh.hooks import TriggerWandbSyncHook
            self._hook = TriggerWandbSyncHook(communication_dir=self.communication_dir)
        for run_dir in self._run_dirs(trainer):
            self._hook(run_dir)

    def on_train_start(self, trainer, pl_module) -> None:
        self._last = trainer.global_step   # a resumed run asks at the next multiple, not at once

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        step = trainer.global_step
        if self.every_n_steps > 0 and step // self.every_n_steps > self._last // self.every_n_steps:
            self.trigger(trainer)
        self._last = step

    def on_train_end(self, trainer, pl_module) -> None:
        self.trigger(trainer)


def log_results_run(results: dict, project: str, save_dir: str, group: str | None = None,
                    tags: list[str] | None = None, mode: str = "auto", grid=None) -> None:
    """One W&B run for an evaluation outside training (scripts/evaluate.py, the guidance sweep):
    config = the run's filter keys, summary = its metrics as ``eval/<metric>`` plus the results.json
    keys, the sample grid as ``eval/samples`` (uint8, so W&B does not rescale it)."""
    import numpy as np
    import wandb

    from metrics.report import run_filter_keys

    mode = resolve_wandb_mode(mode)
    _offline_notice(mode, save_dir)
    keys = run_filter_keys(results)
    if wandb.run is not None:  # one run per evaluation, also when several share a process (sweeps)
        wandb.finish()
    run = wandb.init(project=project, dir=save_dir, group=group, job_type=str(keys["family"]), tags=list(tags or []),
                     config=keys, mode=mode)
    try:
        run.summary.update({f"eval/{k}": v for k, v in results.get("metrics", {}).items()})
        run.summary.update({k: v for k, v in results.items() if k not in ("config", "metrics", "details")})
        if grid is not None:
            image = np.asarray(grid)                                  # (H, W, C) uint8
            run.log({"eval/samples": wandb.Image(image[..., 0] if image.shape[-1] == 1 else image)})
    finally:
        run.finish()
