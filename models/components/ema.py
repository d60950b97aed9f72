"""Exponential moving average of a network's weights (Polyak averaging), used for sampling."""
from __future__ import annotations

import copy

import torch
from torch import nn
from torch.optim.swa_utils import get_ema_multi_avg_fn


class EMA(nn.Module):
    """Holds ``shadow``, a frozen copy of ``net`` whose weights follow
    theta_ema <- decay * theta_ema + (1 - decay) * theta after every optimizer step.

    ``foreach=False`` updates tensor by tensor (the benchmark's baseline for the fused update).
    With ``warmup=True`` the decay is min(decay, (1 + n) / (10 + n)) after n updates (the
    TensorFlow ExponentialMovingAverage num_updates rule), so short runs are not dominated by
    the initial weights. With ``rampup`` = r the half-life is at most r times the updates so far
    (EDM's ema_rampup_ratio, Karras et al. 2022): decay = min(decay, 0.5 ** (1 / (r (n + 1)))), so
    the averaging horizon grows with the run and a short run averages over its own length, while
    ``decay`` caps it. Buffers (e.g. BatchNorm statistics) are copied, not averaged.
    Being a submodule, the shadow is saved in checkpoints and moved across devices with its owner.
    """

    def __init__(self, net: nn.Module, decay: float = 0.9999, warmup: bool = False, foreach: bool = True,
                 rampup: float | None = None):
        super().__init__()
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        if rampup is not None and not float(rampup) > 0:
            raise ValueError(f"model.ema_rampup (the EMA half-life as a fraction of the run so far) must be > 0, "
                             f"got {rampup}")
        self.decay, self.warmup, self.foreach = float(decay), bool(warmup), bool(foreach)
        self.rampup = None if rampup is None else float(rampup)
        self.shadow = copy.deepcopy(net).eval().requires_grad_(False)
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))
        # a host-side copy of num_updates: reading the buffer every step would sync with the GPU
        self._host_updates: int | None = 0
        self.register_load_state_dict_post_hook(EMA._forget_host_updates)

    @staticmethod
    def _forget_host_updates(module: "EMA", incompatible_keys) -> None:
        module._host_updates = None  # re-read from the loaded buffer on the next update

    def current_decay(self) -> float:
        if self._host_updates is None:  # after loading a checkpoint: read the buffer once
            self._host_updates = int(self.num_updates)
        n = self._host_updates
        decay = min(self.decay, (1.0 + n) / (10.0 + n)) if self.warmup else self.decay
        if self.rampup is not None:
            decay = min(decay, 0.5 ** (1.0 / (self.rampup * (n + 1))))
        return decay

    @torch.no_grad()
    def update(self, net: nn.Module) -> None:
        decay = self.current_decay()
        ema_params = [p for p in self.shadow.parameters()]
        params = [p.detach() for p in net.parameters()]
        if len(ema_params) != len(params):
            raise RuntimeError("EMA shadow and network have different parameter lists")
        # lerp_(end, w): ema += w * (p - ema)  ==  decay * ema + (1 - decay) * p
        if self.foreach:  # one multi-tensor kernel launch per group of tensors instead of one per tensor
            get_ema_multi_avg_fn(decay)(ema_params, params, None)
        else:
            for e, p in zip(ema_params, params):
                e.lerp_(p, 1.0 - decay)
        for b_ema, b in zip(self.shadow.buffers(), net.buffers()):
            b_ema.copy_(b)
        self.num_updates += 1
        self._host_updates += 1  # current_decay() above has set it

    def forward(self, *args, **kwargs):
        return self.shadow(*args, **kwargs)

    def train(self, mode: bool = True):
        # The shadow is always in eval mode (no dropout, BatchNorm uses its running stats).
        super().train(mode)
        self.shadow.eval()
        return self
