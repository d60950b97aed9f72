"""Flow matching with the linear (rectified-flow) path (Lipman et al. 2023; Liu et al. 2023), and
likelihoods from its ODE.

The path joins data x_0 (t = 0) and noise eps ~ N(0, I) (t = 1) by a straight line,

    x_t = (1 - t) x_0 + t eps,        u_t = d x_t / dt = eps - x_0,

and the network v(x_t, t) regresses u_t (conditional flow matching, Lipman et al. Eq. 9 with the
optimal-transport path, Eq. 20-23; Liu et al.'s rectified flow, Eq. 1). Samples follow the ODE
dx/dt = v(x, t) from t = 1 to t = 0 (Euler, Heun, or scipy's adaptive RK45). The same ODE run
forwards gives the exact log-density of a continuous normalizing flow (Chen et al. 2018, Thm. 1):

    log p_0(x_0) = log N(x_1; 0, I) + int_0^1 div v(x_t, t) dt,

with the divergence exact (D backward passes) where D is small, or Hutchinson's estimate
eps^T (dv/dx) eps with a Rademacher probe held fixed along the path (Grathwohl et al. 2019, FFJORD)
above that.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from models.base import GenerativeModule, NetEMAMixin, NullClassMixin
from models.components.ema import EMA
from models.noise import Noise, SampleNoise, dequantize, randn

Velocity = Callable[[Tensor, Tensor], Tensor]   # v(x, t) with t of shape (B,)
TIME_DISTRIBUTIONS = ("uniform", "logit_normal")
SAMPLERS = ("euler", "heun", "adaptive")
SAMPLER_DEFAULTS = {"name": "heun", "steps": 25, "rtol": 1e-5, "atol": 1e-5, "guidance_scale": 0.0}


# ----------------------------------------------------------------------------- the path and its loss
def sample_time(n: int, distribution: str, device, generator: torch.Generator | None = None,
                loc: float = 0.0, scale: float = 1.0) -> Tensor:
    """(n,) times in (0, 1): uniform, or logit-normal t = sigmoid(loc + scale n), n ~ N(0, 1)
    (Esser et al. 2024, Eq. 19: more weight on the middle of the path)."""
    if distribution == "uniform":
        return torch.rand(n, device=device, generator=generator)
    if distribution == "logit_normal":
        return torch.sigmoid(loc + scale * torch.randn(n, device=device, generator=generator))
    raise ValueError(f"unknown time distribution {distribution!r}; choose one of {TIME_DISTRIBUTIONS}")


def flow_matching_loss(velocity: Velocity, x0: Tensor, t: Tensor, eps: Tensor) -> Tensor:
    """Per-example conditional flow-matching loss ||v(x_t, t) - (eps - x_0)||^2 / D (Lipman et al.
    Eq. 23 with sigma_min = 0), x_t = (1 - t) x_0 + t eps."""
    tb = t.view(-1, *([1] * (x0.dim() - 1)))
    x_t = (1.0 - tb) * x0 + tb * eps
    return (velocity(x_t, t) - (eps - x0)).pow(2).flatten(1).mean(1)


# ----------------------------------------------------------------------------- the ODE
def euler(velocity: Velocity, x: Tensor, steps: int) -> Tensor:
    """Euler from t = 1 to t = 0 on ``steps`` equal steps (``steps`` network calls)."""
    times = torch.linspace(1.0, 0.0, steps + 1, device=x.device, dtype=x.dtype)
    for t, t_next in zip(times[:-1], times[1:]):
        x = x + (t_next - t) * velocity(x, t.expand(x.shape[0]))
    return x


def heun(velocity: Velocity, x: Tensor, steps: int) -> Tensor:
    """Heun's second-order method (the trapezoid corrector of Karras et al. 2022, Alg. 1) from
    t = 1 to t = 0 on ``steps`` equal steps (2 x ``steps`` network calls)."""
    times = torch.linspace(1.0, 0.0, steps + 1, device=x.device, dtype=x.dtype)
    for t, t_next in zip(times[:-1], times[1:]):
        h = t_next - t
        d = velocity(x, t.expand(x.shape[0]))
        x_euler = x + h * d
        x = x + 0.5 * h * (d + velocity(x_euler, t_next.expand(x.shape[0])))
    return x


def solve_adaptive(f: Callable[[float, np.ndarray], np.ndarray], y0: np.ndarray, t0: float, t1: float,
                   rtol: float, atol: float) -> tuple[np.ndarray, int]:
    """scipy's RK45 (Dormand-Prince) from t0 to t1 at the given tolerances; (y(t1), network calls)."""
    from scipy.integrate import solve_ivp

    sol = solve_ivp(f, (t0, t1), y0, method="RK45", rtol=rtol, atol=atol)
    if not sol.success:
        raise RuntimeError(f"the adaptive ODE solver failed: {sol.message}")
    return sol.y[:, -1], int(sol.nfev)


