"""RealNVP (Dinh et al. 2017): exact density of dequantized, logit-transformed images, a lower
bound on the likelihood of the 8-bit images (``likelihood_kind = "dequantized"``)."""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from models.base import GenerativeModule
from models.noise import Noise, dequantize, randn
from models.optim import build_optimizer

LOG_2PI = math.log(2 * math.pi)
#: torch.nn.utils.parametrizations.weight_norm keeps the scale g as ``original0`` (the direction v as ``original1``)
WEIGHT_NORM_SCALE = "parametrizations.weight.original0"


class RealNVP(GenerativeModule):
    """Args:
        flow: models.components.realnvp_flow.RealNVPFlow.
        optimizer: ``_partial_`` optimizer (paper: Adam 1e-3).
        scale_l2: L2 penalty on the weight-normalisation scales g of the coupling networks only,
            as the paper applies it ("L2 regularization on the weight scale parameters with
            coefficient 5e-5", Sec. 4.1); torch's ``weight_decay`` form (gradient += scale_l2 * g).
        alpha: logit pre-processing constant (Sec. 4.1: 0.05 for CIFAR-10).
        temperature: std of the prior when sampling (1.0 = the model's distribution).

    Pre-processing (Sec. 4.1): y = (255 x + u) / 256, u ~ U[0, 1) (uniform dequantization),
    p = alpha + (1 - 2 alpha) y, v = logit(p); log|dv/dy| = D log(1 - 2 alpha) - sum log(p (1 - p)).
    log P(x) >= log p_Y(y) - D log 256 (the 8-bit bin has width 1/256 in y), so bits/dim is
    -(log p_V(v) + log|dv/dy| - D log 256) / (D ln 2): exact for the dequantized density, a
    bound (>=) on the bits/dim of the 8-bit data.
    """

    family = "realnvp"
    likelihood_kind = "dequantized"

    def __init__(self, flow: nn.Module, optimizer: Callable, image_shape: Sequence[int], alpha: float = 0.05,
                 temperature: float = 1.0, warmup_steps: int = 0, scale_l2: float = 0.0,
                 sample_batch_size: int = 256):
        super().__init__(image_shape)
        self.save_hyperparameters(ignore=["flow", "optimizer"], logger=False)
        self.flow, self.optimizer_factory = flow, optimizer
        self.alpha, self.warmup_steps, self.sample_batch_size = alpha, warmup_steps, sample_batch_size
        self.scale_l2 = float(scale_l2)
        self.default_sampler = {"temperature": float(temperature)}

    def preprocess(self, y: Tensor) -> tuple[Tensor, Tensor]:
        """y in [0, 1] -> (v = logit(alpha + (1 - 2 alpha) y), log|dv/dy|)."""
        p = self.alpha + (1 - 2 * self.alpha) * y
        v = torch.log(p) - torch.log1p(-p)
        logdet = (math.log(1 - 2 * self.alpha) - torch.log(p) - torch.log1p(-p)).flatten(1).sum(1)
        return v, logdet

    def discrete_log_prob(self, x: Tensor, noise: Noise = None) -> Tensor:
        """Lower bound on log P(x) of 8-bit images x in [0, 1], nats. (B,)"""
        v, logdet_pre = self.preprocess(dequantize(x, noise))
        z, logdet_flow = self.flow(v)
        log_pz = -0.5 * (LOG_2PI + z ** 2).sum(1)
        return log_pz + logdet_flow + logdet_pre - self.num_dims * math.log(256.0)

    def networks(self) -> list[str]:
        return ["flow"]

    def training_loss(self, images: Tensor) -> dict[str, Tensor]:
        """{"loss": bits/dim of the dequantized batch} (scripts/benchmark's bare loop calls it too)."""
        return {"loss": -self.discrete_log_prob(images).mean() / (self.num_dims * math.log(2))}

    def training_step(self, batch, batch_idx: int) -> Tensor:
        loss = self.training_loss(batch[0])["loss"]
        self.check_finite_loss(loss)
        self.log_train({"train/loss": loss}, batch[0].shape[0])
        return loss

    def validation_step(self, batch, batch_idx: int) -> None:
        x = batch[0]
        gen = torch.Generator(self.device).manual_seed(batch_idx)
        loss = -self.discrete_log_prob(x, gen).mean() / (self.num_dims * math.log(2))
        self.log("val/loss", loss, prog_bar=True, sync_dist=True, batch_size=x.shape[0])

    def parameter_groups(self) -> list[dict]:
        """Weight-norm scales (with the paper's L2) and everything else (without)."""
        scales = [p for name, p in self.named_parameters() if name.endswith(WEIGHT_NORM_SCALE)]
        others = [p for name, p in self.named_parameters() if not name.endswith(WEIGHT_NORM_SCALE)]
        if self.scale_l2 and not scales:
            raise ValueError("model.scale_l2 penalises weight-normalisation scales, but this flow has none; "
                             "use model.flow.norm=weight or weight_batch, or set model.scale_l2=0")
        return [{"params": scales, "weight_decay": self.scale_l2}, {"params": others, "weight_decay": 0.0}]

    def configure_optimizers(self):
        return build_optimizer(self.optimizer_factory, self.parameter_groups(), self.warmup_steps)

    # ---------------------------------------------------------------- the interface
    @torch.no_grad()
    def log_likelihood(self, x: Tensor, generator: Noise = None) -> Tensor:
        return self.discrete_log_prob(x, generator)

    @torch.no_grad()
    def sample(self, n: int, generator: Noise = None, temperature: float | None = None, **sampler_kw) -> Tensor:
        """z ~ N(0, T^2 I) -> inverse flow -> inverse logit -> the 8-bit bin the dequantized y falls in."""
        t = float(self.default_sampler["temperature"] if temperature is None else temperature)

        def draw(m: int, noise: Noise) -> Tensor:
            z = randn(noise, m, (self.num_dims,), self.device) * t
            v = self.flow.inverse(z)
            y = ((torch.sigmoid(v) - self.alpha) / (1 - 2 * self.alpha)).clamp(0.0, 1.0)
            return (torch.floor(y * 256.0).clamp(max=255.0) / 255.0)
        return self.sample_in_chunks(n, self.sample_batch_size, draw, generator)

    def sampling_cost(self, **sampler_kw) -> dict[str, float]:
        return {"nfe": 1.0}
