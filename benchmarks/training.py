"""genbench's training throughput: the real module, datamodule, fast-path callback and precision
in a Lightning Trainer, timed alone or interleaved step by step with the bare loop."""
from __future__ import annotations

import statistics
import time
from typing import Callable

import hydra
import numpy as np
import pytorch_lightning as pl
import torch

from benchmarks.bare_loop import as_plain_pytorch, bare_loop, bare_throughput, throughput_from_stamps
from benchmarks.configs import build
from benchmarks.memory import PeakMemory, sync


class Timer(pl.Callback):
    """Stamps the start of every batch after the warm-up and the end of the last, inside the loop
    (so each interval holds the whole per-step cost of the loop; set-up and tear-down are out)."""

    def __init__(self, warmup: int, device):
        self.warmup, self.device, self.stamps, self.seen, self.batch_size = warmup, device, [], 0, 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.seen >= self.warmup:
            sync(self.device)
            self.stamps.append(time.perf_counter())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.seen += 1
        self.batch_size = batch[0].shape[0]

    def on_train_end(self, trainer, pl_module):
        sync(self.device)
        self.stamps.append(time.perf_counter())

    def throughput(self) -> float:
        return throughput_from_stamps(self.stamps, self.batch_size)


class InterleavedBareStep(pl.Callback):
    """At the start of every genbench batch, one bare step (``bare_loop``), timed. The genbench
    batch is then everything from the end of that bare step to the start of the next one:
    Lightning's whole loop (data fetch, hooks, training_step, bookkeeping)."""

    def __init__(self, next_bare_step: Callable[[], None], warmup: int):
        self.next_bare_step, self.warmup = next_bare_step, warmup
        self.starts: list[float] = []
        self.ends: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        with as_plain_pytorch():
            self.starts.append(time.perf_counter())
            self.next_bare_step()
            self.ends.append(time.perf_counter())

    def on_train_end(self, trainer, pl_module):
        self.starts.append(time.perf_counter())

    def step_times(self) -> tuple[np.ndarray, np.ndarray]:
        """(bare, genbench) seconds of each step pair after the warm-up."""
        starts, ends = np.array(self.starts), np.array(self.ends)
        return (ends - starts[:-1])[self.warmup:], (starts[1:] - ends)[self.warmup:]


class SyncDebug(pl.Callback):
    """On a GPU, ``torch.cuda.set_sync_debug_mode("error")`` around every training batch between
    logging steps (which copy the logged losses to the host by design), after the first: a
    host-device synchronisation in the hot loop is an error, not a silent stall."""

    def __init__(self, warmup: int = 1):
        self.warmup = warmup

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx >= self.warmup and not pl_module.is_logging_step():
            torch.cuda.set_sync_debug_mode("error")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        torch.cuda.set_sync_debug_mode("default")

    def on_train_end(self, trainer, pl_module):
        torch.cuda.set_sync_debug_mode("default")


def fit_genbench(family: str, device, batch_size: int, batches: int, overrides: tuple[str, ...],
                 timers: list[pl.Callback]) -> None:
    """``batches`` Lightning batches of the real module, datamodule, fast-path callback and precision."""
    cfg, dm, model = build(family, device, batch_size, overrides)
    steps_per_batch = model.max_optimizer_steps_per_batch   # Lightning's global_step counts both GAN optimizers
    fast = hydra.utils.instantiate(cfg.callbacks.fast_paths)
    extra = [SyncDebug()] if device.type == "cuda" else []
    trainer = pl.Trainer(accelerator="gpu" if device.type == "cuda" else "cpu", devices=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         max_steps=batches * steps_per_batch, limit_val_batches=0, num_sanity_val_steps=0,
                         callbacks=[*timers, fast, *extra], precision=cfg.trainer.precision,
                         log_every_n_steps=cfg.trainer.log_every_n_steps)
    trainer.fit(model, datamodule=dm)


def genbench_throughput(family: str, device, batch_size: int, batches: int, overrides: tuple[str, ...] = (),
                        warmup: int = 3) -> float:
    timer = Timer(warmup, device)
    fit_genbench(family, device, batch_size, batches + warmup, overrides, [timer])
    return timer.throughput()


def interleaved_throughput(family: str, device, batch_size: int, batches: int, overrides: tuple[str, ...] = (),
                           warmup: int = 3, bare_overrides: tuple[str, ...] | None = None) -> dict:
    """genbench and the bare loop step by step in one process (CPU): images/s of each from its
    median step, and the median over steps of the per-pair ratio bare time / genbench time. The
    bare loop takes ``bare_overrides`` (default: ``overrides``), e.g. only the data ones when it is
    the common clock of a fast-path table."""
    bare_overrides = overrides if bare_overrides is None else bare_overrides
    paired = InterleavedBareStep(bare_loop(family, device, batch_size, bare_overrides), warmup)
    fit_genbench(family, device, batch_size, batches + warmup, overrides, [paired])
    bare, ours = paired.step_times()
    return {"bare_img_s": batch_size / float(np.median(bare)), "genbench_img_s": batch_size / float(np.median(ours)),
            "ratio": float(np.median(bare / ours))}


def training_row(family: str, device, batch_size: int, batches: int, repeats: int, data: tuple[str, ...]) -> dict:
    """genbench vs the bare loop for one family: interleaved on the CPU (drifts of a shared machine
    hit both alike), back to back on a GPU (a per-step sync would hide genbench's asynchrony)."""
    if device.type == "cpu":
        pairs = [interleaved_throughput(family, device, batch_size, batches, data) for _ in range(repeats)]
        bare = [p["bare_img_s"] for p in pairs]
        ours = [p["genbench_img_s"] for p in pairs]
        ratios = [p["ratio"] for p in pairs]   # each the median over that run's step pairs
        # peak memory: each loop alone (interleaved, they share one process)
        with PeakMemory(device) as m_bare:
            bare_throughput(family, device, batch_size, min(batches, 10), data)
        with PeakMemory(device) as m_ours:
            genbench_throughput(family, device, batch_size, min(batches, 10), data)
    else:
        bare, ours = [], []
        for _ in range(repeats):   # back to back, so drifts hit both sides alike
            with PeakMemory(device) as m_bare:
                bare.append(bare_throughput(family, device, batch_size, batches, data))
            with PeakMemory(device) as m_ours:
                ours.append(genbench_throughput(family, device, batch_size, batches, data))
        ratios = [o / b for o, b in zip(ours, bare)]
    return {"family": family, "bare_img_s": statistics.median(bare), "genbench_img_s": statistics.median(ours),
            "ratio": statistics.median(ratios), "ratio_of_medians": statistics.median(ours) / statistics.median(bare),
            "pair_ratios": ratios, "bare_all": bare, "genbench_all": ours,
            "bare_peak_mb": m_bare.peak_mb, "genbench_peak_mb": m_ours.peak_mb}
