"""The bare PyTorch loop genbench is measured against: the module's own loss functions (the ones
its ``training_step`` calls, so the two loops cannot drift apart), its own optimizers and EMA
update, and plain ``loss.backward()`` / ``optimizer.step()`` with no framework around them."""
from __future__ import annotations

import itertools
import os
import statistics
import time
from contextlib import contextmanager
from typing import Callable, Iterator

import numpy as np
import torch

from benchmarks.configs import build
from benchmarks.memory import sync
from models.fast_paths import NVML_CHECK_FLAG


def plain_optimizers(model) -> tuple[list[torch.optim.Optimizer], list]:
    """The torch optimizers (and per-step LR schedulers) of ``model.configure_optimizers()``."""
    conf = model.configure_optimizers()
    if isinstance(conf, torch.optim.Optimizer):
        return [conf], []
    if isinstance(conf, dict):
        scheduler = conf.get("lr_scheduler")
        return [conf["optimizer"]], [scheduler["scheduler"]] if scheduler else []
    return list(conf), []


def bare_step_fn(model) -> Callable[[torch.Tensor], None]:
    """One training step of the family on a batch of images in [0, 1]: each of its loss terms
    (``loss_terms``: the GAN's D step, and every n_critic-th batch its G step) with its own
    optimizer, the learning-rate schedule, and the EMA after the terms that move it."""
    optimizers, schedulers = plain_optimizers(model)
    terms = model.loss_terms()
    batches = itertools.count(1)

    def step(x):
        k = next(batches)
        for term in terms:
            if k % term.every:
                continue
            opt = optimizers[term.optimizer]
            loss = term.loss(x, None)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if term.updates_ema:
                model.update_ema()
        for scheduler in schedulers:
            scheduler.step()
    return step


@contextmanager
def as_plain_pytorch():
    """The bare loop runs as a script that imports only torch would: without the
    PYTORCH_NVML_BASED_CUDA_CHECK=1 that importing Lightning sets (it changes what every
    optimizer step costs; see models.fast_paths.skip_missing_nvml_probe)."""
    flag = os.environ.pop(NVML_CHECK_FLAG, None)
    try:
        yield
    finally:
        if flag is not None:
            os.environ[NVML_CHECK_FLAG] = flag


def bare_batches(dm, device) -> Iterator[torch.Tensor]:
    """What a hand-written loop iterates: the datamodule's training loader, epoch after epoch,
    each batch moved to the device."""
    loader = dm.train_dataloader()
    for epoch in itertools.count():
        sampler = getattr(loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        for x, _ in loader:
            yield x.to(device, non_blocking=True)


def bare_loop(family: str, device, batch_size: int, overrides: tuple[str, ...] = ()) -> Callable[[], None]:
    """One bare step on the next batch, per call (its own networks, optimizer and data order)."""
    _, dm, model = build(family, device, batch_size, overrides)
    model.train()
    step = bare_step_fn(model)
    batches = bare_batches(dm, device)
    return lambda: step(next(batches))


def throughput_from_stamps(stamps: list[float], batch_size: int) -> float:
    """Images/s from the MEDIAN step time (intervals between consecutive step starts): on a shared
    machine a neighbour's burst stalls a few steps; the median step ignores them, a mean does not."""
    return batch_size / statistics.median(np.diff(stamps))


def bare_throughput(family: str, device, batch_size: int, batches: int, overrides: tuple[str, ...] = ()) -> float:
    next_step = bare_loop(family, device, batch_size, overrides)
    with as_plain_pytorch():
        for _ in range(3):   # warm-up
            next_step()
        stamps = []
        for _ in range(batches):
            sync(device)
            stamps.append(time.perf_counter())
            next_step()
        sync(device)
        stamps.append(time.perf_counter())
    return throughput_from_stamps(stamps, batch_size)
