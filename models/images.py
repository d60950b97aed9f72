"""The image boundary every family shares: float (N, C, H, W) images in [0, 1], and bits/dim."""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor


def bits_per_dim(nats: Tensor, num_dims: int) -> Tensor:
    """Negative log-likelihood in nats per image -> bits per dimension: nats / (D ln 2)."""
    return nats / (num_dims * math.log(2.0))


def check_images(images: Tensor, shape: Sequence[int], who: str) -> Tensor:
    """The boundary contract: float (N, C, H, W) images in [0, 1]; a clear error otherwise."""
    if images.ndim != 4 or tuple(images.shape[1:]) != tuple(shape):
        raise ValueError(f"{who} produced images of shape {tuple(images.shape)}, expected (N, {', '.join(map(str, shape))})")
    if not torch.isfinite(images).all():
        raise FloatingPointError(f"{who} produced non-finite pixel values (NaN/inf): the model has diverged")
    lo, hi = float(images.min()), float(images.max())
    if lo < -1e-6 or hi > 1 + 1e-6:
        raise ValueError(f"{who} produced pixel values in [{lo:.3f}, {hi:.3f}], outside [0, 1]; "
                         "sample() must return images in [0, 1]")
    return images
