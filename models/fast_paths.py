"""Speed switches that leave the maths alone, applied to any family when training starts.

    callbacks.fast_paths.channels_last=true   # NHWC weights: convolutions take the tensor-core layout
    callbacks.fast_paths.compile=true         # torch.compile each network (Module.compile: in place,
                                              # checkpoints keep their keys)
Mixed precision is Lightning's own switch (trainer.precision=bf16-mixed / 16-mixed), fused Adam
the optimizer's (model.optimizer.fused=true), the on-device data path the datamodule's
(datamodule.in_memory=true); scripts/benchmark.py --fast-paths measures each.
"""
from __future__ import annotations

import logging

import pytorch_lightning as pl
import torch

log = logging.getLogger(__name__)


class FastPaths(pl.Callback):
    """Args:
        channels_last: convert the module's parameters to channels-last memory format (convolutions
            then run NHWC whatever the input layout, which is what tensor cores want).
        compile: torch.compile the family's trained networks (``GenerativeModule.networks``).
        compile_mode: torch.compile mode (None, "reduce-overhead", "max-autotune").
    """

    def __init__(self, channels_last: bool = False, compile: bool = False, compile_mode: str | None = None):
        self.channels_last, self.compile, self.compile_mode = channels_last, compile, compile_mode

    def on_fit_start(self, trainer: pl.Trainer, pl_module) -> None:
        if self.channels_last:
            pl_module.to(memory_format=torch.channels_last)
        if self.compile:
            names = getattr(pl_module, "networks", lambda: [])()
            for name in names:
                getattr(pl_module, name).compile(mode=self.compile_mode)
            log.info("torch.compile: %s (mode=%s); the first steps include compilation", ", ".join(names),
                     self.compile_mode)
