"""The Gaussian diffusion process of Ho et al. 2020 ("DDPM"), independent of the network.

Equation numbers refer to Ho et al. 2020 unless stated. Images live in [-1, 1] here; the
network ``model(x_t, t)`` predicts the noise eps. Schedules are computed in float64 (as
diffusion_tf and improved-diffusion do) and cast on use.

Learned variances (Nichol & Dhariwal 2021, "Improved DDPM", Sec. 3.1): with ``variance="learned_range"``
the network outputs (eps, v), v in [-1, 1] per pixel, and Sigma_theta = exp(f log beta_t + (1 - f)
log beta~_t) with f = (v + 1) / 2 (their Eq. 15 with v mapped to [0, 1], as improved-diffusion does);
``loss="hybrid"`` trains it with L_hybrid = L_simple + lambda L_vlb (Eq. 16, lambda = 0.001), the
L_vlb term seeing the mean through a stop-gradient.

A process may be *respaced* (Nichol & Dhariwal 2021, Sec. 4): keeping a subsequence S of the
original timesteps defines a new process with betas 1 - abar_{S_i} / abar_{S_{i-1}}; the network is
still called with the original timestep indices (``timestep_map``). DDIM (Song et al. 2021) and
fast ancestral sampling both run on a respaced process.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from models.diffusion import objectives
from models.noise import Noise, randn
from models.components.likelihoods import discretized_gaussian_log_likelihood

EpsModel = Callable[[Tensor, Tensor], Tensor]
VARIANCES = ("fixedlarge", "fixedsmall", "learned_range")
LOSSES = ("simple", "hybrid")
#: classifier guidance: (x_t, original timestep) -> s * grad_x log p(y | x_t), the scaled gradient
GuidanceGradient = Callable[[Tensor, Tensor], Tensor]


def linear_betas(num_timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> np.ndarray:
    """Ho et al. Sec. 4: beta_t linear from 1e-4 to 0.02 over T=1000 steps. For other T the
    endpoints scale by 1000/T (improved-diffusion), so T=1000 gives the paper's values exactly."""
    scale = 1000.0 / num_timesteps
    return np.linspace(scale * beta_start, scale * beta_end, num_timesteps, dtype=np.float64)


