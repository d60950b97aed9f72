"""Discretized likelihoods of 8-bit images in [-1, 1] (bin half-width 1/255, edge bins open).

Shared by the DDPM decoder L_0 and the VAE decoder, so bits/dim of both are masses of the
same 256-level grid."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

BIN = 1.0 / 255.0  # half the width of one 8-bit level on [-1, 1]


def _std_normal_cdf(x: Tensor) -> Tensor:
    return 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))


def discretized_gaussian_log_likelihood(x: Tensor, mean: Tensor, log_scale: Tensor) -> Tensor:
    """Ho et al. 2020 Eq. 13: log of the N(mean, e^{2 log_scale}) mass of the 8-bit bin of x,
    with the edge bins extended to -inf / +inf. Elementwise, nats."""
    centered = x - mean
    inv_std = torch.exp(-log_scale)
    cdf_plus = _std_normal_cdf(inv_std * (centered + BIN))
    cdf_min = _std_normal_cdf(inv_std * (centered - BIN))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    cdf_delta = cdf_plus - cdf_min
    return torch.where(x < -0.999, log_cdf_plus,
                       torch.where(x > 0.999, log_one_minus_cdf_min, torch.log(cdf_delta.clamp(min=1e-12))))


def discretized_logistic_log_likelihood(x: Tensor, mean: Tensor, log_scale: Tensor) -> Tensor:
    """Salimans et al. 2017 (PixelCNN++) Eq. 2 with one mixture component: the Logistic(mean, s)
    mass of the 8-bit bin of x, edge bins open. Elementwise, nats. Uses log-sigmoid forms for
    stability: log sigma(a) = -softplus(-a), log(1 - sigma(a)) = -softplus(a)."""
    centered = x - mean
    inv_s = torch.exp(-log_scale)
    plus_in, min_in = inv_s * (centered + BIN), inv_s * (centered - BIN)
    log_cdf_plus = plus_in - F.softplus(plus_in)                 # log sigma(plus_in)
    log_one_minus_cdf_min = -F.softplus(min_in)                   # log(1 - sigma(min_in))
    cdf_delta = torch.sigmoid(plus_in) - torch.sigmoid(min_in)
    # in the middle of a tiny bin the difference underflows: use the density times the bin width
    mid_in = inv_s * centered
    log_pdf_mid = mid_in - log_scale - 2.0 * F.softplus(mid_in)
    log_delta = torch.where(cdf_delta > 1e-5, torch.log(cdf_delta.clamp(min=1e-12)), log_pdf_mid + math.log(2 * BIN))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


def bernoulli_log_likelihood(x: Tensor, logits: Tensor) -> Tensor:
    """log Bernoulli(x; sigmoid(logits)) for binary x in {0, 1}. Elementwise, nats."""
    return -F.binary_cross_entropy_with_logits(logits, x, reduction="none")
