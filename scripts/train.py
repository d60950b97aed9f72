"""Train one model on one dataset, evaluate it, write <run dir>/results.json.

    python scripts/train.py                                   # DDPM on digits, CPU
    python scripts/train.py model=ddpm experiment=smoke hydra.run.dir=/tmp/run
    python scripts/train.py -m seed=0,1,2                     # a Hydra multirun
"""
from __future__ import annotations

import logging
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

import hydra

import models.configs  # noqa: F401  (registers the config resolvers)
from scripts import ddp_launch
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from metrics.callback import EvaluationCallback
from metrics.report import run_filter_keys
from metrics.results import RESULTS_FILE, results_record, write_json
from models.checkpoints import CheckpointError, StreamingCheckpointIO, check_checkpoint  # noqa: F401  (re-exported)
from metrics.compute import COMPUTE_FILE, ComputeTracker
from models.budget import BudgetStop, check_budget_settings, plan_budget
from models.config_checks import check_model_optimizers

log = logging.getLogger(__name__)

# Warnings a user of genbench cannot act on, each for its reason (everything else is shown):
# - our training order resumes mid-epoch exactly (datamodules/sampler.py skips the batches done),
#   which Lightning cannot see from the DataLoader; its warning would say the opposite;
# - the EMA copies (components/ema.py) are in eval mode by design, not by mistake;
# - manual optimization (the GAN) checkpoints the state after the optimizer step, which is what
#   exact resume needs;
# - a deprecation inside Lightning's own use of torch's pytree (fixed there, not here).
warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch ended")
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode at the start of training")
warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization and every_n_train_steps")
warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")


def instantiate_group(group: DictConfig | None) -> list[Any]:
    """Instantiate every entry of a config group holding several objects (callbacks, loggers)."""
    if not group:
        return []
    return [hydra.utils.instantiate(spec) for spec in group.values() if spec is not None and "_target_" in spec]


def resolve_ckpt_path(ckpt_path: str | None, output_dir: Path) -> str | None:
    """null: resume automatically from <run dir>/checkpoints/last.ckpt if present (a requeued
    job finds its own progress); "last": that file must exist; else a path."""
    last = output_dir / "checkpoints" / "last.ckpt"
    if ckpt_path is None:
        if last.is_file():
            log.info("found %s: resuming from it", last)
            return str(check_checkpoint(last))
        return None
    if ckpt_path == "last":
        return str(check_checkpoint(last))
    return str(check_checkpoint(Path(ckpt_path)))


DDP_STRATEGIES = ("ddp", "ddp_spawn", "ddp_fork")


def check_conditioning(wanted: int | None, datamodule) -> None:
    """A class-conditional model (``model.num_classes`` set; the noisy classifier) needs a labelled
    dataset with the same number of classes; refuse, naming both values, before any work."""
    if wanted is None:
        return
    have = int(getattr(datamodule, "num_classes", 0) or 0)
    if have < 2:
        raise ValueError(f"model.num_classes={wanted} (class-conditional) but dataset {datamodule.name!r} is unlabelled "
                         f"(datamodule.num_classes={have}); use model.num_classes=null or a labelled dataset")
    if have != wanted:
        raise ValueError(f"model.num_classes={wanted} but dataset {datamodule.name!r} has datamodule.num_classes={have}; "
                         "set model.num_classes=${datamodule.num_classes}")


def plan_training_budget(model, datamodule, train_flops: float, milestones: list[float]):
    """The budget's plan (models/budget.py): FLOPs per image of the model's own training step,
    counted on two training images of the real data, and the datamodule's global batch size."""
    from models.compute import training_flops_per_image

    datamodule.prepare_data()
    train_set = datamodule.split("train")
    items = [train_set[i] for i in range(min(2, len(train_set)))]
    images = torch.stack([item[0] for item in items])
    labels = torch.tensor([int(item[1]) for item in items])
    flops = training_flops_per_image(model, images, labels)
    return plan_budget(train_flops, flops, int(datamodule.batch_size), milestones)