def cosine_betas(num_timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> np.ndarray:
    """Nichol & Dhariwal 2021 Eq. 17: abar(t) = f(t)/f(0), f(t) = cos^2(((t/T + s)/(1 + s)) pi/2);
    beta_t = min(1 - abar(t)/abar(t-1), 0.999)."""
    def f(t):
        return math.cos((t / num_timesteps + s) / (1 + s) * math.pi / 2) ** 2
    return np.array([min(1 - f(i + 1) / f(i), max_beta) for i in range(num_timesteps)], dtype=np.float64)


def make_betas(schedule: str, num_timesteps: int) -> np.ndarray:
    if schedule == "linear":
        return linear_betas(num_timesteps)
    if schedule == "cosine":
        return cosine_betas(num_timesteps)
    raise ValueError(f"unknown beta schedule {schedule!r}; choose 'linear' or 'cosine'")


def normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


class GaussianDiffusion(nn.Module):
    """q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I) and the learned reverse process with
    fixed variances sigma_t^2 = beta_t ("fixedlarge", Ho's CIFAR-10 choice) or beta~_t ("fixedsmall"),
    or variances learned between the two ("learned_range", Improved DDPM; module docstring).

    The schedule lives on the device as float64 buffers, computed once here and moved with the
    module that owns the process (``.to(device)``), never copied from the host in a training or
    sampling step. They are not persistent: the config rebuilds them, checkpoints hold no copy.

    Args:
        num_timesteps: T.
        schedule: "linear" (Ho et al.) or "cosine" (Nichol & Dhariwal); ignored if ``betas`` given.
        variance: "fixedlarge", "fixedsmall" or "learned_range" (the network outputs 2C channels).
        clip_denoised: clip the predicted x_0 to [-1, 1] before computing the posterior mean.
        loss: "simple" (L_simple, Ho et al. Eq. 14) or "hybrid" (L_simple + vlb_weight L_vlb,
            Nichol & Dhariwal Eq. 16; needs variance="learned_range").
        vlb_weight: lambda of L_hybrid (the paper's 0.001).
        betas, timestep_map: set by :meth:`respace`; not for configs.
    """

    def __init__(self, num_timesteps: int = 1000, schedule: str = "linear", variance: str = "fixedlarge",
                 clip_denoised: bool = True, betas: Sequence[float] | None = None,
                 timestep_map: Sequence[int] | None = None, loss: str = "simple", vlb_weight: float = 0.001,
                 prediction: str = "eps", weighting: str = "uniform", min_snr_gamma: float = 5.0):
        super().__init__()
        self.objective = objectives.prediction(prediction)      # what the network outputs (objectives.py)
        if weighting not in objectives.WEIGHTINGS:
            raise ValueError(f"unknown model.diffusion.weighting {weighting!r}; choose one of {objectives.WEIGHTINGS}")
        if not float(min_snr_gamma) > 0:
            raise ValueError(f"model.diffusion.min_snr_gamma must be > 0, got {min_snr_gamma}")
        self.prediction, self.weighting, self.min_snr_gamma = prediction, weighting, float(min_snr_gamma)
        if variance not in VARIANCES:
            raise ValueError(f"unknown variance {variance!r}; choose one of {VARIANCES}")
        if loss not in LOSSES:
            raise ValueError(f"unknown diffusion loss {loss!r}; choose one of {LOSSES}")
        if loss == "hybrid" and variance != "learned_range":
            raise ValueError(f"loss=hybrid trains learned variances, but variance={variance!r} is fixed: set "
                             "model.diffusion.variance=learned_range and model.net.learn_sigma=true, or loss=simple")
        betas = make_betas(schedule, num_timesteps) if betas is None else np.asarray(betas, dtype=np.float64)
        if not ((betas > 0) & (betas <= 1)).all():
            raise ValueError("betas must lie in (0, 1]")
        self.schedule, self.variance, self.clip_denoised = schedule, variance, clip_denoised
        self.loss, self.vlb_weight = loss, float(vlb_weight)
        self.num_timesteps = len(betas)
        alphas = 1.0 - betas
        abar = np.cumprod(alphas)
        abar_prev = np.append(1.0, abar[:-1])
        # q(x_{t-1} | x_t, x_0) = N(mu~_t, beta~_t I), Eq. 6-7
        posterior_variance = betas * (1.0 - abar_prev) / (1.0 - abar)
        # beta~_0 = 0: use beta~_1 in the log (diffusion_tf's clipping)
        posterior_log_variance = np.log(np.append(posterior_variance[1], posterior_variance[1:]))
        if variance == "fixedlarge":  # sigma_t^2 = beta_t, with beta~_1 at t=0 (diffusion_tf)
            model_log_variance = np.log(np.append(posterior_variance[1], betas[1:]))
        else:
            model_log_variance = posterior_log_variance
        schedule_arrays = {
            "betas": betas, "alphas_cumprod": abar, "alphas_cumprod_prev": abar_prev,
            "sqrt_alphas_cumprod": np.sqrt(abar), "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - abar),
            "log_one_minus_alphas_cumprod": np.log(1.0 - abar),
            "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / abar), "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / abar - 1.0),
            "posterior_variance": posterior_variance, "posterior_log_variance_clipped": posterior_log_variance,
            "posterior_mean_coef1": betas * np.sqrt(abar_prev) / (1.0 - abar),
            "posterior_mean_coef2": (1.0 - abar_prev) * np.sqrt(alphas) / (1.0 - abar),
            "model_log_variance": model_log_variance, "log_betas": np.log(betas),
            "snr": abar / (1.0 - abar),
        }
        for name, array in schedule_arrays.items():
            self.register_buffer(name, torch.from_numpy(np.asarray(array, dtype=np.float64)), persistent=False)
        timestep_map = np.arange(len(betas)) if timestep_map is None else np.asarray(timestep_map)
        self.register_buffer("timestep_map", torch.from_numpy(timestep_map.astype(np.int64)), persistent=False)
        #: respaced processes by (step count, spacing), built once and kept beside this one (not submodules)
        self._respaced: dict[tuple[int, str], GaussianDiffusion] = {}

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _gather(arr: Tensor, t: Tensor, x: Tensor) -> Tensor:
        """arr[t] broadcast to x's shape: (B,) -> (B, 1, 1, 1), in x's dtype."""
        return arr[t].to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))

    def respace(self, steps: int, spacing: str = "uniform") -> "GaussianDiffusion":
        """A process over ``steps`` timesteps of this one, betas_i = 1 - abar_{S_i} / abar_{S_{i-1}}
        (improved-diffusion's space_timesteps): ``uniform`` = evenly spaced in t (one section);
        ``logsnr`` = the timesteps nearest to evenly spaced lambda = log(alpha / sigma), DPM-Solver's
        choice for low-resolution pixel models (Lu et al. 2022). Both keep t = 0 and t = T - 1 and
        give ``steps`` distinct timesteps. Built once per (steps, spacing), on this process's device."""
        if not 2 <= steps <= self.num_timesteps:
            raise ValueError(f"steps must be in 2..{self.num_timesteps}, got {steps}")
        if spacing not in ("uniform", "logsnr"):
            raise ValueError(f"unknown timestep spacing {spacing!r}; choose 'uniform' or 'logsnr'")
        if steps == self.num_timesteps:
            return self
        device = self.betas.device
        key = (steps, spacing)
        if key not in self._respaced or self._respaced[key].betas.device != device:
            all_abar = self.alphas_cumprod.cpu().numpy()
            if spacing == "uniform":
                use = np.unique(np.round(np.linspace(0, self.num_timesteps - 1, steps)).astype(int))
            else:
                lam = 0.5 * np.log(all_abar / (1.0 - all_abar))
                targets = np.linspace(lam[0], lam[-1], steps)
                nearest = np.abs(lam[None, :] - targets[:, None]).argmin(axis=1)     # increasing in t
                use = np.empty(steps, dtype=int)
                for j, t in enumerate(nearest):   # distinct: where two targets share a timestep, the next one up
                    use[j] = min(max(t, use[j - 1] + 1 if j else 0), self.num_timesteps - steps + j)
            abar = all_abar[use]
            betas = 1.0 - abar / np.append(1.0, abar[:-1])
            self._respaced[key] = GaussianDiffusion(
                len(use), schedule=self.schedule, variance=self.variance, clip_denoised=self.clip_denoised, betas=betas,
                loss=self.loss, vlb_weight=self.vlb_weight, prediction=self.prediction, weighting=self.weighting,
                min_snr_gamma=self.min_snr_gamma,
                timestep_map=self.timestep_map.cpu().numpy()[use]).to(device)
        return self._respaced[key]

    @property
    def learned_variance(self) -> bool:
        return self.variance == "learned_range"

    def model_output(self, model: EpsModel, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor | None]:
        """(eps, v) of the network at the original timesteps, eps converted from whatever the network
        predicts (``prediction``); v is None for fixed variances."""
        out, v = self.raw_output(model, x_t, t)
        return self.objective.to_eps(out, x_t, *self.signal_and_noise(t, x_t)), v

    def signal_and_noise(self, t: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
        """(sqrt(abar_t), sqrt(1 - abar_t)) broadcast to x."""
        return self._gather(self.sqrt_alphas_cumprod, t, x), self._gather(self.sqrt_one_minus_alphas_cumprod, t, x)

    def raw_output(self, model: EpsModel, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor | None]:
        """(the network's prediction, v) at the original timesteps, as the network gives them."""
        out = model(x_t, self.timestep_map[t])
        channels = x_t.shape[1]
        expected = 2 * channels if self.learned_variance else channels
        if out.shape[1] != expected:
            fix = ("model.net.learn_sigma=true" if self.learned_variance
                   else "model.diffusion.variance=learned_range (the network learns its variances)")
            raise ValueError(f"variance={self.variance!r} needs a network with {expected} output channels, this one "
                             f"gives {out.shape[1]}: set {fix}")
        return (out[:, :channels], out[:, channels:]) if self.learned_variance else (out, None)

    def model_eps(self, model: EpsModel, x_t: Tensor, t: Tensor) -> Tensor:
        return self.model_output(model, x_t, t)[0]

    def model_log_variance_of(self, v: Tensor | None, t: Tensor, x_t: Tensor) -> Tensor:
        """log Sigma_theta(x_t, t): the fixed one, or Nichol & Dhariwal Eq. 15,
        f log beta_t + (1 - f) log beta~_t with f = (v + 1) / 2."""
        if v is None:
            return self._gather(self.model_log_variance, t, x_t)
        frac = (v + 1.0) / 2.0
        return (frac * self._gather(self.log_betas, t, x_t)
                + (1.0 - frac) * self._gather(self.posterior_log_variance_clipped, t, x_t))

    # ------------------------------------------------------------------ forward process
    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """Eq. 4: x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps."""
        return (self._gather(self.sqrt_alphas_cumprod, t, x0) * x0
                + self._gather(self.sqrt_one_minus_alphas_cumprod, t, x0) * noise)

    def q_posterior(self, x0: Tensor, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """Eq. 7: mean and log-variance of q(x_{t-1} | x_t, x_0)."""
        mean = self._gather(self.posterior_mean_coef1, t, x_t) * x0 + self._gather(self.posterior_mean_coef2, t, x_t) * x_t
        return mean, self._gather(self.posterior_log_variance_clipped, t, x_t)

    def predict_x0(self, x_t: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """Eq. 4 inverted: x_0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)."""
        return (self._gather(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t
                - self._gather(self.sqrt_recipm1_alphas_cumprod, t, x_t) * eps)

    def predict_eps(self, x_t: Tensor, t: Tensor, x0: Tensor) -> Tensor:
        return ((self._gather(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t - x0)
                / self._gather(self.sqrt_recipm1_alphas_cumprod, t, x_t))

    # ------------------------------------------------------------------ reverse process
    def p_mean_variance(self, model: EpsModel, x_t: Tensor, t: Tensor) -> dict[str, Tensor]:
        """Eq. 11: mu_theta(x_t, t) = mu~_t(x^_0(x_t, eps_theta), x_t), with x^_0 optionally clipped,
        and the model's (fixed or learned) log-variance."""
        return self.mean_variance_of(*self.model_output(model, x_t, t), x_t, t)

    def mean_variance_of(self, eps: Tensor, v: Tensor | None, x_t: Tensor, t: Tensor,
                         clip: bool | None = None) -> dict[str, Tensor]:
        """:meth:`p_mean_variance` from a network output already computed; ``clip`` (default
        ``clip_denoised``) clips x^_0 to [-1, 1]."""
        x0 = self.predict_x0(x_t, t, eps)
        if self.clip_denoised if clip is None else clip:
            x0 = x0.clamp(-1.0, 1.0)
        mean, _ = self.q_posterior(x0, x_t, t)
        return {"mean": mean, "log_variance": self.model_log_variance_of(v, t, x_t), "pred_x0": x0}

    def training_loss(self, model: EpsModel, x0: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Eq. 14, L_simple = E_{t, x_0, eps} ||eps - eps_theta(x_t, t)||^2, t ~ U{0..T-1}, in the
        space of what the network predicts (``prediction``: eps, x_0 or v, objectives.py) and
        weighted per t by ``weighting`` (uniform, or Min-SNR-gamma, Hang et al. 2023); with
        loss="hybrid" plus lambda L_vlb (Nichol & Dhariwal Eq. 16), L_vlb = T * L_t in bits/dim for the
        sampled t (an unbiased estimate of the sum of Eq. 5's terms, improved-diffusion's scaling), computed
        with the mean detached so that only Sigma_theta learns from it (their Sec. 3.1), and from the
        unclipped x^_0 as improved-diffusion's training losses do (clipping is a sampling device; it
        stays for sampling and bits/dim). Returns (B,)."""
        b = x0.shape[0]
        t = torch.randint(0, self.num_timesteps, (b,), device=x0.device, generator=generator)
        noise = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
        x_t = self.q_sample(x0, t, noise)
        out, v = self.raw_output(model, x_t, t)
        a, s = self.signal_and_noise(t, x_t)
        loss = (out - self.objective.target(x0, noise, a, s)).pow(2).flatten(1).mean(1)
        weight = objectives.loss_weight(self.weighting, self.objective, self._gather(self.snr, t, loss), self.min_snr_gamma)
        if weight is not None:
            loss = loss * weight
        eps = self.objective.to_eps(out, x_t, a, s)
        if self.loss == "hybrid":
            vlb = self.vb_terms_of(x0, x_t, t, self.mean_variance_of(eps.detach(), v, x_t, t, clip=False))
            loss = loss + self.vlb_weight * self.num_timesteps * vlb
        return loss

    def guided_mean_variance(self, model: EpsModel, x_t: Tensor, t: Tensor,
                             guidance: GuidanceGradient | None = None) -> dict[str, Tensor]:
        """p_mean_variance, with the mean shifted by classifier guidance (Dhariwal & Nichol 2021,
        Algorithm 1): mu + Sigma * s grad_x log p_phi(y | x_t); ``guidance`` returns the scaled gradient."""
        out = self.p_mean_variance(model, x_t, t)
        if guidance is not None:
            out["mean"] = out["mean"] + torch.exp(out["log_variance"]) * guidance(x_t, self.timestep_map[t])
        return out

    def guided_eps(self, x_t: Tensor, t: Tensor, eps: Tensor, guidance: GuidanceGradient) -> Tensor:
        """Dhariwal & Nichol 2021 Algorithm 2 (DDIM): eps^ = eps - sqrt(1 - abar_t) s grad_x log p_phi(y | x_t)."""
        return eps - self._gather(self.sqrt_one_minus_alphas_cumprod, t, x_t) * guidance(x_t, self.timestep_map[t])

    def denoise(self, model: EpsModel, x_t: Tensor, t: Tensor,
                guidance: GuidanceGradient | None = None) -> tuple[Tensor, Tensor]:
        """(eps^, x^_0) of the deterministic samplers: x^_0 from the network's eps (clipped with
        clip_denoised), eps^ consistent with it (improved-diffusion); with ``guidance`` eps^ is the
        guided one (:meth:`guided_eps`) and x^_0 follows from it."""
        x0 = self.predict_x0(x_t, t, self.model_eps(model, x_t, t))
        if self.clip_denoised:
            x0 = x0.clamp(-1.0, 1.0)
        eps = self.predict_eps(x_t, t, x0)
        if guidance is not None:
            eps = self.guided_eps(x_t, t, eps, guidance)
            x0 = self.predict_x0(x_t, t, eps)
            if self.clip_denoised:
                # the guided eps^ moves x^_0 by (1 - abar_t) / sqrt(abar_t) s grad, which at the first
                # steps of a cosine schedule (abar_T ~ 1e-9) leaves the data range by orders of
                # magnitude; clipped like the unguided x^_0, with eps^ consistent with it
                x0 = x0.clamp(-1.0, 1.0)
                eps = self.predict_eps(x_t, t, x0)
        return eps, x0

    @torch.no_grad()
    def ancestral_sample(self, model: EpsModel, n: int, shape: Sequence[int], device: torch.device,
                         noise: Noise = None, guidance: GuidanceGradient | None = None) -> Tensor:
        """Algorithm 2: x_T ~ N(0, I); x_{t-1} = mu_theta(x_t, t) + sigma_t z, z ~ N(0, I) (z = 0 at t = 0);
        with ``guidance``, mu_theta is shifted as in :meth:`guided_mean_variance`."""
        x = randn(noise, n, shape, device)
        for i in reversed(range(self.num_timesteps)):
            t = torch.full((n,), i, device=device, dtype=torch.long)
            out = self.guided_mean_variance(model, x, t, guidance)
            x = out["mean"]
            if i > 0:
                x = x + torch.exp(0.5 * out["log_variance"]) * randn(noise, n, shape, device)
        return x

    @torch.no_grad()
    def ddim_sample(self, model: EpsModel, n: int, shape: Sequence[int], device: torch.device,
                    noise: Noise = None, eta: float = 0.0, guidance: GuidanceGradient | None = None) -> Tensor:
        """Song et al. 2021 Eq. 12: x_{t-1} = sqrt(abar_{t-1}) x^_0 + sqrt(1 - abar_{t-1} - sigma_t^2) eps^ + sigma_t z,
        sigma_t = eta sqrt((1 - abar_{t-1}) / (1 - abar_t)) sqrt(1 - abar_t / abar_{t-1}) (Eq. 16).
        eta=0 is deterministic DDIM; eta=1 with all steps is the DDPM posterior (fixedsmall variance).
        With ``guidance`` eps^ is the guided one (:meth:`guided_eps`) and x^_0 follows from it."""
        x = randn(noise, n, shape, device)
        for i in reversed(range(self.num_timesteps)):
            t = torch.full((n,), i, device=device, dtype=torch.long)
            eps, x0 = self.denoise(model, x, t, guidance)
            abar = self._gather(self.alphas_cumprod, t, x)
            abar_prev = self._gather(self.alphas_cumprod_prev, t, x)
            sigma = eta * torch.sqrt((1 - abar_prev) / (1 - abar)) * torch.sqrt(1 - abar / abar_prev)
            x = abar_prev.sqrt() * x0 + torch.sqrt((1 - abar_prev - sigma ** 2).clamp(min=0)) * eps
            if i > 0 and eta > 0:
                x = x + sigma * randn(noise, n, shape, device)
        return x

    @torch.no_grad()
    def dpm_solver_pp_sample(self, model: EpsModel, n: int, shape: Sequence[int], device: torch.device,
                             noise: Noise = None, guidance: GuidanceGradient | None = None) -> Tensor:
        """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2): the multistep second-order solver of the
        probability-flow ODE in data prediction, one network call per timestep of this process.
        With alpha_t = sqrt(abar_t), sigma_t = sqrt(1 - abar_t), lambda_t = log(alpha_t / sigma_t),
        h_i = lambda_{t_i} - lambda_{t_{i-1}} and r_i = h_{i-1} / h_i:
            D_i = (1 + 1 / (2 r_i)) x_theta(x_{t_{i-1}}) - 1 / (2 r_i) x_theta(x_{t_{i-2}})  (first step: x_theta),
            x_{t_i} = sigma_{t_i} / sigma_{t_{i-1}} x_{t_{i-1}} - alpha_{t_i} (e^{-h_i} - 1) D_i.
        The last step goes to sigma = 0 at first order (x = x_theta: "lower order final"), so the first-
        order solver is DDIM with eta = 0. x_theta is clipped like the other samplers; with
        ``guidance`` it is predicted from the guided eps (:meth:`guided_eps`). Run it on a
        ``respace(steps, "logsnr")`` process: on time-uniform steps of a linear schedule the last
        steps' lambda jumps (r_i << 1) make the second-order extrapolation overshoot."""
        x = randn(noise, n, shape, device)
        x0_prev = h_prev = None
        for i in reversed(range(self.num_timesteps)):
            t = torch.full((n,), i, device=device, dtype=torch.long)
            _, x0 = self.denoise(model, x, t, guidance)
            if i == 0:
                return x0
            abar, abar_next = self.alphas_cumprod[i], self.alphas_cumprod[i - 1]
            alpha_next, sigma, sigma_next = abar_next.sqrt(), (1 - abar).sqrt(), (1 - abar_next).sqrt()
            h = torch.log(alpha_next / sigma_next) - torch.log(abar.sqrt() / sigma)
            d = x0 if x0_prev is None else (1 + h / (2 * h_prev)) * x0 - h / (2 * h_prev) * x0_prev
            x = (sigma_next / sigma).to(x.dtype) * x - (alpha_next * torch.expm1(-h)).to(x.dtype) * d
            x0_prev, h_prev = x0, h
        return x

    # ------------------------------------------------------------------ probability-flow ODE
    def probability_flow(self, model: EpsModel) -> Callable[[Tensor, Tensor], Tensor]:
        """v(x, t), t in (0, 1]: the probability-flow ODE of this process's continuous-time limit,
        the VP SDE (Song et al. 2021, Eq. 13 with Eq. 32's drift f = -beta x / 2, g^2 = beta):

            dx/dt = -beta(t)/2 (x - eps_theta(x, t) / sigma(t)),

        grad log p_t = -eps / sigma. log abar(t) interpolates log abar linearly between t_k = k / T
        (t_0 = 0 with abar = 1, t_{k+1} holds timestep k), beta(t) = -d log abar / dt on each piece,
        sigma(t) = sqrt(1 - abar(t)), and the network sees the timestep t T - 1."""
        steps = self.num_timesteps
        log_abar = torch.cat([torch.zeros(1, dtype=torch.float64, device=self.alphas_cumprod.device),
                              torch.log(self.alphas_cumprod)])

        def velocity(x: Tensor, t: Tensor) -> Tensor:
            position = (t.to(torch.float64) * steps).clamp(0.0, float(steps))
            k = position.floor().clamp(max=steps - 1).long()
            rise = log_abar[k + 1] - log_abar[k]
            log_a = log_abar[k] + (position - k) * rise
            shape = (-1, *([1] * (x.ndim - 1)))
            beta = (-steps * rise).to(x.dtype).view(shape)
            abar = log_a.exp().to(x.dtype).view(shape)
            sigma = (1.0 - abar).sqrt()
            out = model(x, (position - 1.0).to(x.dtype))
            eps = self.objective.to_eps(out[:, :x.shape[1]], x, abar.sqrt(), sigma)
            return -0.5 * beta * (x - eps / sigma)
        return velocity

    # ------------------------------------------------------------------ likelihood bound
    def prior_bpd(self, x0: Tensor) -> Tensor:
        """L_T of Eq. 5 in bits/dim: KL(q(x_T | x_0) || N(0, I)), averaged over dims. (B,)"""
        t = torch.full((x0.shape[0],), self.num_timesteps - 1, device=x0.device, dtype=torch.long)
        mean = self._gather(self.sqrt_alphas_cumprod, t, x0) * x0
        logvar = self._gather(self.log_one_minus_alphas_cumprod, t, x0)
        kl = normal_kl(mean, logvar, torch.zeros_like(mean), torch.zeros_like(mean))
        return kl.flatten(1).mean(1) / math.log(2.0)

    def vb_term_bpd(self, model: EpsModel, x0: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """L_{t-1} of Eq. 5 for t > 0 (KL of Gaussians) and L_0 (Eq. 13, discretized decoder) for t = 0,
        in bits/dim. (B,)"""
        return self.vb_terms_of(x0, x_t, t, self.p_mean_variance(model, x_t, t))

    def vb_terms_of(self, x0: Tensor, x_t: Tensor, t: Tensor, out: dict[str, Tensor]) -> Tensor:
        """:meth:`vb_term_bpd` from the model's mean and log-variance already computed."""
        true_mean, true_logvar = self.q_posterior(x0, x_t, t)
        kl = normal_kl(true_mean, true_logvar, out["mean"], out["log_variance"]).flatten(1).mean(1) / math.log(2.0)
        decoder_nll = -discretized_gaussian_log_likelihood(
            x0, out["mean"], 0.5 * out["log_variance"]).flatten(1).mean(1) / math.log(2.0)
        return torch.where(t == 0, decoder_nll, kl)

    @torch.no_grad()
    def bpd(self, model: EpsModel, x0: Tensor, noise: Noise = None) -> Tensor:
        """The full variational bound L = L_T + sum_{t>=1} L_{t-1} + L_0 (Eq. 5) in bits/dim, one
        network call per timestep (improved-diffusion's calc_bpd_loop). x0: 8-bit images in [-1, 1]. (B,)"""
        n, shape = x0.shape[0], x0.shape[1:]
        total = self.prior_bpd(x0)
        for i in reversed(range(self.num_timesteps)):
            t = torch.full((n,), i, device=x0.device, dtype=torch.long)
            x_t = self.q_sample(x0, t, randn(noise, n, shape, x0.device).to(x0.dtype))
            total = total + self.vb_term_bpd(model, x0, x_t, t)
        return total
