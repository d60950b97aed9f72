"""GAN generators and discriminators as plain nn.Modules.

- DCGAN (Radford et al. 2016): transposed-conv generator with BatchNorm+ReLU and a tanh output;
  strided-conv discriminator with LeakyReLU(0.2) (BatchNorm, or spectral norm for SNGAN-style
  training). Sized from the image shape: 4x4 -> image_size by doubling, so image_size must be a
  power of two between 8 and 64.
- SNGAN "standard CNN" (Miyato et al. 2018, Table 3(a)/(b)) for 32x32 images.
Generators map z (B, latent_dim) -> images (B, C, H, W) in [-1, 1]; discriminators map images -> (B,) logits.

Class-conditional (``num_classes`` set), as in Miyato & Koyama 2018 and the BigGAN family: the
generator's batch norms get a per-class gain and bias (conditional batch norm), and the
discriminator adds a projection term <embed(y), phi(x)> to its output, phi(x) its last features
summed over positions ("cGANs with Projection Discriminator", Eq. 3).
"""
from __future__ import annotations

from torch import Tensor, nn
from torch.nn.utils.parametrizations import spectral_norm

from models.components.sizing import doubling_stages


def _sn(module: nn.Module, enabled: bool) -> nn.Module:
    return spectral_norm(module) if enabled else module


class ConditionalBatchNorm2d(nn.Module):
    """Batch norm without its own affine, then a per-class gain and bias (de Vries et al. 2017;
    Miyato & Koyama 2018 Sec. 5): gamma_y * BN(x) + beta_y, gamma initialised at 1, beta at 0."""

    def __init__(self, channels: int, num_classes: int):
        super().__init__()
        self.bn = nn.BatchNorm2d(channels, affine=False)
        self.gain, self.bias = nn.Embedding(num_classes, channels), nn.Embedding(num_classes, channels)
        nn.init.ones_(self.gain.weight)
        nn.init.zeros_(self.bias.weight)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        return self.bn(x) * self.gain(y)[:, :, None, None] + self.bias(y)[:, :, None, None]


def batch_norm(channels: int, num_classes: int | None) -> nn.Module:
    return ConditionalBatchNorm2d(channels, num_classes) if num_classes else nn.BatchNorm2d(channels)


def run_conditional(layers: nn.Sequential, x: Tensor, y: Tensor | None) -> Tensor:
    """Apply ``layers`` in order, giving the labels to the conditional batch norms."""
    for layer in layers:
        if isinstance(layer, ConditionalBatchNorm2d):
            if y is None:
                raise ValueError("this generator is class-conditional: pass labels")
            x = layer(x, y)
        else:
            x = layer(x)
    return x


class Projection(nn.Module):
    """The projection term of Miyato & Koyama 2018 (Eq. 3): y^T V phi(x), V a class embedding
    (spectrally normalised with the rest of the discriminator)."""

    def __init__(self, num_classes: int, channels: int, spectral: bool):
        super().__init__()
        self.embed = _sn(nn.Embedding(num_classes, channels), spectral)
        nn.init.xavier_uniform_(self.embed.weight if not spectral else self.embed.parametrizations.weight.original)

    def forward(self, features: Tensor, y: Tensor | None) -> Tensor:
        if y is None:
            raise ValueError("this discriminator is class-conditional (projection): pass labels")
        return (self.embed(y) * features).sum(1)


class DCGANGenerator(nn.Module):
    def __init__(self, channels: int, image_size: int, latent_dim: int = 100, base_channels: int = 64,
                 num_classes: int | None = None):
        super().__init__()
        stages = doubling_stages(image_size, "the DCGAN generator/discriminator go")
        self.latent_dim, self.num_classes = latent_dim, num_classes or None
        widths = [base_channels * 2 ** (stages - 1 - i) for i in range(stages)]      # e.g. 256, 128, 64
        layers: list[nn.Module] = [nn.ConvTranspose2d(latent_dim, widths[0], 4, 1, 0, bias=False),
                                   batch_norm(widths[0], num_classes), nn.ReLU(True)]       # (B, w0, 4, 4)
        for w_in, w_out in zip(widths[:-1], widths[1:]):
            layers += [nn.ConvTranspose2d(w_in, w_out, 4, 2, 1, bias=False), batch_norm(w_out, num_classes),
                       nn.ReLU(True)]
        layers += [nn.ConvTranspose2d(widths[-1], channels, 4, 2, 1), nn.Tanh()]
        self.net = nn.Sequential(*layers)
        self.apply(_dcgan_init)

    def forward(self, z: Tensor, y: Tensor | None = None) -> Tensor:
        return run_conditional(self.net, z[:, :, None, None], y)