def ddp_strategy_for(model, strategy: Any) -> Any:
    """``ddp[_spawn|_fork]`` with unused-parameter detection for families that need it (GAN)
    and without it (its graph walk costs every step) for the others."""
    if isinstance(strategy, str) and strategy in DDP_STRATEGIES and getattr(model, "ddp_find_unused_parameters", False):
        return f"{strategy}_find_unused_parameters_true"
    return strategy


def run_summary(cfg: DictConfig, model, trainer: pl.Trainer | None, evaluation: EvaluationCallback | None,
                compute: ComputeTracker | None = None) -> dict:
    """The results.json contract (see metrics/results.py SCHEMA_KEYS)."""
    final = evaluation.final_record() if evaluation is not None else None
    metrics: dict[str, float] = {}
    if trainer is not None:
        for key, value in trainer.callback_metrics.items():
            if key in ("train/loss", "val/loss") or key.startswith("val/acc"):  # (the noisy classifier's accuracy)
                metrics[key.replace("/", "_")] = float(value)
    if final is not None:
        metrics.update(final["metrics"])
    steps = int(trainer.global_step) if trainer is not None else 0
    return results_record(
        getattr(model, "family", type(model).__name__.lower()) if model is not None else cfg.model.get("_target_"),
        cfg.datamodule.get("name"), int(cfg.seed), metrics,
        num_params=int(model.num_params) if model is not None else None,
        # with ddp_spawn the parent's trainer never stepped: the final evaluation knows the step
        train_steps=max(steps, int(final["step"])) if final is not None else steps,
        feature_extractor=final["feature_extractor"] if final is not None else None,
        num_samples=final["num_samples"] if final is not None else None,
        sampler=final["sampler"] if final is not None else None,
        likelihood_kind=getattr(model, "likelihood_kind", None),
        details=final["details"] if final is not None else {},
        **(compute.record(cfg.paths.output_dir) if compute is not None else {}),
        tags=list(cfg.get("tags") or []), task_name=cfg.get("task_name"), config=_container(cfg))


def _container(cfg: DictConfig) -> dict:
    try:
        return OmegaConf.to_container(cfg, resolve=True)
    except Exception:  # an unresolvable config is itself the failure being recorded
        return OmegaConf.to_container(cfg, resolve=False)


