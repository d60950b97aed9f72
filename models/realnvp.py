"""RealNVP (Dinh et al. 2017): exact density of dequantized, logit-transformed images, a lower
bound on the likelihood of the 8-bit images (``likelihood_kind = "dequantized"``)."""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from models.base import GenerativeModule
from models.noise import Noise, dequantize, randn

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
        num_classes: class-conditional with this many classes (null = unconditional): the base
            distribution is N(mu_y, diag(exp(2 log_sigma_y))) with a learned mean and log-scale per
            class (Glow's class-conditional prior, Kingma & Dhariwal 2018); the flow is shared, so
            log p(x | y) stays exact (for the dequantized data).

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
                 sample_batch_size: int = 256, num_classes: int | None = None,
                 warmup_fraction: float | None = None, lr_decay: str = "constant"):
        super().__init__(image_shape, num_classes)
        self.save_hyperparameters(ignore=["flow", "optimizer"], logger=False)
        self.flow, self.optimizer_factory = flow, optimizer
        self.alpha, self.sample_batch_size = alpha, sample_batch_size
        self.set_schedule(warmup_steps, warmup_fraction, lr_decay)
        self.scale_l2 = float(scale_l2)
        self.default_sampler = {"temperature": float(temperature)}
        if self.num_classes is not None:  # zeros: every class starts at the unconditional N(0, I)
            self.base_mean = nn.Parameter(torch.zeros(self.num_classes, self.num_dims))
            self.base_log_scale = nn.Parameter(torch.zeros(self.num_classes, self.num_dims))

    def base_log_prob(self, z: Tensor, y: Tensor | None = None) -> Tensor:
        """log N(z; 0, I), or log N(z; mu_y, diag(sigma_y^2)) for a conditional flow, summed over dims. (B,)"""
        if y is None:
            return -0.5 * (LOG_2PI + z ** 2).sum(1)
        mean, log_scale = self.base_mean[y], self.base_log_scale[y]
        return -0.5 * (LOG_2PI + 2 * log_scale + ((z - mean) * torch.exp(-log_scale)) ** 2).sum(1)

    def preprocess(self, y: Tensor) -> tuple[Tensor, Tensor]:
        """y in [0, 1] -> (v = logit(alpha + (1 - 2 alpha) y), log|dv/dy|)."""
        p = self.alpha + (1 - 2 * self.alpha) * y
        v = torch.log(p) - torch.log1p(-p)
        logdet = (math.log(1 - 2 * self.alpha) - torch.log(p) - torch.log1p(-p)).flatten(1).sum(1)
        return v, logdet

    def discrete_log_prob(self, x: Tensor, noise: Noise = None, y: Tensor | None = None) -> Tensor:
        """Lower bound on log P(x) (log P(x | y) when conditional) of 8-bit images x in [0, 1], nats. (B,)"""
        v, logdet_pre = self.preprocess(dequantize(x, noise))
        z, logdet_flow = self.flow(v)
        return self.base_log_prob(z, y) + logdet_flow + logdet_pre - self.num_dims * math.log(256.0)

    def networks(self) -> list[str]:
        return ["flow"]

    def training_loss(self, images: Tensor, labels: Tensor | None = None) -> dict[str, Tensor]:
        """{"loss": bits/dim of the dequantized batch} (scripts/benchmark's bare loop calls it too)."""
        y = self.training_labels(labels)
        return {"loss": -self.discrete_log_prob(images, y=y).mean() / (self.num_dims * math.log(2))}

    def validation_step(self, batch, batch_idx: int) -> None:
        x = batch[0]
        gen = torch.Generator(self.device).manual_seed(batch_idx)
        loss = -self.discrete_log_prob(x, gen, self.training_labels(batch[1])).mean() / (self.num_dims * math.log(2))
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
        return self.optimizer_with_schedule(self.optimizer_factory, self.parameter_groups())

    # ---------------------------------------------------------------- the interface
    @torch.no_grad()
    def log_likelihood(self, x: Tensor, generator: Noise = None, labels: Tensor | None = None) -> Tensor:
        return self.discrete_log_prob(x, generator, self.check_labels(labels, x.shape[0]))

    @torch.no_grad()
    def sample(self, n: int, generator: Noise = None, labels: Tensor | None = None, temperature: float | None = None,
               **sampler_kw) -> Tensor:
        """z ~ N(mu_y, (T sigma_y)^2) (N(0, T^2 I) unconditional) -> inverse flow -> inverse logit -> the
        8-bit bin the dequantized y falls in."""
        t = float(self.default_sampler["temperature"] if temperature is None else temperature)
        labels = self.check_labels(labels, n)

        def draw(m: int, noise: Noise, y: Tensor | None) -> Tensor:
            z = randn(noise, m, (self.num_dims,), self.device) * t
            if y is not None:
                z = self.base_mean[y] + torch.exp(self.base_log_scale[y]) * z
            v = self.flow.inverse(z)
            y = ((torch.sigmoid(v) - self.alpha) / (1 - 2 * self.alpha)).clamp(0.0, 1.0)
            return (torch.floor(y * 256.0).clamp(max=255.0) / 255.0)
        return self.sample_in_chunks(n, self.sample_batch_size, draw, generator, labels)

    def sampling_cost(self, **sampler_kw) -> dict[str, float]:
        return {"nfe": 1.0}
