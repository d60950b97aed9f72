"""The RealNVP multi-scale flow (Dinh et al. 2017, Sec. 3) as a plain nn.Module.

Each scale but the last: 3 affine couplings with alternating checkerboard masks, a squeeze
(C, H, W) -> (4C, H/2, W/2), 3 couplings with alternating channel-wise masks, then half of the
channels are factored out (Sec. 3.6). The last scale: 4 checkerboard couplings.
Affine coupling (Eq. 7-8): y_b = x_b * exp(s(x_a)) + t(x_a), y_a = x_a, log|det| = sum s(x_a),
with s a rescaled tanh and s, t from one ResNet with weight and/or batch normalisation (Sec. 3.5, 3.7).
forward: x (B, C, H, W) -> (z (B, D), log|det dz/dx| (B,)); inverse: z -> x.
"""
from __future__ import annotations

from torch import Tensor, nn
import torch
from torch.nn.utils.parametrizations import weight_norm


def squeeze(x: Tensor) -> Tensor:
    """(B, C, H, W) -> (B, 4C, H/2, W/2): each 2x2 spatial block becomes 4 channels."""
    b, c, h, w = x.shape
    return x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(b, 4 * c, h // 2, w // 2)


def unsqueeze(x: Tensor) -> Tensor:
    b, c, h, w = x.shape
    return x.reshape(b, c // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3).reshape(b, c // 4, 2 * h, 2 * w)


def checkerboard(h: int, w: int, parity: int, like: Tensor) -> Tensor:
    """(1, 1, H, W) mask, 1 where (i + j + parity) is even."""
    i = torch.arange(h, device=like.device)[:, None]
    j = torch.arange(w, device=like.device)[None, :]
    return ((i + j + parity) % 2 == 0).to(like.dtype)[None, None]


#: weight normalisation, batch normalisation, or both (the paper's choice, Sec. 3.7)
NORMS = ("weight", "batch", "weight_batch")


class ResNetST(nn.Module):
    """in conv -> num_blocks residual blocks -> out conv producing 2 * out_channels (s and t)."""

    def __init__(self, in_channels: int, out_channels: int, features: int, num_blocks: int, norm: str):
        super().__init__()
        if norm not in NORMS:
            raise ValueError(f"RealNVP coupling norm must be one of {NORMS}, got {norm!r}")
        wrap = weight_norm if "weight" in norm else (lambda m: m)
        bn = (lambda c: nn.BatchNorm2d(c)) if "batch" in norm else (lambda c: nn.Identity())
        self.conv_in = wrap(nn.Conv2d(in_channels, features, 3, padding=1))
        self.blocks = nn.ModuleList([
            nn.Sequential(bn(features), nn.ReLU(), wrap(nn.Conv2d(features, features, 3, padding=1)),
                          bn(features), nn.ReLU(), wrap(nn.Conv2d(features, features, 3, padding=1)))
            for _ in range(num_blocks)])
        self.norm_out = bn(features)
        self.conv_out = nn.Conv2d(features, 2 * out_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)  # each coupling starts as the identity
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for block in self.blocks:
            h = h + block(h)
        return self.conv_out(torch.relu(self.norm_out(h)))


class AffineCoupling(nn.Module):
    def __init__(self, channels: int, mask: str, parity: int, features: int, num_blocks: int, norm: str):
        super().__init__()
        self.mask, self.parity = mask, parity
        if mask == "checkerboard":
            cond, out = channels + 1, channels           # masked input + the mask itself
        else:
            cond, out = channels // 2, channels - channels // 2
        self.st = ResNetST(cond, out, features, num_blocks, norm)
        self.scale = nn.Parameter(torch.ones(1, out, 1, 1))

    def _s_t(self, cond: Tensor) -> tuple[Tensor, Tensor]:
        s, t = self.st(cond).chunk(2, dim=1)
        return self.scale * torch.tanh(s), t

    def _split(self, x: Tensor) -> tuple[Tensor, Tensor]:
        half = x.shape[1] // 2
        a, b = x[:, :half], x[:, half:]
        return (a, b) if self.parity == 0 else (x[:, x.shape[1] - half:], x[:, :x.shape[1] - half])

    def _merge(self, a: Tensor, b: Tensor) -> Tensor:
        return torch.cat([a, b], 1) if self.parity == 0 else torch.cat([b, a], 1)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if self.mask == "checkerboard":
            m = checkerboard(x.shape[2], x.shape[3], self.parity, x)
            s, t = self._s_t(torch.cat([x * m, m.expand(x.shape[0], 1, -1, -1)], 1))
            s, t = s * (1 - m), t * (1 - m)             # the conditioning half passes unchanged
            return x * torch.exp(s) + t, s.flatten(1).sum(1)
        a, b = self._split(x)
        s, t = self._s_t(a)
        return self._merge(a, b * torch.exp(s) + t), s.flatten(1).sum(1)

    def inverse(self, y: Tensor) -> Tensor:
        if self.mask == "checkerboard":
            m = checkerboard(y.shape[2], y.shape[3], self.parity, y)
            s, t = self._s_t(torch.cat([y * m, m.expand(y.shape[0], 1, -1, -1)], 1))
            s, t = s * (1 - m), t * (1 - m)
            return (y - t) * torch.exp(-s)
        a, b = self._split(y)
        s, t = self._s_t(a)
        return self._merge(a, (b - t) * torch.exp(-s))


def check_realnvp_size(image_size: int, num_scales: int) -> None:
    factor = 2 ** (num_scales - 1)
    if image_size % factor or image_size // factor < 2:
        raise ValueError(f"RealNVP with num_scales={num_scales} squeezes the image {num_scales - 1} time(s), so "
                         f"image_size must be divisible by {factor} and at least {2 * factor}; got {image_size}. "
                         "Change model.flow.num_scales or datamodule.image_size")


class RealNVPFlow(nn.Module):
    def __init__(self, channels: int, image_size: int, num_scales: int = 2, num_blocks: int = 8,
                 features: int = 64, norm: str = "weight"):
        super().__init__()
        check_realnvp_size(image_size, num_scales)
        self.scales = nn.ModuleList()
        self.shapes: list[tuple[int, int, int]] = []    # shapes of the factored-out parts, in order
        c, s = channels, image_size
        for level in range(num_scales):
            kw = dict(features=features, num_blocks=num_blocks, norm=norm)
            if level == num_scales - 1:
                self.scales.append(nn.ModuleList([AffineCoupling(c, "checkerboard", p % 2, **kw) for p in range(4)]))
                self.shapes.append((c, s, s))
            else:
                self.scales.append(nn.ModuleList(
                    [AffineCoupling(c, "checkerboard", p % 2, **kw) for p in range(3)]
                    + [AffineCoupling(4 * c, "channel", p % 2, **kw) for p in range(3)]))
                self.shapes.append((2 * c, s // 2, s // 2))
                c, s = 2 * c, s // 2

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        logdet = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
        zs = []
        for level, couplings in enumerate(self.scales):
            last = level == len(self.scales) - 1
            for k, coupling in enumerate(couplings):
                if not last and k == 3:
                    x = squeeze(x)
                x, ld = coupling(x)
                logdet = logdet + ld
            if not last:
                half = x.shape[1] // 2
                zs.append(x[:, :half].flatten(1))   # factor out (Sec. 3.6)
                x = x[:, half:]
        zs.append(x.flatten(1))
        return torch.cat(zs, 1), logdet

    def inverse(self, z: Tensor) -> Tensor:
        sizes = [c * h * w for c, h, w in self.shapes]
        parts = list(z.split(sizes, dim=1))
        c, h, w = self.shapes[-1]
        x = parts[-1].reshape(-1, c, h, w)
        for level in reversed(range(len(self.scales))):
            couplings = self.scales[level]
            last = level == len(self.scales) - 1
            if not last:
                c, h, w = self.shapes[level]
                x = torch.cat([parts[level].reshape(-1, c, h, w), x], 1)
            for k in reversed(range(len(couplings))):
                x = couplings[k].inverse(x)
                if not last and k == 3:
                    x = unsqueeze(x)
        return x
