"""GAN generators and discriminators as plain nn.Modules.

- DCGAN (Radford et al. 2016): transposed-conv generator with BatchNorm+ReLU and a tanh output;
  strided-conv discriminator with LeakyReLU(0.2) (BatchNorm, or spectral norm for SNGAN-style
  training). Sized from the image shape: 4x4 -> image_size by doubling, so image_size must be a
  power of two between 8 and 64.
- SNGAN "standard CNN" (Miyato et al. 2018, Table 3(a)/(b)) for 32x32 images.
Generators map z (B, latent_dim) -> images (B, C, H, W) in [-1, 1]; discriminators map images -> (B,) logits.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.utils.parametrizations import spectral_norm

from models.components.sizing import doubling_stages


def _sn(module: nn.Module, enabled: bool) -> nn.Module:
    return spectral_norm(module) if enabled else module


class DCGANGenerator(nn.Module):
    def __init__(self, channels: int, image_size: int, latent_dim: int = 100, base_channels: int = 64):
        super().__init__()
        stages = doubling_stages(image_size, "the DCGAN generator/discriminator go")
        self.latent_dim = latent_dim
        widths = [base_channels * 2 ** (stages - 1 - i) for i in range(stages)]      # e.g. 256, 128, 64
        layers: list[nn.Module] = [nn.ConvTranspose2d(latent_dim, widths[0], 4, 1, 0, bias=False),
                                   nn.BatchNorm2d(widths[0]), nn.ReLU(True)]       # (B, w0, 4, 4)
        for w_in, w_out in zip(widths[:-1], widths[1:]):
            layers += [nn.ConvTranspose2d(w_in, w_out, 4, 2, 1, bias=False), nn.BatchNorm2d(w_out), nn.ReLU(True)]
        layers += [nn.ConvTranspose2d(widths[-1], channels, 4, 2, 1), nn.Tanh()]
        self.net = nn.Sequential(*layers)
        self.apply(_dcgan_init)

    def forward(self, z: Tensor) -> Tensor:
        return self.net(z[:, :, None, None])


class DCGANDiscriminator(nn.Module):
    def __init__(self, channels: int, image_size: int, base_channels: int = 64, spectral: bool = False):
        super().__init__()
        stages = doubling_stages(image_size, "the DCGAN generator/discriminator go")
        widths = [base_channels * 2 ** i for i in range(stages)]                      # e.g. 64, 128, 256
        layers: list[nn.Module] = [_sn(nn.Conv2d(channels, widths[0], 4, 2, 1), spectral), nn.LeakyReLU(0.2, True)]
        for w_in, w_out in zip(widths[:-1], widths[1:]):
            layers.append(_sn(nn.Conv2d(w_in, w_out, 4, 2, 1, bias=spectral), spectral))
            if not spectral:
                layers.append(nn.BatchNorm2d(w_out))
            layers.append(nn.LeakyReLU(0.2, True))
        layers.append(_sn(nn.Conv2d(widths[-1], 1, 4, 1, 0), spectral))               # (B, 1, 1, 1)
        self.net = nn.Sequential(*layers)
        if not spectral:
            self.apply(_dcgan_init)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x).flatten()


def _dcgan_init(m: nn.Module) -> None:
    """Radford et al.: weights ~ N(0, 0.02); BatchNorm scale ~ N(1, 0.02)."""
    if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
        nn.init.normal_(m.weight, 0.0, 0.02)
    elif isinstance(m, nn.BatchNorm2d):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)


class SNGANGenerator(nn.Module):
    """Miyato et al. 2018 Table 3(a): z(128) -> dense 4x4x512 -> deconv 256, 128, 64 (4x4, stride 2,
    BN, ReLU) -> conv 3x3 to C, tanh. 32x32 output. Widths are multiples of ``base_channels``
    (the paper's: 64)."""

    def __init__(self, channels: int = 3, image_size: int = 32, latent_dim: int = 128, base_channels: int = 64):
        super().__init__()
        if image_size != 32:
            raise ValueError(f"the SNGAN standard CNN generates 32x32 images; got image_size={image_size}")
        self.latent_dim, b = latent_dim, base_channels
        self.top = 8 * b
        self.fc = nn.Linear(latent_dim, 4 * 4 * self.top)
        self.net = nn.Sequential(
            nn.BatchNorm2d(8 * b), nn.ReLU(True),
            nn.ConvTranspose2d(8 * b, 4 * b, 4, 2, 1), nn.BatchNorm2d(4 * b), nn.ReLU(True),
            nn.ConvTranspose2d(4 * b, 2 * b, 4, 2, 1), nn.BatchNorm2d(2 * b), nn.ReLU(True),
            nn.ConvTranspose2d(2 * b, b, 4, 2, 1), nn.BatchNorm2d(b), nn.ReLU(True),
            nn.Conv2d(b, channels, 3, 1, 1), nn.Tanh())

    def forward(self, z: Tensor) -> Tensor:
        return self.net(self.fc(z).view(-1, self.top, 4, 4))


class SNGANDiscriminator(nn.Module):
    """Miyato et al. 2018 Table 3(b): conv 3x3/4x4 pairs of 64, 128, 256 channels, conv 3x3 512,
    LeakyReLU(0.1), all spectrally normalised, dense -> 1. Widths are multiples of
    ``base_channels`` (the paper's: 64)."""

    def __init__(self, channels: int = 3, image_size: int = 32, base_channels: int = 64, spectral: bool = True):
        super().__init__()
        if image_size != 32:
            raise ValueError(f"the SNGAN standard CNN discriminates 32x32 images; got image_size={image_size}")
        b = base_channels
        spec = [(channels, b, 3, 1), (b, b, 4, 2), (b, 2 * b, 3, 1), (2 * b, 2 * b, 4, 2),
                (2 * b, 4 * b, 3, 1), (4 * b, 4 * b, 4, 2), (4 * b, 8 * b, 3, 1)]
        layers: list[nn.Module] = []
        for c_in, c_out, k, s in spec:
            layers += [_sn(nn.Conv2d(c_in, c_out, k, s, 1), spectral), nn.LeakyReLU(0.1, True)]
        self.net = nn.Sequential(*layers)
        self.fc = _sn(nn.Linear(4 * 4 * 8 * b, 1), spectral)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.net(x).flatten(1)).flatten()
