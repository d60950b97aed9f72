"""DDPM (Ho et al. 2020): a noise-prediction network trained with L_simple, sampled with its EMA."""
from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from models.base import GenerativeModule
from models.noise import Noise
from models.components.ema import EMA
from models.diffusion.gaussian_diffusion import GaussianDiffusion
from models.optim import build_optimizer

SAMPLERS = ("ancestral", "ddim")


class DDPM(GenerativeModule):
    """Args:
        net: eps_theta(x_t, t), e.g. models.components.unet.UNet.
        diffusion: the Gaussian process (schedule, T, variance).
        optimizer: a ``_partial_`` torch optimizer.
        image_shape: (C, H, W) of the data.
        warmup_steps: linear learning-rate warm-up (Ho et al.: 5000).
        ema_decay, ema_warmup, ema_foreach: EMA of the network weights (components/ema.py); the EMA
            network samples and scores.
        sampler: default sampler, {name: ancestral|ddim, steps: int|null (null = all T), eta: float}.
        sample_batch_size: images per network call when sampling / computing the bound.
    """

    family = "ddpm"
    likelihood_kind = "elbo"

    def __init__(self, net: nn.Module, diffusion: GaussianDiffusion, optimizer: Callable[..., torch.optim.Optimizer],
                 image_shape: Sequence[int], warmup_steps: int = 0, ema_decay: float = 0.9999,
                 ema_warmup: bool = False, ema_foreach: bool = True, sampler: dict[str, Any] | None = None,
                 sample_batch_size: int = 256):
        super().__init__(image_shape)
        self.save_hyperparameters(ignore=["net", "diffusion", "optimizer"], logger=False)
        self.net, self.diffusion, self.optimizer_factory = net, diffusion, optimizer
        self.ema = EMA(net, ema_decay, warmup=ema_warmup, foreach=ema_foreach)
        self.warmup_steps, self.sample_batch_size = warmup_steps, sample_batch_size
        self.default_sampler = {"name": "ancestral", "steps": None, "eta": 1.0, **(sampler or {})}
        self._check_sampler(**self.default_sampler)

    # ---------------------------------------------------------------- training
    def networks(self) -> list[str]:
        return ["net"]

    def training_loss(self, images: Tensor) -> dict[str, Tensor]:
        """{"loss": L_simple} of a batch of images in [0, 1] (scripts/benchmark's bare loop calls it too)."""
        x0 = images * 2.0 - 1.0                                               # (B, C, H, W) in [-1, 1]
        return {"loss": self.diffusion.training_loss(self.net, x0).mean()}

    def training_step(self, batch, batch_idx: int) -> Tensor:
        loss = self.training_loss(batch[0])["loss"]
        self.check_finite_loss(loss)
        self.log_train({"train/loss": loss}, batch[0].shape[0])
        return loss

    def update_ema(self) -> None:
        self.ema.update(self.net)

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        # right after the step, so a checkpoint taken at this step's end holds this update
        self.update_ema()

    def validation_step(self, batch, batch_idx: int) -> None:
        x0 = batch[0] * 2.0 - 1.0
        # fixed noise so val/loss moves only with the weights
        gen = torch.Generator(device=x0.device).manual_seed(batch_idx)
        loss = self.diffusion.training_loss(self.ema.shadow, x0, generator=gen)
        self.log("val/loss", loss.mean(), prog_bar=True, sync_dist=True, batch_size=x0.shape[0])

    def configure_optimizers(self):
        return build_optimizer(self.optimizer_factory, self.net.parameters(), self.warmup_steps)

    # ---------------------------------------------------------------- the interface
    def _check_sampler(self, name: str = "ancestral", steps: int | None = None, eta: float = 1.0) -> None:
        if name not in SAMPLERS:
            raise ValueError(f"unknown DDPM sampler {name!r}; choose one of {SAMPLERS}")
        if steps is not None and not 1 <= int(steps) <= self.diffusion.num_timesteps:
            raise ValueError(f"sampler steps must be in 1..{self.diffusion.num_timesteps}, got {steps}")

    @torch.no_grad()
    def sample(self, n: int, generator: Noise = None, **sampler_kw) -> Tensor:
        """Samples from the EMA network. sampler_kw: name (ancestral|ddim), steps, eta (ddim only)."""
        kw = self.sampler_kwargs(**sampler_kw)
        self._check_sampler(**kw)
        process = self.diffusion.respace(int(kw["steps"] or self.diffusion.num_timesteps))
        model = self.ema.shadow

        def draw(m: int, noise: Noise) -> Tensor:
            if kw["name"] == "ddim":
                x = process.ddim_sample(model, m, self.image_shape, self.device, noise, eta=float(kw["eta"]))
            else:
                x = process.ancestral_sample(model, m, self.image_shape, self.device, noise)
            return ((x + 1.0) / 2.0).clamp(0.0, 1.0)

        return self.sample_in_chunks(n, self.sample_batch_size, draw, generator)

    @torch.no_grad()
    def log_likelihood(self, x: Tensor, generator: Noise = None) -> Tensor:
        """Lower bound on log p(x) in nats: -L of Eq. 5 with the discretized decoder (Eq. 13)."""
        bpd = self.diffusion.bpd(self.ema.shadow, x * 2.0 - 1.0, generator)
        return -bpd * self.num_dims * math.log(2.0)

    def sampling_cost(self, **sampler_kw) -> dict[str, float]:
        kw = self.sampler_kwargs(**sampler_kw)
        return {"nfe": float(len(self.diffusion.respace(int(kw["steps"] or self.diffusion.num_timesteps)).betas))}
