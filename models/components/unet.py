"""The diffusion UNet: Ho et al. 2020 (Appendix B; diffusion_tf/models/unet.py) and, as options of
the same network, the ADM UNet of Dhariwal & Nichol 2021 (Sec. 3; guided-diffusion's unet.py).

PixelCNN++-style backbone: per resolution ``num_res_blocks`` residual blocks (GroupNorm, SiLU,
timestep embedding added after the first conv, dropout before the second), self-attention
blocks at the resolutions listed in ``attention_resolutions``, strided-conv downsampling,
nearest-neighbour + conv upsampling, skip connections concatenated on the way up.
With ch=128, channel_mult=(1, 2, 2, 2), num_res_blocks=2, attention at 16x16 on 32x32 inputs this
is the 35.7M-parameter CIFAR-10 network of the paper.

ADM's changes (its Table 1 ablation), each a switch here:
- ``num_heads`` / ``num_head_channels``: multi-head attention (a fixed number of heads, or a fixed
  width per head), at several resolutions (``attention_resolutions``);
- ``resblock_updown``: BigGAN's residual blocks for up- and downsampling (the resampling, nearest
  or 2x2 average pooling, inside a residual block on both branches) instead of the (strided) convs;
- ``use_scale_shift_norm``: adaptive group normalisation, AdaGN(h, e) = y_s GroupNorm(h) + y_b with
  (y_s, y_b) a linear projection of the timestep (+ class) embedding (ADM Sec. 3, written
  GroupNorm(h) (1 + s) + b as in guided-diffusion, so that the zero projection is the identity);
- ``learn_sigma``: a second set of C output channels, the v of the learned variances
  (Nichol & Dhariwal 2021, Eq. 15).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
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
    """The residual block. ``scale_shift``: the embedding scales and shifts the second GroupNorm
    (AdaGN) instead of being added after the first conv. ``resample`` "up" / "down": BigGAN's
    up/downsampling residual block (nearest x2 / 2x2 average pooling on both branches, after the
    first norm and SiLU on the residual one), with in_ch == out_ch as in guided-diffusion."""

    def __init__(self, in_ch: int, out_ch: int, temb_ch: int, dropout: float, groups: int,
                 scale_shift: bool = False, resample: str | None = None):
        super().__init__()
        if resample not in (None, "up", "down"):
            raise ValueError(f"resample must be None, 'up' or 'down', got {resample!r}")
        self.scale_shift, self.resample = scale_shift, resample
        self.norm1 = nn.GroupNorm(groups, in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.temb_proj = nn.Linear(temb_ch, 2 * out_ch if scale_shift else out_ch)
        self.norm2 = nn.GroupNorm(groups, out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = zero_module(nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def _resample(self, x: Tensor) -> Tensor:
        if self.resample == "up":
            return F.interpolate(x, scale_factor=2.0, mode="nearest")
        if self.resample == "down":
            return F.avg_pool2d(x, 2)
        return x

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        h = self.conv1(self._resample(F.silu(self.norm1(x))))                 # (B, out, H', W')
        x = self._resample(x)
        emb = self.temb_proj(F.silu(temb))[:, :, None, None]
        if self.scale_shift:
            scale, shift = emb.chunk(2, dim=1)
            h = self.norm2(h) * (1 + scale) + shift
        else:
            h = self.norm2(h + emb)
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class AttnBlock(nn.Module):
    """Spatial self-attention over the H*W positions with ``num_heads`` heads (1: Ho et al.'s)."""

    def __init__(self, ch: int, groups: int, num_heads: int = 1):
        super().__init__()
        if ch % num_heads:
            raise ValueError(f"attention: {ch} channels do not split into {num_heads} heads")
        self.num_heads = num_heads
        self.norm = nn.GroupNorm(groups, ch)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj = zero_module(nn.Conv2d(ch, ch, 1))

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b, 3, self.num_heads, c // self.num_heads, h * w)
        q, k, v = qkv.transpose(-1, -2).unbind(1)                             # (B, heads, HW, C/heads) each
        out = F.scaled_dot_product_attention(q, k, v)                        # (B, heads, HW, C/heads)
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


@dataclass(frozen=True)
class Blocks:
    """How the UNet and the encoder classifier build their blocks (the ADM switches in one place)."""

    temb_ch: int
    dropout: float
    groups: int
    num_heads: int = 1
    num_head_channels: int | None = None
    scale_shift: bool = False
    resblock_updown: bool = False

    def heads(self, ch: int) -> int:
        """guided-diffusion's rule: a fixed width per head when num_head_channels is set, else num_heads."""
        if not self.num_head_channels:
            return self.num_heads
        if ch % self.num_head_channels:
            raise ValueError(f"attention: {ch} channels are not a multiple of num_head_channels={self.num_head_channels}")
        return ch // self.num_head_channels

    def res(self, in_ch: int, out_ch: int, resample: str | None = None) -> ResBlock:
        return ResBlock(in_ch, out_ch, self.temb_ch, self.dropout, self.groups, self.scale_shift, resample)

    def attn(self, ch: int) -> AttnBlock:
        return AttnBlock(ch, self.groups, self.heads(ch))

    def stage(self, in_ch: int, out_ch: int, attention: bool) -> nn.ModuleList:
        """A ResBlock [+ attention]: one skip-producing (down) or skip-consuming (up) stage."""
        return nn.ModuleList([self.res(in_ch, out_ch)] + ([self.attn(out_ch)] if attention else []))

    def down(self, ch: int) -> nn.Module:
        return self.res(ch, ch, "down") if self.resblock_updown else Downsample(ch)

    def up(self, ch: int) -> nn.Module:
        return self.res(ch, ch, "up") if self.resblock_updown else Upsample(ch)


def build_encoder(module: nn.Module, in_channels: int, widths: Sequence[int], num_res_blocks: int,
                  resolutions: Sequence[int], attention_resolutions: Sequence[int],
                  blocks: Blocks) -> tuple[list[int], int]:
    """Give ``module`` the encoder the UNet and the noise-aware classifier share: ``conv_in`` (to the
    first level's width), the ``down`` stages (per resolution ``num_res_blocks`` residual blocks
    [+ attention], then a downsampling stage) and the ``mid`` block (ResBlock, attention, ResBlock).
    Returns the channels of each skip output from conv_in on, and the final width."""
    ch = widths[0]
    module.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
    module.down = nn.ModuleList()
    skip_chs = [ch]
    for level, width in enumerate(widths):
        for _ in range(num_res_blocks):
            module.down.append(blocks.stage(ch, width, resolutions[level] in attention_resolutions))
            ch = width
            skip_chs.append(ch)
        if level != len(widths) - 1:
            module.down.append(blocks.down(ch))
            skip_chs.append(ch)
    module.mid = nn.ModuleList([blocks.res(ch, ch), blocks.attn(ch), blocks.res(ch, ch)])
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
    if isinstance(stage, ResBlock):       # BigGAN up/downsampling block
        return stage(h, temb)
    return stage(h)                       # Downsample / Upsample


class UNet(nn.Module):
    """eps_theta(x_t, t[, y]): (B, C, H, W), (B,)[, (B,) labels] -> (B, C, H, W), or (B, 2C, H, W)
    with ``learn_sigma`` (eps, then the variance interpolation v).

    ``num_classes`` (None = unconditional) adds a class embedding to the timestep embedding;
    ``null_class`` reserves label ``num_classes`` for "unconditional" (classifier-free guidance).
    ``num_heads``, ``num_head_channels``, ``use_scale_shift_norm``, ``resblock_updown``: ADM's
    options (module docstring); their defaults are Ho et al.'s network.
    """

    def __init__(self, in_channels: int, image_size: int, base_channels: int = 128,
                 channel_mult: Sequence[int] = (1, 2, 2, 2), num_res_blocks: int = 2,
                 attention_resolutions: Sequence[int] = (16,), dropout: float = 0.1,
                 norm_groups: int = 32, out_channels: int | None = None, num_classes: int | None = None,
                 null_class: bool = False, num_heads: int = 1, num_head_channels: int | None = None,
                 use_scale_shift_norm: bool = False, resblock_updown: bool = False, learn_sigma: bool = False):
        super().__init__()
        resolutions = check_geometry(image_size, channel_mult, attention_resolutions, base_channels, norm_groups)
        num_levels = len(channel_mult)
        widths = [base_channels * m for m in channel_mult]
        self.in_channels, self.image_size, self.base_channels = in_channels, image_size, base_channels
        self.learn_sigma = bool(learn_sigma)
        if out_channels is not None and learn_sigma and out_channels != 2 * in_channels:
            raise ValueError(f"learn_sigma outputs 2 x {in_channels} channels; drop out_channels={out_channels}")
        self.out_channels = out_channels or in_channels * (2 if learn_sigma else 1)
        self.temb = TimestepLabelEmbedding(base_channels, num_classes, null_class)
        self.num_classes, self.null_class = self.temb.num_classes, self.temb.null_class
        blocks = Blocks(self.temb.dim, dropout, norm_groups, num_heads, num_head_channels,
                        use_scale_shift_norm, resblock_updown)
        skip_chs, ch = build_encoder(self, in_channels, widths, num_res_blocks, resolutions,
                                     attention_resolutions, blocks)

        self.up = nn.ModuleList()
        for level in reversed(range(num_levels)):
            width = widths[level]
            for _ in range(num_res_blocks + 1):
                self.up.append(blocks.stage(ch + skip_chs.pop(), width, resolutions[level] in attention_resolutions))
                ch = width
            if level != 0:
                self.up.append(blocks.up(ch))

        self.norm_out = nn.GroupNorm(norm_groups, ch)
        self.conv_out = zero_module(nn.Conv2d(ch, self.out_channels, 3, padding=1))

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
    timestep embedding, then GroupNorm, SiLU and attention pooling to class logits. The pooling has
    ``pool_heads`` heads, or one per ``num_head_channels`` channels when that is set (ADM's).
    log p(y | x_t, t): (B, C, H, W), (B,) -> (B, num_classes)."""

    def __init__(self, in_channels: int, image_size: int, num_classes: int, base_channels: int = 128,
                 channel_mult: Sequence[int] = (1, 2, 2, 2), num_res_blocks: int = 2,
                 attention_resolutions: Sequence[int] = (16,), dropout: float = 0.0, norm_groups: int = 32,
                 pool_heads: int = 1, num_heads: int = 1, num_head_channels: int | None = None,
                 use_scale_shift_norm: bool = False, resblock_updown: bool = False):
        super().__init__()
        resolutions = check_geometry(image_size, channel_mult, attention_resolutions, base_channels, norm_groups)
        widths = [base_channels * m for m in channel_mult]
        self.in_channels, self.image_size, self.num_classes = in_channels, image_size, int(num_classes)
        self.temb = TimestepLabelEmbedding(base_channels)
        blocks = Blocks(self.temb.dim, dropout, norm_groups, num_heads, num_head_channels,
                        use_scale_shift_norm, resblock_updown)
        _, ch = build_encoder(self, in_channels, widths, num_res_blocks, resolutions, attention_resolutions, blocks)
        self.norm_out = nn.GroupNorm(norm_groups, ch)
        heads = blocks.heads(ch) if num_head_channels else pool_heads
        self.pool = AttentionPool2d(resolutions[-1], ch, heads, self.num_classes)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        h, _ = encode(self, x, self.temb(t))
        return self.pool(F.silu(self.norm_out(h)))
