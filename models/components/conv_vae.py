"""Convolutional encoder/decoder of the VAE, sized from the image shape (4x4 <-> image_size by
factors of 2, so image_size must be a power of two between 8 and 64)."""
from __future__ import annotations

from torch import Tensor, nn

from models.components.sizing import doubling_stages


class ConvEncoder(nn.Module):
    """x (B, C, H, W) in [-1, 1] -> (mean, log_var) of q(z|x), each (B, latent_dim)."""

    def __init__(self, channels: int, image_size: int, latent_dim: int = 32, base_channels: int = 32):
        super().__init__()
        stages = doubling_stages(image_size, "the VAE encoder/decoder go")
        widths = [base_channels * 2 ** i for i in range(stages + 1)]
        layers: list[nn.Module] = [nn.Conv2d(channels, widths[0], 3, 1, 1), nn.SiLU()]
        for w_in, w_out in zip(widths[:-1], widths[1:]):
            layers += [nn.Conv2d(w_in, w_out, 4, 2, 1), nn.SiLU(), nn.Conv2d(w_out, w_out, 3, 1, 1), nn.SiLU()]
        self.net = nn.Sequential(*layers, nn.Flatten())
        self.head = nn.Linear(widths[-1] * 16, 2 * latent_dim)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        mean, log_var = self.head(self.net(x)).chunk(2, dim=1)
        return mean, log_var.clamp(-12.0, 8.0)


class ConvDecoder(nn.Module):
    """z (B, latent_dim) -> decoder parameters (B, C * params_per_pixel, H, W)."""

    def __init__(self, channels: int, image_size: int, latent_dim: int = 32, base_channels: int = 32,
                 params_per_pixel: int = 2):
        super().__init__()
        stages = doubling_stages(image_size, "the VAE encoder/decoder go")
        widths = [base_channels * 2 ** i for i in reversed(range(stages + 1))]
        self.fc = nn.Sequential(nn.Linear(latent_dim, widths[0] * 16), nn.SiLU())
        layers: list[nn.Module] = []
        for w_in, w_out in zip(widths[:-1], widths[1:]):
            layers += [nn.ConvTranspose2d(w_in, w_out, 4, 2, 1), nn.SiLU(), nn.Conv2d(w_out, w_out, 3, 1, 1), nn.SiLU()]
        self.net = nn.Sequential(*layers, nn.Conv2d(widths[-1], channels * params_per_pixel, 3, 1, 1))
        self.width0 = widths[0]

    def forward(self, z: Tensor) -> Tensor:
        return self.net(self.fc(z).view(z.shape[0], self.width0, 4, 4))