def train(cfg: DictConfig) -> dict[str, float]:
    """Build everything from ``cfg``, fit, evaluate, write results.json; return the metrics.

    On failure (bad config, bad data, NaN loss, ...) the run directory still gets a results.json
    with status "failed" and the error, so sweeps and the table script list the run; an earlier
    successful results.json in the same directory is kept as results.previous.json. Then the
    exception propagates.
    """
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    model = trainer = evaluation = compute = plan = None
    loggers: list = []
    summary: dict[str, Any] = {}
    start = time.perf_counter()
    try:
        if cfg.get("num_threads"):
            torch.set_num_threads(int(cfg.num_threads))
        pl.seed_everything(cfg.seed, workers=True)
        # Everything that can fail on bad config is built before any training work starts.
        check_model_optimizers(OmegaConf.to_container(cfg.model, resolve=True))
        budget = cfg.get("budget") or {}
        budget_flops, milestones = check_budget_settings(budget.get("train_flops"), budget.get("milestones"))
        datamodule = hydra.utils.instantiate(cfg.datamodule)
        check_conditioning(cfg.model.get("num_classes"), datamodule)
        model = hydra.utils.instantiate(cfg.model)
        if budget_flops is not None:
            plan = plan_training_budget(model, datamodule, budget_flops, milestones)
            model.budget_batches = plan.batches
            with open_dict(cfg):  # an upper bound; BudgetStop ends the run at the planned batch
                cfg.trainer.max_steps = plan.batches * model.max_optimizer_steps_per_batch
            log.info("budget %.3g FLOPs: %.4g FLOPs per image x %d images per batch -> %d batches", budget_flops,
                     plan.flops_per_image, plan.global_batch_size, plan.batches)
        model.run_config = OmegaConf.to_container(cfg, resolve=True)
        callbacks = instantiate_group(cfg.get("callbacks"))
        if plan is not None:
            callbacks.append(BudgetStop(plan.batches))
        loggers = instantiate_group(cfg.get("logger"))
        if not loggers:  # logger=none: the LR monitor has nowhere to write and Lightning refuses it
            callbacks = [cb for cb in callbacks if not isinstance(cb, pl.callbacks.LearningRateMonitor)]
        evaluation = next((cb for cb in callbacks if isinstance(cb, EvaluationCallback)), None)
        compute = next((cb for cb in callbacks if isinstance(cb, ComputeTracker)), None)
        if plan is not None and evaluation is not None:
            evaluation.milestone_batches = list(plan.milestone_batches)
        ckpt_path = resolve_ckpt_path(cfg.get("ckpt_path"), output_dir)
        from metrics.callback import FINAL_FILE
        (output_dir / FINAL_FILE).unlink(missing_ok=True)  # only this run's final evaluation may be read back
        (output_dir / COMPUTE_FILE).unlink(missing_ok=True)
        strategy = ddp_strategy_for(model, cfg.trainer.get("strategy", "auto"))
        # DDP children run this job, not the sweep (scripts/ddp_launch.py); the Trainer must be
        # built after they exist (it picks its cluster environment when built)
        with ddp_launch.job_ranks(strategy, cfg.trainer.get("devices", 1), cfg.trainer.get("num_nodes", 1)):
            trainer = hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False,
                                              strategy=strategy, plugins=[StreamingCheckpointIO()])
            for logger in loggers:
                logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
            start = time.perf_counter()
            # weights_only=True: a checkpoint to resume from may come from someone else (models/checkpoints.py)
            trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
        summary = run_summary(cfg, model, trainer, evaluation, compute)
        summary["status"] = "ok"
    except BaseException as err:
        summary = run_summary(cfg, model, trainer, evaluation, compute)
        summary.update(status="failed", error=f"{type(err).__name__}: {err}",
                       traceback=traceback.format_exc(limit=20))
        raise
    finally:
        if plan is not None:
            summary["budget"] = plan.as_record()
        wall = time.perf_counter() - start
        eval_seconds = evaluation.eval_seconds if evaluation is not None else 0.0
        summary["timing"] = {"wall_seconds": wall, "eval_seconds": eval_seconds,
                             "train_seconds": wall - eval_seconds}
        if trainer is None or trainer.is_global_zero:
            results = output_dir / RESULTS_FILE
            if summary.get("status") != "ok" and results.is_file():
                results.replace(output_dir / "results.previous.json")  # never lose a finished result
            write_json(results, summary)
            log.info("results written to %s", results)
            for logger in loggers:  # the W&B summary carries the results.json keys (make_table reads them)
                if isinstance(logger, pl.loggers.WandbLogger):
                    logger.experiment.summary.update({k: v for k, v in summary.items() if k not in ("config", "traceback")})
                    # the flat keys the dashboard's panels filter and group on (metrics/dashboard.py)
                    logger.experiment.config.update(run_filter_keys(summary), allow_val_change=True)
        _finish_wandb()
    return summary["metrics"]


def _finish_wandb() -> None:
    """Close the W&B run so the next job in this process (multirun, tests) starts its own."""
    try:
        import wandb
    except ImportError:
        return
    if wandb.run is not None:
        wandb.finish()


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    metrics = train(cfg)
    value = metrics.get(str(cfg.get("optimized_metric", "")).replace("/", "_"),
                        metrics.get(str(cfg.get("optimized_metric", "")).split("/")[-1]))
    return None if value is None else float(value)


if __name__ == "__main__":
    main()