class DCGANDiscriminator(nn.Module):
    def __init__(self, channels: int, image_size: int, base_channels: int = 64, spectral: bool = False,
                 num_classes: int | None = None):
        super().__init__()
        stages = doubling_stages(image_size, "the DCGAN generator/discriminator go")
        widths = [base_channels * 2 ** i for i in range(stages)]                      # e.g. 64, 128, 256
        layers: list[nn.Module] = [_sn(nn.Conv2d(channels, widths[0], 4, 2, 1), spectral), nn.LeakyReLU(0.2, True)]
        for w_in, w_out in zip(widths[:-1], widths[1:]):
            layers.append(_sn(nn.Conv2d(w_in, w_out, 4, 2, 1, bias=spectral), spectral))
            if not spectral:
                layers.append(nn.BatchNorm2d(w_out))
            layers.append(nn.LeakyReLU(0.2, True))
        self.net = nn.Sequential(*layers)                                             # (B, w, 4, 4)
        self.head = _sn(nn.Conv2d(widths[-1], 1, 4, 1, 0), spectral)                  # (B, 1, 1, 1)
        self.num_classes = num_classes or None
        self.projection = Projection(num_classes, widths[-1], spectral) if num_classes else None
        if not spectral:
            self.apply(_dcgan_init)

    def forward(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        h = self.net(x)
        out = self.head(h).flatten()
        return out if self.projection is None else out + self.projection(h.sum((2, 3)), y)


def _dcgan_init(m: nn.Module) -> None:
    """Radford et al.: weights ~ N(0, 0.02); BatchNorm scale ~ N(1, 0.02)."""
    if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
        nn.init.normal_(m.weight, 0.0, 0.02)
    elif isinstance(m, nn.BatchNorm2d) and m.affine:
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)


class SNGANGenerator(nn.Module):
    """Miyato et al. 2018 Table 3(a): z(128) -> dense 4x4x512 -> deconv 256, 128, 64 (4x4, stride 2,
    BN, ReLU) -> conv 3x3 to C, tanh. 32x32 output. Widths are multiples of ``base_channels``
    (the paper's: 64)."""

    def __init__(self, channels: int = 3, image_size: int = 32, latent_dim: int = 128, base_channels: int = 64,
                 num_classes: int | None = None):
        super().__init__()
        if image_size != 32:
            raise ValueError(f"the SNGAN standard CNN generates 32x32 images; got image_size={image_size}")
        self.latent_dim, self.num_classes, b = latent_dim, num_classes or None, base_channels
        self.top = 8 * b
        self.fc = nn.Linear(latent_dim, 4 * 4 * self.top)
        self.net = nn.Sequential(
            batch_norm(8 * b, num_classes), nn.ReLU(True),
            nn.ConvTranspose2d(8 * b, 4 * b, 4, 2, 1), batch_norm(4 * b, num_classes), nn.ReLU(True),
            nn.ConvTranspose2d(4 * b, 2 * b, 4, 2, 1), batch_norm(2 * b, num_classes), nn.ReLU(True),
            nn.ConvTranspose2d(2 * b, b, 4, 2, 1), batch_norm(b, num_classes), nn.ReLU(True),
            nn.Conv2d(b, channels, 3, 1, 1), nn.Tanh())

    def forward(self, z: Tensor, y: Tensor | None = None) -> Tensor:
        return run_conditional(self.net, self.fc(z).view(-1, self.top, 4, 4), y)


class SNGANDiscriminator(nn.Module):
    """Miyato et al. 2018 Table 3(b): conv 3x3/4x4 pairs of 64, 128, 256 channels, conv 3x3 512,
    LeakyReLU(0.1), all spectrally normalised, dense -> 1. Widths are multiples of
    ``base_channels`` (the paper's: 64)."""

    def __init__(self, channels: int = 3, image_size: int = 32, base_channels: int = 64, spectral: bool = True,
                 num_classes: int | None = None):
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
        self.num_classes = num_classes or None
        self.projection = Projection(num_classes, 8 * b, spectral) if num_classes else None

    def forward(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        h = self.net(x)                                                       # (B, 8b, 4, 4)
        out = self.fc(h.flatten(1)).flatten()
        return out if self.projection is None else out + self.projection(h.sum((2, 3)), y)
