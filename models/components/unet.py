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


def check_geometry(image_size: int, channel_mult: Sequence[int], attention_resolutions: Sequence[int],
                   base_channels: int, norm_groups: int) -> list[int]:
    """The resolutions of a UNet (or its encoder half) after checking that the image halves
    cleanly, attention sits at existing resolutions and widths split into the norm groups."""
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
    return resolutions


class TimestepLabelEmbedding(nn.Module):
    """The conditioning vector of every residual block: an MLP of the sinusoidal timestep embedding,
    plus a learned class embedding for class-conditional networks (ADM, Dhariwal & Nichol 2021
    Sec. 3: "we add the class embedding to the timestep embedding"). With ``null_class`` the
    table has one more row, index ``num_classes``: the "no label" input that classifier-free
    guidance trains with label dropout (Ho & Salimans 2022)."""

    def __init__(self, base_channels: int, num_classes: int | None = None, null_class: bool = False):
        super().__init__()
        self.base_channels, self.dim = base_channels, 4 * base_channels
        self.mlp = nn.Sequential(nn.Linear(base_channels, self.dim), nn.SiLU(), nn.Linear(self.dim, self.dim))
        self.num_classes = int(num_classes) if num_classes else None
        self.null_class = bool(null_class) and self.num_classes is not None
        self.label = nn.Embedding(self.num_classes + int(self.null_class), self.dim) if self.num_classes else None

    def forward(self, t: Tensor, y: Tensor | None = None) -> Tensor:
        emb = self.mlp(timestep_embedding(t, self.base_channels))               # (B, 4ch)
        if self.label is not None:
            if y is None:
                raise ValueError(f"this network is class-conditional ({self.num_classes} classes): pass labels")
            emb = emb + self.label(y)
        return emb


def build_down_path(base_channels: int, widths: Sequence[int], num_res_blocks: int, resolutions: Sequence[int],
                    attention_resolutions: Sequence[int], temb_ch: int, dropout: float,
                    groups: int) -> tuple[nn.ModuleList, list[int], int]:
    """The downsampling half shared by the UNet and the noise-aware classifier: per resolution
    ``num_res_blocks`` residual blocks (+ attention), then a strided conv. Returns (stages, the
    channels of each skip output from conv_in on, the final width)."""
    down = nn.ModuleList()
    skip_chs, ch = [base_channels], base_channels
    for level, width in enumerate(widths):
        for _ in range(num_res_blocks):
            down.append(UNet.stage(ch, width, temb_ch, dropout, groups, resolutions[level] in attention_resolutions))
            ch = width
            skip_chs.append(ch)
        if level != len(widths) - 1:
            down.append(Downsample(ch))
            skip_chs.append(ch)
    return down, skip_chs, ch


def build_encoder(module: nn.Module, in_channels: int, base_channels: int, widths: Sequence[int],
                  num_res_blocks: int, resolutions: Sequence[int], attention_resolutions: Sequence[int],
                  temb_ch: int, dropout: float, groups: int) -> tuple[list[int], int]:
    """Give ``module`` the encoder the UNet and the noise-aware classifier share: ``conv_in``, the
    downsampling ``down`` stages and the ``mid`` block (ResBlock, attention, ResBlock). Returns the
    skip channels and the final width."""
    module.conv_in = nn.Conv2d(in_channels, base_channels, 3, padding=1)
    module.down, skip_chs, ch = build_down_path(base_channels, widths, num_res_blocks, resolutions,
                                                attention_resolutions, temb_ch, dropout, groups)
    module.mid = nn.ModuleList([ResBlock(ch, ch, temb_ch, dropout, groups), AttnBlock(ch, groups),
                                ResBlock(ch, ch, temb_ch, dropout, groups)])
    return skip_chs, ch


def encode(module: nn.Module, x: Tensor, temb: Tensor) -> tuple[Tensor, list[Tensor]]:
    """Run :func:`build_encoder`'s layers: (the middle block's output, the skip activations)."""
    hs = [module.conv_in(x)]
    for stage in module.down:
        hs.append(run_stage(stage, hs[-1], temb))
    return module.mid[2](module.mid[1](module.mid[0](hs[-1], temb)), temb), hs


def run_stage(stage: nn.Module, h: Tensor, temb: Tensor) -> Tensor:
    if isinstance(stage, nn.ModuleList):  # ResBlock [+ AttnBlock]
        h = stage[0](h, temb)
        for block in stage[1:]:
            h = block(h)
        return h
    return stage(h)  # Downsample / Upsample


