"""A toy fifth family for tests/test_toy_family.py: one module, defined outside genbench's packages,
that registers by defining ``family`` (models/registry.py). Each pixel is an independent Gaussian
whose mean comes from a linear map of a constant input (so its training step has matrix products
for the FLOP counter to count) and whose scale is a learned parameter."""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor, nn

from models.base import GenerativeModule
from models.noise import Noise, dequantize, randn


class ToyGaussian(GenerativeModule):
    family = "toy_gaussian"
    likelihood_kind = "dequantized"
    in_main_job = False   # the main job's presets are genbench's; the toy has none
    class_conditional = False

    def __init__(self, image_shape: Sequence[int], lr: float = 1e-2, num_classes: int | None = None):
        super().__init__(image_shape, num_classes)
        self.save_hyperparameters(logger=False)
        self.mean = nn.Linear(1, self.num_dims)   # mean = W 1 + b: 2 FLOPs per dimension forward
        self.log_scale = nn.Parameter(torch.zeros(self.num_dims))
        self.lr = lr

    def networks(self) -> list[str]:
        return ["mean"]

    def _dequantized_log_density(self, x: Tensor, generator: Noise = None) -> Tensor:
        """log N(x_deq; mu, sigma^2) summed over pixels, x_deq = (255 x + u) / 256, u ~ U(0, 1)."""
        x_deq = dequantize(x, generator)
        mu = self.mean(torch.ones(x.shape[0], 1, device=x.device))
        z = (x_deq.flatten(1) - mu) * torch.exp(-self.log_scale)
        return (-0.5 * z ** 2 - self.log_scale - 0.5 * math.log(2 * math.pi)).sum(1)

    def training_loss(self, images: Tensor, labels: Tensor | None = None) -> dict[str, Tensor]:
        return {"loss": -self._dequantized_log_density(images).mean() / self.num_dims}

    def validation_step(self, batch, batch_idx: int) -> None:
        pass

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr)

    @torch.no_grad()
    def log_likelihood(self, x: Tensor, generator: Noise = None, labels: Tensor | None = None) -> Tensor:
        # the density of dequantized data on [0, 1] bounds the 8-bit likelihood: + D log(1/256)
        return self._dequantized_log_density(x, generator) - self.num_dims * math.log(256.0)

    @torch.no_grad()
    def sample(self, n: int, generator: Noise = None, labels: Tensor | None = None, **sampler_kw) -> Tensor:
        mu = self.mean(torch.ones(n, 1, device=self.device))
        x = mu + torch.exp(self.log_scale) * randn(generator, n, (self.num_dims,), self.device)
        return (x.clamp(0, 1) * 255).round().div(255).reshape(n, *self.image_shape)

    def sampling_cost(self, **sampler_kw) -> dict[str, float]:
        return {"nfe": 1.0}
