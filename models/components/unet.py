"""The DDPM UNet of Ho et al. 2020 (Appendix B; diffusion_tf/models/unet.py), as a plain nn.Module.

PixelCNN++-style backbone: per resolution ``num_res_blocks`` residual blocks (GroupNorm, SiLU,
timestep embedding added after the first conv, dropout before the second), self-attention
blocks at the resolutions listed in ``attention_resolutions``, strided-conv downsampling,
nearest-neighbour + conv upsampling, skip connections concatenated on the way up.
With ch=128, channel_mult=(1, 2, 2, 2), num_res_blocks=2, attention at 16x16 on 32x32 inputs this
is the 35.7M-parameter CIFAR-10 network of the paper.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10_000.0) -> Tensor:
    """Sinusoidal embedding of (B,) timesteps -> (B, dim), as in the Transformer (Vaswani et al.)
    and diffusion_tf's get_timestep_embedding (sin half first, then cos)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / (half - 1))
    args = t.float()[:, None] * freqs[None]                                   # (B, half)
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


def zero_module(module: nn.Module) -> nn.Module:
    """Zero-initialise the last layer of a residual branch (diffusion_tf init_scale=0)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, temb_ch: int, dropout: float, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.temb_proj = nn.Linear(temb_ch, out_ch)
        self.norm2 = nn.GroupNorm(groups, out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = zero_module(nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))                                  # (B, out, H, W)
        h = h + self.temb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention over the H*W positions."""

    def __init__(self, ch: int, groups: int):
        super().__init__()
        self.norm = nn.GroupNorm(groups, ch)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj = zero_module(nn.Conv2d(ch, ch, 1))

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, c, h * w).transpose(-1, -2).unbind(1)  # (B, HW, C) each
        out = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]  # (B, HW, C)
        return x + self.proj(out.transpose(-1, -2).reshape(b, c, h, w))


class Downsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def supported_sizes(num_levels: int, max_size: int = 256) -> list[int]:
    """Image sizes a UNet with ``num_levels`` resolutions can halve num_levels-1 times (>= 4 px at the bottom)."""
    step = 2 ** (num_levels - 1)
    return [s for s in range(step * 2, max_size + 1, step) if s // step >= 2 and s % step == 0]


class UNet(nn.Module):
    """eps_theta(x_t, t): (B, C, H, W), (B,) -> (B, C, H, W)."""

    def __init__(self, in_channels: int, image_size: int, base_channels: int = 128,
                 channel_mult: Sequence[int] = (1, 2, 2, 2), num_res_blocks: int = 2,
                 attention_resolutions: Sequence[int] = (16,), dropout: float = 0.1,
                 norm_groups: int = 32, out_channels: int | None = None):
        super().__init__()
        num_levels = len(channel_mult)
        factor = 2 ** (num_levels - 1)
        if image_size % factor or image_size // factor < 2:
            raise ValueError(
                f"UNet with channel_mult={list(channel_mult)} halves the image {num_levels - 1} times, so "
                f"image_size must be a multiple of {factor} and at least {2 * factor}; got {image_size}. "
                f"Supported sizes up to 64: {supported_sizes(num_levels, 64)} (or change model.net.channel_mult)")
        resolutions = [image_size // 2 ** i for i in range(num_levels)]
        bad = [r for r in attention_resolutions if r not in resolutions]
        if bad:
            raise ValueError(f"attention_resolutions {bad} are not among this UNet's resolutions {resolutions}")
        widths = [base_channels * m for m in channel_mult]
        if any(w % norm_groups for w in widths):
            raise ValueError(f"channel widths {widths} must be divisible by norm_groups={norm_groups}")
        self.in_channels, self.image_size, self.base_channels = in_channels, image_size, base_channels
        temb_ch = 4 * base_channels
        self.temb = nn.Sequential(nn.Linear(base_channels, temb_ch), nn.SiLU(), nn.Linear(temb_ch, temb_ch))
        self.conv_in = nn.Conv2d(in_channels, base_channels, 3, padding=1)

        self.down = nn.ModuleList()
        skip_chs, ch = [base_channels], base_channels
        for level, width in enumerate(widths):
            for _ in range(num_res_blocks):
                self.down.append(self._stage(ch, width, temb_ch, dropout, norm_groups,
                                             resolutions[level] in attention_resolutions))
                ch = width
                skip_chs.append(ch)
            if level != num_levels - 1:
                self.down.append(Downsample(ch))
                skip_chs.append(ch)

        self.mid = nn.ModuleList([ResBlock(ch, ch, temb_ch, dropout, norm_groups), AttnBlock(ch, norm_groups),
                                  ResBlock(ch, ch, temb_ch, dropout, norm_groups)])

        self.up = nn.ModuleList()
        for level in reversed(range(num_levels)):
            width = widths[level]
            for _ in range(num_res_blocks + 1):
                self.up.append(self._stage(ch + skip_chs.pop(), width, temb_ch, dropout, norm_groups,
                                           resolutions[level] in attention_resolutions))
                ch = width
            if level != 0:
                self.up.append(Upsample(ch))

        self.norm_out = nn.GroupNorm(norm_groups, ch)
        self.conv_out = zero_module(nn.Conv2d(ch, out_channels or in_channels, 3, padding=1))

    @staticmethod
    def _stage(in_ch, out_ch, temb_ch, dropout, groups, attention: bool) -> nn.ModuleList:
        blocks = [ResBlock(in_ch, out_ch, temb_ch, dropout, groups)]
        if attention:
            blocks.append(AttnBlock(out_ch, groups))
        return nn.ModuleList(blocks)

    @staticmethod
    def _run(stage: nn.Module, h: Tensor, temb: Tensor) -> Tensor:
        if isinstance(stage, nn.ModuleList):  # ResBlock [+ AttnBlock]
            h = stage[0](h, temb)
            for block in stage[1:]:
                h = block(h)
            return h
        return stage(h)  # Downsample / Upsample

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        temb = self.temb(timestep_embedding(t, self.base_channels))           # (B, 4ch)
        hs = [self.conv_in(x)]
        for stage in self.down:
            hs.append(self._run(stage, hs[-1], temb))
        h = self.mid[2](self.mid[1](self.mid[0](hs[-1], temb)), temb)
        for stage in self.up:
            if isinstance(stage, nn.ModuleList):
                h = torch.cat([h, hs.pop()], dim=1)
            h = self._run(stage, h, temb)
        return self.conv_out(F.silu(self.norm_out(h)))
