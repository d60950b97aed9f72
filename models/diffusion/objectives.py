"""What the diffusion network predicts, and how its regression loss is weighted over noise levels.

Each is one small class chosen by config (``model.diffusion.prediction``, ``model.diffusion.weighting``):
the process (gaussian_diffusion.py) converts any prediction to eps for its samplers, and the
training loss regresses the network on the prediction's own target with the chosen weight.

Notation: x_t = a x_0 + s eps with a = sqrt(abar_t), s = sqrt(1 - abar_t), SNR = a^2 / s^2.
"""
from __future__ import annotations

from torch import Tensor


class Prediction:
    """The network's output o and its regression target; ``to_eps`` maps o to the eps it implies."""

    name: str

    def target(self, x0: Tensor, eps: Tensor, a: Tensor, s: Tensor) -> Tensor:
        raise NotImplementedError

    def to_eps(self, out: Tensor, x_t: Tensor, a: Tensor, s: Tensor) -> Tensor:
        raise NotImplementedError

    def min_snr_weight(self, snr: Tensor, gamma: float) -> Tensor:
        """Hang et al. 2023 (Min-SNR-gamma), Sec. 3.4: the weight on this target's loss that gives
        the x_0-space loss weight min(SNR, gamma)."""
        raise NotImplementedError


class EpsPrediction(Prediction):
    """eps-prediction (Ho et al. 2020, Eq. 14): ||eps - o||^2 = SNR ||x_0 - x^_0||^2."""

    name = "eps"

    def target(self, x0, eps, a, s):
        return eps

    def to_eps(self, out, x_t, a, s):
        return out

    def min_snr_weight(self, snr, gamma):
        return snr.clamp(max=gamma) / snr


class X0Prediction(Prediction):
    """x_0-prediction: eps = (x_t - a o) / s."""

    name = "x0"

    def target(self, x0, eps, a, s):
        return x0

    def to_eps(self, out, x_t, a, s):
        return (x_t - a * out) / s

    def min_snr_weight(self, snr, gamma):
        return snr.clamp(max=gamma)


class VPrediction(Prediction):
    """v-prediction (Salimans & Ho 2022, Sec. 4 and App. D): v = a eps - s x_0, so that
    eps = s x_t + a v and ||v - o||^2 = (SNR + 1) ||x_0 - x^_0||^2."""

    name = "v"

    def target(self, x0, eps, a, s):
        return a * eps - s * x0

    def to_eps(self, out, x_t, a, s):
        return s * x_t + a * out

    def min_snr_weight(self, snr, gamma):
        return snr.clamp(max=gamma) / (snr + 1.0)


PREDICTIONS = {cls.name: cls for cls in (EpsPrediction, X0Prediction, VPrediction)}
WEIGHTINGS = ("uniform", "min_snr")


def prediction(name: str) -> Prediction:
    if name not in PREDICTIONS:
        raise ValueError(f"unknown model.diffusion.prediction {name!r}; choose one of {sorted(PREDICTIONS)}")
    return PREDICTIONS[name]()


def loss_weight(weighting: str, pred: Prediction, snr: Tensor, gamma: float) -> Tensor | None:
    """Per-sample weight of the regression loss: None (uniform, Ho et al.'s L_simple in the
    target's space) or Min-SNR-gamma."""
    if weighting == "uniform":
        return None
    return pred.min_snr_weight(snr, gamma)
