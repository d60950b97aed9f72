"""Convolutional encoder/decoder of the VAE, sized from the image shape (4x4 <-> image_size by
factors of 2, so image_size must be a power of two between 8 and 64).

Class-conditional (``num_classes`` set): the conditional VAE of Sohn et al. 2015 / Kingma et al.
2014 (M2's generative side): the one-hot label enters the encoder as extra constant input
planes and the decoder concatenated to z, so q(z | x, y) and p(x | z, y).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def one_hot(y: Tensor | None, num_classes: int | None) -> Tensor | None:
    if not num_classes:
        return None
    if y is None:
        raise ValueError(f"this network is class-conditional ({num_classes} classes): pass labels")
    return F.one_hot(y.long(), num_classes).float()

from models.components.sizing import doubling_stages


class ConvEncoder(nn.Module):
    """x (B, C, H, W) in [-1, 1] -> (mean, log_var) of q(z|x), each (B, latent_dim)."""

    def __init__(self, channels: int, image_size: int, latent_dim: int = 32, base_channels: int = 32,
                 num_classes: int | None = None):
        super().__init__()
        stages = doubling_stages(image_size, "the VAE encoder/decoder go")
        self.num_classes = num_classes or None
        widths = [base_channels * 2 ** i for i in range(stages + 1)]
        layers: list[nn.Module] = [nn.Conv2d(channels + (num_classes or 0), widths[0], 3, 1, 1), nn.SiLU()]
        for w_in, w_out in zip(widths[:-1], widths[1:]):
            layers += [nn.Conv2d(w_in, w_out, 4, 2, 1), nn.SiLU(), nn.Conv2d(w_out, w_out, 3, 1, 1), nn.SiLU()]
        self.net = nn.Sequential(*layers, nn.Flatten())
        self.head = nn.Linear(widths[-1] * 16, 2 * latent_dim)

    def forward(self, x: Tensor, y: Tensor | None = None) -> tuple[Tensor, Tensor]:
        planes = one_hot(y, self.num_classes)
        if planes is not None:
            x = torch.cat([x, planes[:, :, None, None].expand(-1, -1, *x.shape[2:])], dim=1)
        mean, log_var = self.head(self.net(x)).chunk(2, dim=1)
        return mean, log_var.clamp(-12.0, 8.0)


class ConvDecoder(nn.Module):
    """z (B, latent_dim) -> decoder parameters (B, C * params_per_pixel, H, W)."""

    def __init__(self, channels: int, image_size: int, latent_dim: int = 32, base_channels: int = 32,
                 params_per_pixel: int = 2, num_classes: int | None = None):
        super().__init__()
        stages = doubling_stages(image_size, "the VAE encoder/decoder go")
        self.num_classes = num_classes or None
        widths = [base_channels * 2 ** i for i in reversed(range(stages + 1))]
        self.fc = nn.Sequential(nn.Linear(latent_dim + (num_classes or 0), widths[0] * 16), nn.SiLU())
        layers: list[nn.Module] = []
        for w_in, w_out in zip(widths[:-1], widths[1:]):
            layers += [nn.ConvTranspose2d(w_in, w_out, 4, 2, 1), nn.SiLU(), nn.Conv2d(w_out, w_out, 3, 1, 1), nn.SiLU()]
        self.net = nn.Sequential(*layers, nn.Conv2d(widths[-1], channels * params_per_pixel, 3, 1, 1))
        self.width0 = widths[0]

    def forward(self, z: Tensor, y: Tensor | None = None) -> Tensor:
        code = one_hot(y, self.num_classes)
        h = self.fc(z if code is None else torch.cat([z, code], dim=1))
        return self.net(h.view(z.shape[0], self.width0, 4, 4))