def adaptive(velocity: Velocity, x: Tensor, rtol: float, atol: float) -> tuple[Tensor, int]:
    """The sampling ODE from t = 1 to t = 0 by RK45 (one step size for the batch); (x_0, calls)."""
    shape, device = x.shape, x.device

    def f(t: float, y: np.ndarray) -> np.ndarray:
        xt = torch.from_numpy(y).to(device=device, dtype=torch.float32).view(shape)
        return velocity(xt, torch.full((shape[0],), t, device=device)).double().cpu().numpy().ravel()

    y, calls = solve_adaptive(f, x.double().cpu().numpy().ravel(), 1.0, 0.0, rtol, atol)
    return torch.from_numpy(y).to(device=device, dtype=x.dtype).view(shape), calls


def divergence_exact(velocity: Velocity, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    """(v(x, t), div_x v) with the trace of the Jacobian summed from D backward passes."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        v = velocity(x, t)
        flat = v.flatten(1)
        div = torch.zeros(x.shape[0], device=x.device, dtype=v.dtype)
        for i in range(flat.shape[1]):
            (grad,) = torch.autograd.grad(flat[:, i].sum(), x, retain_graph=True)
            div = div + grad.flatten(1)[:, i]
    return v.detach(), div.detach()


def divergence_hutchinson(velocity: Velocity, x: Tensor, t: Tensor, probe: Tensor) -> tuple[Tensor, Tensor]:
    """(v(x, t), probe^T (dv/dx) probe): Hutchinson's unbiased estimate of the divergence for a
    probe with E[probe probe^T] = I (Hutchinson 1989; FFJORD)."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        v = velocity(x, t)
        (vjp,) = torch.autograd.grad((v * probe).sum(), x)
    return v.detach(), (vjp * probe).flatten(1).sum(1).detach()


def ode_log_likelihood(velocity: Velocity, x0: Tensor, rtol: float, atol: float, exact: bool = True,
                       probe: Tensor | None = None, t0: float = 0.0) -> tuple[Tensor, int]:
    """log p_t0(x0) in nats under the flow of ``velocity`` (module docstring), integrating x and
    the divergence together from t = t0 to t = 1 by RK45 against N(0, I) at t = 1;
    (per-example log-density, network calls)."""
    shape, device, n = x0.shape, x0.device, x0.shape[0]
    size = x0[0].numel()
    if not exact and probe is None:
        raise ValueError("Hutchinson's divergence needs a probe")

    def f(t: float, y: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(y[: n * size]).to(device=device, dtype=torch.float32).view(shape)
        tt = torch.full((n,), t, device=device)
        v, div = divergence_exact(velocity, x, tt) if exact else divergence_hutchinson(velocity, x, tt, probe)
        return np.concatenate([v.double().cpu().numpy().ravel(), div.double().cpu().numpy()])

    y0 = np.concatenate([x0.double().cpu().numpy().ravel(), np.zeros(n)])
    y1, calls = solve_adaptive(f, y0, t0, 1.0, rtol, atol)
    x1 = torch.from_numpy(y1[: n * size]).view(n, size)
    integral = torch.from_numpy(y1[n * size:])
    log_p1 = -0.5 * x1.pow(2).sum(1) - 0.5 * size * math.log(2 * math.pi)
    return (log_p1 + integral).to(device=device, dtype=torch.float64), calls


def dequantized_ode_log_likelihood(velocity: Velocity, x: Tensor, noise: Noise, rtol: float, atol: float,
                                   exact_max_dims: int, t0: float = 0.0) -> tuple[Tensor, dict[str, Any]]:
    """A lower bound on log P(x) of 8-bit images ``x`` in [0, 1], in nats, from an ODE on [-1, 1]
    data: uniform dequantization y = (255 x + u) / 256 (as RealNVP's), z = 2y - 1,
    log p(y) = log p(z) + D log 2 by :func:`ode_log_likelihood`, minus D log 256 (the 8-bit bin's
    width in y). The divergence is exact up to ``exact_max_dims`` dimensions, else Hutchinson's
    with one Rademacher probe per image from ``noise``. Also how it was computed."""
    z = dequantize(x, noise) * 2.0 - 1.0
    log_p, record = ode_density(velocity, z, noise, rtol, atol, exact_max_dims, t0)
    return (log_p + x[0].numel() * (math.log(2.0) - math.log(256.0))).to(x.dtype), record


def ode_density(velocity: Velocity, z: Tensor, noise: Noise, rtol: float, atol: float, exact_max_dims: int,
                t0: float = 0.0) -> tuple[Tensor, dict[str, Any]]:
    """log p_t0(z) in nats by :func:`ode_log_likelihood`: the divergence exact up to
    ``exact_max_dims`` dimensions, else Hutchinson's with one Rademacher probe per image from
    ``noise``; and how it was computed (recorded beside bits/dim)."""
    dims = z[0].numel()
    exact = dims <= int(exact_max_dims)
    probe = None
    if not exact:
        u = noise.rand(*z.shape[1:]).to(z) if isinstance(noise, SampleNoise) else \
            torch.rand(z.shape, generator=noise, device=z.device)
        probe = (u < 0.5).to(z.dtype) * 2.0 - 1.0
    log_p, calls = ode_log_likelihood(velocity, z, float(rtol), float(atol), exact, probe, t0)
    record = {"divergence": "exact" if exact else "hutchinson (1 Rademacher probe)", "rtol": float(rtol),
              "atol": float(atol), "solver": "scipy RK45", "function_calls": calls, "t0": float(t0)}
    return log_p, record


# ----------------------------------------------------------------------------- the family
class FlowMatching(NullClassMixin, NetEMAMixin, GenerativeModule):
    """Args:
        net: v(x_t, t), e.g. models.components.unet.UNet (the DDPM's; Ho or ADM options); it sees
            t x ``time_scale`` so that its timestep embedding covers the DDPM's range.
        optimizer: a ``_partial_`` torch optimizer.
        image_shape: (C, H, W) of the data.
        time_distribution: "uniform" or "logit_normal" (Esser et al. 2024; ``logit_normal_loc``, ``_scale``).
        warmup_steps, warmup_fraction, lr_decay, ema_*: as the DDPM's (models/optim.py, components/ema.py).
        sampler: {name: euler|heun|adaptive, steps (euler, heun), rtol and atol (adaptive),
            guidance_scale: classifier-free guidance w on the velocity}.
        likelihood: {rtol, atol: RK45's tolerances; exact_max_dims: the exact divergence up to this
            many dimensions (8x8 digits: 64), Hutchinson's estimate above}.
        num_classes, label_dropout: class conditioning with a null class (Ho & Salimans 2022), as the DDPM's.
    """

    family = "flow_matching"
    likelihood_kind = "ode"
    guidance_kinds = ("classifier_free",)
    # behind `scripts/main_job.py --families ... flow_matching`: make main is already at its time limit
    in_main_job = False

    @classmethod
    def samplers_at_nfe(cls, nfe: int) -> dict[str, dict[str, Any]]:
        """Euler with ``nfe`` steps; Heun with ``nfe`` / 2 (two velocity calls per step), at even NFE."""
        samplers = {"Euler": {"name": "euler", "steps": nfe}}
        if nfe % 2 == 0:
            samplers["Heun"] = {"name": "heun", "steps": nfe // 2}
        return samplers

    def __init__(self, net: nn.Module, optimizer: Callable[..., torch.optim.Optimizer], image_shape: Sequence[int],
                 time_distribution: str = "uniform", logit_normal_loc: float = 0.0, logit_normal_scale: float = 1.0,
                 time_scale: float = 1000.0, warmup_steps: int = 0, warmup_fraction: float | None = None,
                 lr_decay: str = "constant", ema_decay: float = 0.9999, ema_warmup: bool = False,
                 ema_foreach: bool = True, ema_rampup: float | None = None, sampler: dict[str, Any] | None = None,
                 likelihood: dict[str, Any] | None = None, sample_batch_size: int = 256,
                 num_classes: int | None = None, label_dropout: float = 0.0):
        super().__init__(image_shape, num_classes)
        self.set_label_dropout(net, label_dropout)
        if time_distribution not in TIME_DISTRIBUTIONS:
            raise ValueError(f"model.time_distribution={time_distribution!r}; choose one of {TIME_DISTRIBUTIONS}")
        if getattr(net, "learn_sigma", False):
            raise ValueError("model.net.learn_sigma=true: a flow-matching network outputs a velocity only; "
                             "set model.net.learn_sigma=false")
        self.save_hyperparameters(ignore=["net", "optimizer"], logger=False)
        self.net, self.optimizer_factory = net, optimizer
        self.time_distribution, self.time_scale = time_distribution, float(time_scale)
        self.logit_normal = (float(logit_normal_loc), float(logit_normal_scale))
        self.ema = EMA(net, ema_decay, warmup=ema_warmup, foreach=ema_foreach, rampup=ema_rampup)
        self.set_schedule(warmup_steps, warmup_fraction, lr_decay)
        self.sample_batch_size = int(sample_batch_size)
        unknown = sorted(set(sampler or {}) - set(SAMPLER_DEFAULTS))
        if unknown:
            raise ValueError(f"unknown flow-matching sampler settings {unknown}; known: {sorted(SAMPLER_DEFAULTS)}")
        self.default_sampler = {**SAMPLER_DEFAULTS, **(sampler or {})}
        self._check_sampler(**self.default_sampler)
        self.likelihood_settings = {"rtol": 1e-5, "atol": 1e-5, "exact_max_dims": 64, **(likelihood or {})}
        #: network calls per sample actually made since the last sampling_cost() (adaptive steps vary)
        self._calls, self._samples = 0, 0
        self._likelihood_record: dict[str, Any] = {}

    # ---------------------------------------------------------------- training
    def networks(self) -> list[str]:
        return ["net"]

    def velocity(self, net: nn.Module, labels: Tensor | None) -> Velocity:
        """v(x, t) of ``net`` (given the labels, when conditional)."""
        if labels is None:
            return lambda x, t: net(x, t * self.time_scale)
        return lambda x, t: net(x, t * self.time_scale, labels)

    def training_loss(self, images: Tensor, labels: Tensor | None = None) -> dict[str, Tensor]:
        """{"loss": the conditional flow-matching loss} of images in [0, 1], data scaled to [-1, 1]
        (as the DDPM's); a conditional model's labels each dropped to the null class with p = label_dropout."""
        x0 = images * 2.0 - 1.0
        y = self.training_labels(labels)
        y = None if y is None else self.drop_labels(y)
        t = sample_time(x0.shape[0], self.time_distribution, x0.device, None, *self.logit_normal)
        loss = flow_matching_loss(self.velocity(self.net, y), x0, t, torch.randn_like(x0))
        return {"loss": loss.mean()}

    def validation_step(self, batch, batch_idx: int) -> None:
        x0 = batch[0] * 2.0 - 1.0
        gen = torch.Generator(device=x0.device).manual_seed(batch_idx)   # fixed noise: val/loss moves with the weights
        t = torch.rand(x0.shape[0], device=x0.device, generator=gen)
        eps = torch.randn(x0.shape, device=x0.device, generator=gen)
        loss = flow_matching_loss(self.velocity(self.ema.shadow, self.training_labels(batch[1])), x0, t, eps)
        self.log("val/loss", loss.mean(), prog_bar=True, sync_dist=True, batch_size=x0.shape[0])

    def configure_optimizers(self):
        return self.optimizer_with_schedule(self.optimizer_factory, self.net.parameters())

    # ---------------------------------------------------------------- sampling
    def _check_sampler(self, name: str = "heun", steps: int | None = 25, rtol: float = 1e-5, atol: float = 1e-5,
                       guidance_scale: float = 0.0) -> None:
        if name not in SAMPLERS:
            raise ValueError(f"unknown flow-matching sampler {name!r}; choose one of {SAMPLERS}")
        if name != "adaptive" and (steps is None or int(steps) < 1):
            raise ValueError(f"sampler.steps must be >= 1 for {name}, got {steps}")
        if name == "adaptive" and not (float(rtol) > 0 and float(atol) > 0):
            raise ValueError(f"sampler.rtol and sampler.atol must be > 0, got {rtol}, {atol}")
        w = float(guidance_scale)
        if not math.isfinite(w) or w < 0:
            raise ValueError(f"sampler.guidance_scale must be a finite number >= 0, got {guidance_scale!r}")
        if w > 0 and not self.label_dropout:
            raise ValueError(f"sampler.guidance_scale={guidance_scale}: classifier-free guidance needs a model "
                             "trained with a null class (model.num_classes and model.label_dropout > 0)")

    def guided_velocity(self, labels: Tensor | None, guidance_scale: float) -> Velocity:
        """The EMA network's velocity; with w > 0 classifier-free guidance on the velocity,
        v = (1 + w) v(x, c) - w v(x, null) (Ho & Salimans 2022, Eq. 6, applied to v), one forward pass."""
        net = self.ema.shadow
        if labels is None or guidance_scale == 0:
            return self.velocity(net, labels)
        both = torch.cat([labels, torch.full_like(labels, self.null_label)])

        def v(x: Tensor, t: Tensor) -> Tensor:
            cond, uncond = net(torch.cat([x, x]), torch.cat([t, t]) * self.time_scale, both).chunk(2)
            return (1.0 + guidance_scale) * cond - guidance_scale * uncond
        return v

    @torch.no_grad()
    def sample(self, n: int, generator: Noise = None, labels: Tensor | None = None, **sampler_kw) -> Tensor:
        kw = self.sampler_kwargs(**sampler_kw)
        self._check_sampler(**kw)
        labels = self.check_labels(labels, n)
        w = float(kw["guidance_scale"])
        per_call = 2 if (w > 0 and self.num_classes is not None) else 1

        def draw(m: int, noise: Noise, y: Tensor | None) -> Tensor:
            velocity = self.guided_velocity(y, w)
            x1 = randn(noise, m, self.image_shape, self.device)
            if kw["name"] == "adaptive":
                x, calls = adaptive(velocity, x1, float(kw["rtol"]), float(kw["atol"]))
            else:
                steps = int(kw["steps"])
                x = (euler if kw["name"] == "euler" else heun)(velocity, x1, steps)
                calls = steps * (1 if kw["name"] == "euler" else 2)
            self._calls += calls * per_call * m
            self._samples += m
            return ((x + 1.0) / 2.0).clamp(0.0, 1.0)

        return self.sample_in_chunks(n, self.sample_batch_size, draw, generator, labels)

    def sampling_cost(self, **sampler_kw) -> dict[str, float]:
        """Network calls per sample actually made by the sampling since the last call (two per ODE
        evaluation under classifier-free guidance); before any sampling, the fixed solvers' count."""
        if self._samples:
            nfe = self._calls / self._samples
            self._calls, self._samples = 0, 0
            return {"nfe": float(nfe)}
        kw = self.sampler_kwargs(**sampler_kw)
        if kw["name"] == "adaptive":
            return {"nfe": float("nan")}
        per_call = 2 if (float(kw["guidance_scale"]) > 0 and self.num_classes is not None) else 1
        return {"nfe": float(int(kw["steps"]) * (1 if kw["name"] == "euler" else 2) * per_call)}

    # ---------------------------------------------------------------- likelihood
    @torch.no_grad()
    def log_likelihood(self, x: Tensor, generator: Noise = None, labels: Tensor | None = None) -> Tensor:
        """A lower bound on log P(x) of 8-bit images in nats from the ODE of the EMA network
        (:func:`dequantized_ode_log_likelihood`; log p(x | y) when conditional)."""
        y = self.check_labels(labels, x.shape[0])
        nats, self._likelihood_record = dequantized_ode_log_likelihood(
            self.velocity(self.ema.shadow, y), x, generator, **self.likelihood_settings)
        return nats

    def likelihood_details(self) -> dict[str, Any]:
        return dict(self._likelihood_record)
