"""DDPM (Ho et al. 2020): a noise-prediction network trained with L_simple, sampled with its EMA;
optionally class-conditional, with classifier-free guidance (Ho & Salimans 2022) and classifier
guidance by a noise-aware classifier (Dhariwal & Nichol 2021, Sec. 4)."""
from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from models.base import GenerativeModule, NetEMAMixin, NullClassMixin
from models.noise import Noise, randn
from models.components.ema import EMA
from models.diffusion.gaussian_diffusion import GaussianDiffusion

SAMPLERS = ("ancestral", "ddim", "dpm_solver_pp")
#: how the probability-flow likelihood meets 8-bit data (DDPM.log_likelihood)
ODE_STARTS = ("dequantized", "decoder")
#: the sampler settings a DDPM understands (evaluation.sampler / sampler.* overrides)
SAMPLER_DEFAULTS = {"name": "ancestral", "steps": None, "eta": 1.0,
                    "guidance_scale": 0.0, "classifier_ckpt": None, "classifier_scale": 0.0}


def scale_value(name: str, value: Any) -> float:
    """A guidance scale as a float >= 0, or an error naming the setting."""
    try:
        scale = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"sampler.{name} must be a number >= 0, got {value!r}") from None
    if not math.isfinite(scale) or scale < 0:
        raise ValueError(f"sampler.{name} must be a finite number >= 0, got {value!r}")
    return scale


