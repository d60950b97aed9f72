"""The one evaluation callback every family is scored by."""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.loggers import WandbLogger

from metrics.evaluation import EvaluationResult, Evaluator, save_png
from metrics.results import append_jsonl, write_json
from models.base import GenerativeModule
from models.rng import isolated_rng

FINAL_FILE = "eval_final.json"
HISTORY_FILE = "eval_history.jsonl"

log = logging.getLogger(__name__)


class EvaluationCallback(pl.Callback):
    """Evaluates once per ``every_n_steps`` optimizer steps (0 = never during training: see
    :meth:`is_due`) and once at the end of training, with ``sampler`` during training and
    ``final_sampler`` at the end.

    Logs ``eval/<metric>`` to every logger, saves ``samples/step<k>.png``, appends one line per
    evaluation to ``eval_history.jsonl`` and keeps the final result in ``final`` for results.json.
    Evaluation wall time is accumulated separately from training time (``eval_seconds``).

    Feature metrics: ``extractor`` (null = none) at every evaluation, plus ``final_extractors``
    at the final one; all fed by the same samples. ``reference`` = {split, num_images} of the
    real images whose cached statistics they are compared with.
    """

    def __init__(self, every_n_steps: int = 0, num_samples: int = 256, batch_size: int = 256,
                 bpd_num_images: int = 64, sampler: dict[str, Any] | None = None,
                 final_sampler: dict[str, Any] | None = None, grid_size: int = 64, seed: int = 0,
                 output_dir: str = ".", extractor: str | None = None, final_extractors: list[str] | None = None,
                 metrics: list[str] | str = "auto", reference: dict[str, Any] | None = None,
                 cache_dir: str = ".cache", weights_path: str | None = None, pr_k: int = 3, dc_k: int = 5,
                 bpd_during_training: bool = False, repeats: int = 1, labels: str = "uniform",
                 intra_fid: bool = False, milestone_batches: list[int] | None = None):
        super().__init__()
        #: training batches after which to evaluate (a FLOP budget's milestones, models/budget.py);
        #: each is evaluated once, also across a resume (:meth:`on_fit_start` reads the history)
        self.milestone_batches = sorted(int(b) for b in (milestone_batches or []))
        self._milestones_done: set[int] = set()
        self.every_n_steps = int(every_n_steps)
        self.sampler, self.final_sampler = dict(sampler or {}), dict(final_sampler or {})
        self.output_dir = Path(output_dir)
        self.evaluator = Evaluator(num_samples, batch_size, bpd_num_images, grid_size, seed, repeats, labels)
        self.intra_fid = bool(intra_fid)
        self.extractor = extractor
        self.final_extractors = [e for e in (final_extractors or []) if e != extractor]
        self.metric_names = metrics if isinstance(metrics, str) else list(metrics)
        self.reference = {"split": "train", "num_images": None, **(reference or {})}
        self.cache_dir, self.weights_path, self.pr_k, self.dc_k = cache_dir, weights_path, pr_k, dc_k
        self.bpd_during_training = bpd_during_training
        self._feature_sets: dict[str, Any] = {}
        self.final: EvaluationResult | None = None
        self.eval_seconds = 0.0
        self._last_step = -1
        self._next_due = self.every_n_steps

    @classmethod
    def from_settings(cls, settings: dict[str, Any], run_seed: int, output_dir: str, cache_dir: str,
                      **kwargs) -> "EvaluationCallback":
        """The callback of a run from the ``evaluation`` config group (conf/evaluation/) as it is:
        its keys are this class's arguments, and ``final_extractors_seeds`` (null = every seed)
        keeps the final extractors to runs of those seeds."""
        settings = dict(settings)
        seeds = settings.pop("final_extractors_seeds", None)
        if seeds is not None and int(run_seed) not in [int(s) for s in seeds]:
            settings["final_extractors"] = []
        return cls(**settings, output_dir=output_dir, cache_dir=cache_dir, **kwargs)

    def state_dict(self) -> dict[str, Any]:
        return {"eval_seconds": self.eval_seconds, "last_step": self._last_step, "next_due": self._next_due,
                "milestones_done": sorted(self._milestones_done)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._milestones_done |= set(state_dict.get("milestones_done", []))
        self.eval_seconds = state_dict.get("eval_seconds", 0.0)
        self._last_step = state_dict.get("last_step", -1)
        self._next_due = state_dict.get("next_due", self._due_after(max(self._last_step, 0)))

    def _due_after(self, step: int) -> int:
        """The first multiple of ``every_n_steps`` past ``step``."""
        return (step // self.every_n_steps + 1) * self.every_n_steps if self.every_n_steps > 0 else 0

    def on_fit_start(self, trainer: pl.Trainer, pl_module) -> None:
        """Milestones already in this run's history stay done: a run interrupted after a milestone's
        evaluation but before its checkpoint re-trains that batch (to the same weights) without
        evaluating it again."""
        history = self.output_dir / HISTORY_FILE
        if self.milestone_batches and history.is_file():
            import json
            for line in history.read_text().splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:    # a line cut by a kill
                    continue
                if record.get("milestone_batch") is not None:
                    self._milestones_done.add(int(record["milestone_batch"]))

    def due_milestone(self, batches: int) -> int | None:
        """The latest milestone reached by ``batches`` and not yet evaluated (earlier ones passed
        over with it are marked done: one evaluation per batch)."""
        reached = [m for m in self.milestone_batches if m <= batches and m not in self._milestones_done]
        self._milestones_done.update(reached)
        return reached[-1] if reached else None

    def is_due(self, step: int, max_steps: int) -> bool:
        """Evaluate at the first step at or past each multiple of ``every_n_steps``: a GAN's step
        grows by 2 per batch (n_critic + 1 with several critic steps), so ``step % n == 0`` would
        skip multiples. The last step is left to the final evaluation, which follows anyway."""
        if self.every_n_steps <= 0 or step < self._next_due:
            return False
        self._next_due = self._due_after(step)
        return not 0 < max_steps <= step

    @staticmethod
    def result_record(result: EvaluationResult) -> dict[str, Any]:
        return {"num_samples": result.num_samples, "feature_extractor": result.feature_extractor,
                "sampler": result.sampler, "metrics": result.metrics, "details": result.details}

    def final_record(self) -> dict[str, Any] | None:
        """The final evaluation: in memory, or from the file rank 0 wrote (spawned training processes)."""
        if self.final is not None:
            return {"step": self._last_step, **self.result_record(self.final)}
        path = self.output_dir / FINAL_FILE
        if path.is_file():
            import json
            return json.loads(path.read_text())
        return None

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if not isinstance(pl_module, GenerativeModule):
            return
        milestone = self.due_milestone(pl_module.batches_started)
        if self.is_due(pl_module.global_step, trainer.max_steps) or milestone is not None:
            self.run(trainer, pl_module, final=False, milestone_batch=milestone)

    def on_train_end(self, trainer: pl.Trainer, pl_module) -> None:
        # a module that samples nothing (the noise-aware classifier) has nothing to evaluate here
        if isinstance(pl_module, GenerativeModule):
            self.final = self.run(trainer, pl_module, final=True)

    def feature_sets(self, datamodule, device, final: bool) -> list:
        """The FeatureMetrics of this evaluation, built (and references cached) on first use."""
        names = ([self.extractor] if self.extractor else []) + (self.final_extractors if final else [])
        from metrics.features import build_feature_metrics
        for name in names:
            if name not in self._feature_sets:
                self._feature_sets[name] = build_feature_metrics(
                    name, datamodule, self.cache_dir, self.reference["split"], self.reference["num_images"],
                    self.metric_names, device, self.evaluator.batch_size, self.weights_path,
                    seed=self.evaluator.seed, pr_k=self.pr_k, dc_k=self.dc_k, intra_fid=self.intra_fid)
            self._feature_sets[name].to(device)
        return [self._feature_sets[n] for n in names]

    def run(self, trainer: pl.Trainer, pl_module, final: bool, milestone_batch: int | None = None) -> EvaluationResult:
        step = pl_module.global_step
        t0 = time.perf_counter()
        datamodule = trainer.datamodule
        # bits/dim (the DDPM bound costs T network calls per image) at the end only, unless asked
        test_set = datamodule.split("test") if datamodule is not None and (final or self.bpd_during_training) else None
        feature_sets = self.feature_sets(datamodule, pl_module.device, final) if datamodule is not None else []
        with isolated_rng():  # evaluation never shifts the training noise stream (exact resume)
            result = self.evaluator.evaluate(pl_module, test_set, self.final_sampler if final else self.sampler,
                                             feature_sets, datamodule.class_frequencies() if datamodule is not None else None)
        self.eval_seconds += time.perf_counter() - t0
        self._last_step = step
        if trainer.is_global_zero:
            self._publish(trainer, result, step, final, pl_module.batches_started, milestone_batch)
        return result

    def _publish(self, trainer: pl.Trainer, result: EvaluationResult, step: int, final: bool, batches: int,
                 milestone_batch: int | None = None) -> None:
        metrics = {f"eval/{k}": v for k, v in result.metrics.items()}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
        if result.grid is not None:
            samples_dir = self.output_dir / "samples"
            samples_dir.mkdir(parents=True, exist_ok=True)
            path = samples_dir / f"step{step:07d}.png"
            save_png(result.grid, path)
            for logger in trainer.loggers:
                if isinstance(logger, WandbLogger):
                    logger.log_image("eval/samples", [result.grid.numpy()], step=step,
                                     caption=[f"step {step}, {result.sampler}"])
        if final:  # read back by train() when training ran in spawned processes (ddp_spawn)
            write_json(self.output_dir / FINAL_FILE, {"step": step, **self.result_record(result)})
        append_jsonl(self.output_dir / HISTORY_FILE,
                     {"step": step, "batches": batches, "milestone_batch": milestone_batch, "final": final, "num_samples": result.num_samples,
                      "feature_extractor": result.feature_extractor, "sampler": result.sampler,
                      "metrics": result.metrics})
        shown = ", ".join(f"{k}={v:.4g}" for k, v in result.metrics.items())
        log.info("evaluation at step %d (%d samples, sampler %s): %s", step, result.num_samples, result.sampler, shown)