class UNet(nn.Module):
    """eps_theta(x_t, t[, y]): (B, C, H, W), (B,)[, (B,) labels] -> (B, C, H, W).

    ``num_classes`` (None = unconditional) adds a class embedding to the timestep embedding;
    ``null_class`` reserves label ``num_classes`` for "unconditional" (classifier-free guidance).
    """

    def __init__(self, in_channels: int, image_size: int, base_channels: int = 128,
                 channel_mult: Sequence[int] = (1, 2, 2, 2), num_res_blocks: int = 2,
                 attention_resolutions: Sequence[int] = (16,), dropout: float = 0.1,
                 norm_groups: int = 32, out_channels: int | None = None, num_classes: int | None = None,
                 null_class: bool = False):
        super().__init__()
        resolutions = check_geometry(image_size, channel_mult, attention_resolutions, base_channels, norm_groups)
        num_levels = len(channel_mult)
        widths = [base_channels * m for m in channel_mult]
        self.in_channels, self.image_size, self.base_channels = in_channels, image_size, base_channels
        self.temb = TimestepLabelEmbedding(base_channels, num_classes, null_class)
        self.num_classes, self.null_class = self.temb.num_classes, self.temb.null_class
        temb_ch = self.temb.dim
        skip_chs, ch = build_encoder(self, in_channels, base_channels, widths, num_res_blocks, resolutions,
                                     attention_resolutions, temb_ch, dropout, norm_groups)

        self.up = nn.ModuleList()
        for level in reversed(range(num_levels)):
            width = widths[level]
            for _ in range(num_res_blocks + 1):
                self.up.append(self.stage(ch + skip_chs.pop(), width, temb_ch, dropout, norm_groups,
                                           resolutions[level] in attention_resolutions))
                ch = width
            if level != 0:
                self.up.append(Upsample(ch))

        self.norm_out = nn.GroupNorm(norm_groups, ch)
        self.conv_out = zero_module(nn.Conv2d(ch, out_channels or in_channels, 3, padding=1))

    @staticmethod
    def stage(in_ch, out_ch, temb_ch, dropout, groups, attention: bool) -> nn.ModuleList:
        blocks = [ResBlock(in_ch, out_ch, temb_ch, dropout, groups)]
        if attention:
            blocks.append(AttnBlock(out_ch, groups))
        return nn.ModuleList(blocks)

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        temb = self.temb(t, y)                                                 # (B, 4ch)
        h, hs = encode(self, x, temb)
        for stage in self.up:
            if isinstance(stage, nn.ModuleList):
                h = torch.cat([h, hs.pop()], dim=1)
            h = run_stage(stage, h, temb)
        return self.conv_out(F.silu(self.norm_out(h)))


class AttentionPool2d(nn.Module):
    """ADM's attention pooling (guided-diffusion unet.py, after CLIP): the mean of the H*W
    positions is prepended as a query token, positions get a learned embedding, one multi-head
    attention layer runs, and the query token's output, projected to ``out_dim``, is the result."""

    def __init__(self, spatial: int, ch: int, num_heads: int, out_dim: int):
        super().__init__()
        if ch % num_heads:
            raise ValueError(f"attention pooling: {ch} channels do not split into {num_heads} heads")
        self.positional = nn.Parameter(torch.randn(ch, spatial ** 2 + 1) / ch ** 0.5)
        self.qkv = nn.Conv1d(ch, 3 * ch, 1)
        self.proj = nn.Conv1d(ch, out_dim, 1)
        self.num_heads = num_heads

    def forward(self, x: Tensor) -> Tensor:
        b, c = x.shape[:2]
        x = x.reshape(b, c, -1)                                               # (B, C, HW)
        x = torch.cat([x.mean(-1, keepdim=True), x], dim=-1) + self.positional[None]  # (B, C, HW+1)
        q, k, v = self.qkv(x).reshape(b, 3, self.num_heads, c // self.num_heads, -1).transpose(-1, -2).unbind(1)
        out = F.scaled_dot_product_attention(q, k, v)                        # (B, heads, HW+1, C/heads)
        out = out.transpose(-1, -2).reshape(b, c, -1)
        return self.proj(out)[:, :, 0]                                        # (B, out_dim)


class EncoderClassifier(nn.Module):
    """The noise-aware classifier of ADM (Dhariwal & Nichol 2021, Sec. 4; guided-diffusion's
    EncoderUNetModel with pool="attention"): the UNet's downsampling half and middle block, with the
    timestep embedding, then GroupNorm, SiLU and attention pooling to class logits.
    log p(y | x_t, t): (B, C, H, W), (B,) -> (B, num_classes)."""

    def __init__(self, in_channels: int, image_size: int, num_classes: int, base_channels: int = 128,
                 channel_mult: Sequence[int] = (1, 2, 2, 2), num_res_blocks: int = 2,
                 attention_resolutions: Sequence[int] = (16,), dropout: float = 0.0, norm_groups: int = 32,
                 pool_heads: int = 1):
        super().__init__()
        resolutions = check_geometry(image_size, channel_mult, attention_resolutions, base_channels, norm_groups)
        widths = [base_channels * m for m in channel_mult]
        self.in_channels, self.image_size, self.num_classes = in_channels, image_size, int(num_classes)
        self.temb = TimestepLabelEmbedding(base_channels)
        _, ch = build_encoder(self, in_channels, base_channels, widths, num_res_blocks, resolutions,
                              attention_resolutions, self.temb.dim, dropout, norm_groups)
        self.norm_out = nn.GroupNorm(norm_groups, ch)
        self.pool = AttentionPool2d(resolutions[-1], ch, pool_heads, self.num_classes)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        h, _ = encode(self, x, self.temb(t))
        return self.pool(F.silu(self.norm_out(h)))