class DDPM(NullClassMixin, NetEMAMixin, GenerativeModule):
    """Args:
        net: eps_theta(x_t, t), e.g. models.components.unet.UNet.
        diffusion: the Gaussian process (schedule, T, variance).
        optimizer: a ``_partial_`` torch optimizer.
        image_shape: (C, H, W) of the data.
        warmup_steps: linear learning-rate warm-up (Ho et al.: 5000); ``warmup_fraction``: the same as a
            fraction of the planned run, ``lr_decay``: constant or cosine over it (models/optim.py).
        ema_decay, ema_warmup, ema_rampup, ema_foreach: EMA of the network weights (components/ema.py); the EMA
            network samples and scores.
        sampler: default sampler, {name: ancestral|ddim|dpm_solver_pp, steps: int|null (null = all T), eta: float,
            guidance_scale: w of classifier-free guidance, classifier_ckpt: a noise-aware classifier's
            checkpoint and classifier_scale: s of classifier guidance}.
        sample_batch_size: images per network call when sampling / computing the bound.
        num_classes: class-conditional with this many classes (null = unconditional); the net must
            have the same (``net.num_classes``).
        label_dropout: probability p that a training label is replaced by the null class, which
            trains the unconditional model in the same network (Ho & Salimans 2022: p = 0.1 or 0.2);
            needs ``net.null_class``.
    """

    family = "ddpm"
    guidance_kinds = ("classifier_free", "classifier")

    @classmethod
    def likelihood_variants(cls) -> dict[str, dict[str, Any]]:
        """The variational bound, and the probability-flow ODE meeting the data dequantized (as the
        flows) or through the discretized decoder (as the bound): :meth:`log_likelihood`."""
        return {"elbo": {"likelihood.kind": "elbo"},
                "ode": {"likelihood.kind": "ode", "likelihood.start": "dequantized"},
                "ode, decoder start": {"likelihood.kind": "ode", "likelihood.start": "decoder"}}

    @classmethod
    def samplers_at_nfe(cls, nfe: int) -> dict[str, dict[str, Any]]:
        """DDIM (Song et al. 2021a) stochastic and deterministic, DPM-Solver++(2M) (Lu et al. 2022)
        and ancestral sampling on a process respaced to ``nfe`` steps (one network call each)."""
        return {"DDIM (eta=1)": {"name": "ddim", "steps": nfe, "eta": 1.0},
                "DDIM (eta=0)": {"name": "ddim", "steps": nfe, "eta": 0.0},
                "DPM-Solver++(2M)": {"name": "dpm_solver_pp", "steps": nfe, "eta": 0.0},
                "ancestral": {"name": "ancestral", "steps": nfe, "eta": 1.0}}

    def __init__(self, net: nn.Module, diffusion: GaussianDiffusion, optimizer: Callable[..., torch.optim.Optimizer],
                 image_shape: Sequence[int], warmup_steps: int = 0, ema_decay: float = 0.9999,
                 ema_warmup: bool = False, ema_foreach: bool = True, ema_rampup: float | None = None,
                 warmup_fraction: float | None = None, lr_decay: str = "constant", sampler: dict[str, Any] | None = None,
                 sample_batch_size: int = 256, num_classes: int | None = None, label_dropout: float = 0.0,
                 likelihood: dict[str, Any] | None = None):
        super().__init__(image_shape, num_classes)
        #: bits/dim from the variational bound ("elbo", Ho et al. Eq. 5) or from the probability-flow
        #: ODE ("ode", Song et al. 2021, Sec. D.2), with the ODE's rtol, atol and exact_max_dims, and
        #: how the ODE meets the 8-bit data (``start``: :meth:`log_likelihood`)
        self.likelihood_settings = {"kind": "elbo", "rtol": 1e-5, "atol": 1e-5, "exact_max_dims": 64,
                                    "start": "dequantized", "start_step": 0, **(likelihood or {})}
        if self.likelihood_settings["kind"] not in ("elbo", "ode"):
            raise ValueError(f"model.likelihood.kind={self.likelihood_settings['kind']!r}; choose elbo (the "
                             "variational bound) or ode (the probability-flow ODE)")
        if self.likelihood_settings["start"] not in ODE_STARTS:
            raise ValueError(f"model.likelihood.start={self.likelihood_settings['start']!r}; choose one of {ODE_STARTS}")
        step = self.likelihood_settings["start_step"] = int(self.likelihood_settings["start_step"])
        if not 0 <= step < diffusion.num_timesteps - 1 or (step and self.likelihood_settings["start"] != "decoder"):
            raise ValueError(f"model.likelihood.start_step={step}: the ODE can start at a timestep 0 <= k < "
                             f"{diffusion.num_timesteps - 1} of the process, after the bound's terms below it, "
                             "with model.likelihood.start=decoder only")
        self.likelihood_kind = self.likelihood_settings["kind"]
        self._likelihood_record: dict[str, Any] = {}
        self.set_label_dropout(net, label_dropout)
        if bool(getattr(net, "learn_sigma", False)) != diffusion.learned_variance:
            raise ValueError(
                f"model.diffusion.variance={diffusion.variance!r} but the network has learn_sigma="
                f"{getattr(net, 'learn_sigma', False)}: learned variances need both variance=learned_range and "
                "model.net.learn_sigma=true (Improved DDPM), fixed ones neither")
        if diffusion.learned_variance and diffusion.loss == "simple":
            raise ValueError(
                "model.diffusion.variance=learned_range with model.diffusion.loss=simple: L_simple gives the variance "
                "output v no gradient, so the run would report learned variances it never learned; set "
                "model.diffusion.loss=hybrid (Improved DDPM's L_hybrid) or use a fixed variance")
        self.save_hyperparameters(ignore=["net", "diffusion", "optimizer"], logger=False)
        self.net, self.diffusion, self.optimizer_factory = net, diffusion, optimizer
        self.ema = EMA(net, ema_decay, warmup=ema_warmup, foreach=ema_foreach, rampup=ema_rampup)
        self.set_schedule(warmup_steps, warmup_fraction, lr_decay)
        self.sample_batch_size = sample_batch_size
        unknown = sorted(set(sampler or {}) - set(SAMPLER_DEFAULTS))
        if unknown:
            raise ValueError(f"unknown DDPM sampler settings {unknown}; known: {sorted(SAMPLER_DEFAULTS)}")
        self.default_sampler = {**SAMPLER_DEFAULTS, **(sampler or {})}
        self._check_sampler(**self.default_sampler)
        #: noise-aware classifiers loaded for guidance, by checkpoint path (not submodules: never saved)
        self._classifiers: dict[str, Any] = {}

    # ---------------------------------------------------------------- training
    def networks(self) -> list[str]:
        return ["net"]

    def conditioned(self, net: nn.Module, labels: Tensor | None) -> Callable[[Tensor, Tensor], Tensor]:
        """eps(x_t, t) of ``net`` given the labels (the network itself when unconditional)."""
        return net if labels is None else (lambda x, t: net(x, t, labels))

    def training_loss(self, images: Tensor, labels: Tensor | None = None) -> dict[str, Tensor]:
        """{"loss": L_simple, or L_hybrid with learned variances} of a batch of images in [0, 1]
        (scripts/benchmark's bare loop calls it too); a conditional model uses the labels, each
        dropped to the null class with p = label_dropout."""
        x0 = images * 2.0 - 1.0                                               # (B, C, H, W) in [-1, 1]
        y = self.training_labels(labels)
        model = self.conditioned(self.net, None if y is None else self.drop_labels(y))
        return {"loss": self.diffusion.training_loss(model, x0).mean()}

    def validation_step(self, batch, batch_idx: int) -> None:
        x0 = batch[0] * 2.0 - 1.0
        # fixed noise so val/loss moves only with the weights
        gen = torch.Generator(device=x0.device).manual_seed(batch_idx)
        loss = self.diffusion.training_loss(self.conditioned(self.ema.shadow, self.training_labels(batch[1])),
                                            x0, generator=gen)
        self.log("val/loss", loss.mean(), prog_bar=True, sync_dist=True, batch_size=x0.shape[0])

    def configure_optimizers(self):
        return self.optimizer_with_schedule(self.optimizer_factory, self.net.parameters())

    # ---------------------------------------------------------------- the interface
    def _check_sampler(self, name: str = "ancestral", steps: int | None = None, eta: float = 1.0,
                       guidance_scale: float = 0.0, classifier_ckpt: str | None = None,
                       classifier_scale: float = 0.0) -> None:
        if name not in SAMPLERS:
            raise ValueError(f"unknown DDPM sampler {name!r}; choose one of {SAMPLERS}")
        if steps is not None and not 2 <= int(steps) <= self.diffusion.num_timesteps:
            raise ValueError(f"sampler steps must be in 2..{self.diffusion.num_timesteps}, got {steps}")
        if name == "ddim" and float(eta) > 0 and self.diffusion.learned_variance:
            raise ValueError(
                f"sampler.name=ddim with eta={eta}: DDIM's noise (Song et al. Eq. 16) ignores this model's learned "
                "variances; sample with them by sampler.name=ancestral sampler.steps=N (respaced, Improved DDPM "
                "Sec. 4), or set sampler.eta=0 (deterministic DDIM)")
        if scale_value("guidance_scale", guidance_scale) > 0 and not self.label_dropout:
            raise ValueError(
                f"sampler.guidance_scale={guidance_scale}: classifier-free guidance needs a model trained with a "
                "null class (model.num_classes and model.label_dropout > 0, e.g. 0.1); this one has none. Use "
                "classifier guidance instead (sampler.classifier_ckpt=<noisy classifier .ckpt> "
                "sampler.classifier_scale=s) or set sampler.guidance_scale=0")
        if scale_value("classifier_scale", classifier_scale) > 0 and not classifier_ckpt:
            raise ValueError(f"sampler.classifier_scale={classifier_scale} needs a noise-aware classifier: set "
                             "sampler.classifier_ckpt=<checkpoint of a model=noisy_classifier run>")

    def guidance_classifier(self, classifier_ckpt: str | None = None, **_):
        """The noise-aware classifier of ``classifier_ckpt``, loaded once and checked against this
        model (dataset, classes, image shape, diffusion schedule); None without one."""
        if not classifier_ckpt:
            return None
        key = str(classifier_ckpt)
        if key not in self._classifiers:
            from models.noisy_classifier import load_noisy_classifier

            classifier = load_noisy_classifier(key, self.device)
            classifier.check_guides(self)
            self._classifiers[key] = classifier
        return self._classifiers[key].to(self.device)

    def label_classes(self, **sampler_kw) -> int | None:
        """A conditional model's classes; for an unconditional one guided by a classifier, the classifier's."""
        kw = self.sampler_kwargs(**sampler_kw)
        classifier = self.guidance_classifier(**kw)
        return self.num_classes if classifier is None else classifier.num_classes

    def guided_eps_model(self, labels: Tensor | None, guidance_scale: float) -> Callable[[Tensor, Tensor], Tensor]:
        """The EMA network's eps given the labels; with w = ``guidance_scale`` > 0 classifier-free guidance
        (Ho & Salimans 2022, Eq. 6): eps = (1 + w) eps(x, c) - w eps(x, null), both halves in one forward pass."""
        net = self.ema.shadow
        if labels is None or self.num_classes is None:
            return net
        if guidance_scale == 0:
            return self.conditioned(net, labels)
        both = torch.cat([labels, torch.full_like(labels, self.null_label)])

        channels = self.image_shape[0]

        def eps(x: Tensor, t: Tensor) -> Tensor:
            cond, uncond = net(torch.cat([x, x]), torch.cat([t, t]), both).chunk(2)
            guided = (1.0 + guidance_scale) * cond[:, :channels] - guidance_scale * uncond[:, :channels]
            # learned variances: the conditional model's v (GLIDE, Nichol et al. 2022, guides eps only)
            return torch.cat([guided, cond[:, channels:]], dim=1)
        return eps

    def sampling_process(self, name: str = "ancestral", steps: int | None = None, **_):
        """The (respaced) diffusion process a sampler steps through: DPM-Solver++ on logSNR-uniform
        timesteps (Lu et al. 2022's choice for pixel models), the others evenly spaced in t."""
        return self.diffusion.respace(int(steps or self.diffusion.num_timesteps),
                                      "logsnr" if name == "dpm_solver_pp" else "uniform")

    @torch.no_grad()
    def sample(self, n: int, generator: Noise = None, labels: Tensor | None = None, **sampler_kw) -> Tensor:
        """Samples from the EMA network. sampler_kw: name (ancestral|ddim|dpm_solver_pp), steps, eta (ddim only),
        guidance_scale (classifier-free), classifier_ckpt + classifier_scale (classifier guidance)."""
        kw = self.sampler_kwargs(**sampler_kw)
        self._check_sampler(**kw)
        classifier = self.guidance_classifier(**kw)
        labels = self.check_labels(labels, n, self.label_classes(**kw))
        process = self.sampling_process(**kw)
        w, s = scale_value("guidance_scale", kw["guidance_scale"]), scale_value("classifier_scale", kw["classifier_scale"])

        def draw(m: int, noise: Noise, y: Tensor | None) -> Tensor:
            model = self.guided_eps_model(y, w)
            guidance = classifier.guidance_gradient(y, s) if classifier is not None and s > 0 else None
            if kw["name"] == "ddim":
                x = process.ddim_sample(model, m, self.image_shape, self.device, noise, eta=float(kw["eta"]),
                                        guidance=guidance)
            elif kw["name"] == "dpm_solver_pp":
                x = process.dpm_solver_pp_sample(model, m, self.image_shape, self.device, noise, guidance=guidance)
            else:
                x = process.ancestral_sample(model, m, self.image_shape, self.device, noise, guidance=guidance)
            return ((x + 1.0) / 2.0).clamp(0.0, 1.0)

        return self.sample_in_chunks(n, self.sample_batch_size, draw, generator, labels)

    @torch.no_grad()
    def log_likelihood(self, x: Tensor, generator: Noise = None, labels: Tensor | None = None) -> Tensor:
        """Lower bound on log p(x) (log p(x | y) when conditional) in nats: -L of Eq. 5 with the
        discretized decoder (Eq. 13); with ``likelihood.kind=ode`` from the probability-flow ODE
        (Song et al. 2021, Sec. D.2) from t = 1/T (timestep 0) to 1, which meets the 8-bit data
        (``likelihood.start``) either

        - "dequantized": as a flow does, the ODE's density of the uniformly dequantized image at
          timestep 0 (RealNVP's and flow matching's definition); or
        - "decoder": as the bound does, through timestep 0's noising and the discretized decoder,
          one latent x_0 ~ q(x_0 | x) per image:
          log p(x) >= log p(x | x_0) + log p_ode(x_0) - log q(x_0 | x),
          the bound of Eq. 5 with L_T + sum L_{t-1} for t >= 1 replaced by the ODE's density; with
          ``likelihood.start_step`` = k > 0 the bound keeps its terms L_0 ... L_k and the ODE scores
          x_k ~ q(x_k | x) (where along the noise the ODE and the bound part)."""
        model = self.conditioned(self.ema.shadow, self.check_labels(labels, x.shape[0]))
        if self.likelihood_kind == "ode":
            from models.flow_matching import dequantized_ode_log_likelihood, ode_density

            settings = {k: v for k, v in self.likelihood_settings.items() if k not in ("kind", "start", "start_step")}
            velocity, t0 = self.diffusion.probability_flow(model), 1.0 / self.diffusion.num_timesteps
            if self.likelihood_settings["start"] == "dequantized":
                nats, self._likelihood_record = dequantized_ode_log_likelihood(velocity, x, generator, **settings, t0=t0)
                return nats
            x0 = x * 2.0 - 1.0
            n, dims, k = x.shape[0], self.num_dims, self.likelihood_settings["start_step"]
            eps = randn(generator, n, x.shape[1:], x.device).to(x.dtype)
            latent = self.diffusion.q_sample(x0, torch.full((n,), k, device=x.device, dtype=torch.long), eps)
            # -log2 of the decoder and of the bound's transitions below timestep k, each term on its own
            # x_t ~ q(x_t | x) (a sum of expectations under the marginals, as the bound's own estimate)
            bound_bits = torch.zeros(n, dtype=torch.float64, device=x.device)
            for i in range(k + 1):
                t = torch.full((n,), i, device=x.device, dtype=torch.long)
                x_t = latent if i == k else self.diffusion.q_sample(x0, t, randn(generator, n, x.shape[1:], x.device).to(x.dtype))
                bound_bits += self.diffusion.vb_term_bpd(model, x0, x_t, t).double() * dims
            sigma2 = float(1.0 - self.diffusion.alphas_cumprod[k])
            log_q = -0.5 * eps.flatten(1).pow(2).sum(1) - 0.5 * dims * math.log(2 * math.pi * sigma2)
            log_p, record = ode_density(velocity, latent, generator, **settings, t0=(k + 1) * t0)
            self._likelihood_record = {**record, "start": f"decoder at timestep {k} (one x_k ~ q(x_k | x) per image)"}
            return (-bound_bits * math.log(2.0) + log_p - log_q.double()).to(x.dtype)
        bpd = self.diffusion.bpd(model, x * 2.0 - 1.0, generator)
        return -bpd * self.num_dims * math.log(2.0)

    def likelihood_details(self) -> dict[str, Any]:
        return dict(self._likelihood_record)

    def sampling_cost(self, **sampler_kw) -> dict[str, float]:
        """Network passes per sample: ``nfe`` of the diffusion network (two per step under classifier-free
        guidance), ``classifier_nfe`` of the guiding classifier (one forward and backward per step)."""
        kw = self.sampler_kwargs(**sampler_kw)
        steps = len(self.sampling_process(**kw).betas)
        cfg = scale_value("guidance_scale", kw["guidance_scale"]) > 0 and self.num_classes is not None
        cost = {"nfe": float(steps * (2 if cfg else 1))}
        if kw["classifier_ckpt"] and scale_value("classifier_scale", kw["classifier_scale"]) > 0:
            cost["classifier_nfe"] = float(steps)
        return cost
