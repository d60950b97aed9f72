"""VAE (Kingma & Welling 2014) with a discretized decoder and the importance-weighted bound
(Burda et al. 2016) as its log-likelihood."""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from models.base import GenerativeModule
from models.noise import Noise, SampleNoise, randn
from models.components.likelihoods import (bernoulli_log_likelihood, discretized_gaussian_log_likelihood,
                                           discretized_logistic_log_likelihood)

LIKELIHOODS = {"bernoulli": 1, "discretized_logistic": 2, "discretized_gaussian": 2}  # params per pixel

LOG_2PI = math.log(2 * math.pi)


def gaussian_log_prob(z: Tensor, mean: Tensor, log_var: Tensor) -> Tensor:
    """log N(z; mean, diag(exp(log_var))), summed over the last dim."""
    return -0.5 * (LOG_2PI + log_var + (z - mean) ** 2 * torch.exp(-log_var)).sum(-1)


class VAE(GenerativeModule):
    """Args:
        encoder: x in [-1, 1] -> (mean, log_var) of q(z|x); decoder: z -> decoder parameters.
        likelihood: "bernoulli" (binary data only), "discretized_logistic" or "discretized_gaussian"
            (8-bit data; masses of the 256-level bins, so the bound is on the discrete likelihood).
        kl_warmup_steps: beta = min(1, step / kl_warmup_steps) on the KL term (0 = plain ELBO).
        iw_samples: K of the importance-weighted bound used by ``log_likelihood``.
        sample_mean: samples are the decoder mean (default; the usual VAE practice, less noisy
            than sampling every pixel independently) or draws from p(x|z).
        num_classes: a conditional VAE with this many classes (null = unconditional): q(z|x,y),
            p(x|z,y), prior N(0, I); its bound is on log p(x | y). Encoder and decoder must agree.
    """

    family = "vae"
    likelihood_kind = "elbo"

    def __init__(self, encoder: nn.Module, decoder: nn.Module, optimizer: Callable, image_shape: Sequence[int],
                 latent_dim: int = 32, likelihood: str = "discretized_logistic", kl_warmup_steps: int = 0,
                 iw_samples: int = 100, sample_mean: bool = True, warmup_steps: int = 0, sample_batch_size: int = 256,
                 num_classes: int | None = None, warmup_fraction: float | None = None, lr_decay: str = "constant"):
        super().__init__(image_shape, num_classes)
        for name, net in (("encoder", encoder), ("decoder", decoder)):
            if getattr(net, "num_classes", None) != self.num_classes:
                raise ValueError(f"model.num_classes={self.num_classes} but the {name} has num_classes="
                                 f"{getattr(net, 'num_classes', None)}; set model.{name}.num_classes to match")
        if likelihood not in LIKELIHOODS:
            raise ValueError(f"unknown VAE likelihood {likelihood!r}; choose one of {sorted(LIKELIHOODS)}")
        self.save_hyperparameters(ignore=["encoder", "decoder", "optimizer"], logger=False)
        self.encoder, self.decoder, self.optimizer_factory = encoder, decoder, optimizer
        self.latent_dim, self.likelihood = latent_dim, likelihood
        self.kl_warmup_steps, self.iw_samples, self.sample_mean = kl_warmup_steps, iw_samples, sample_mean
        self.sample_batch_size = sample_batch_size
        self.set_schedule(warmup_steps, warmup_fraction, lr_decay)

    # ---------------------------------------------------------------- pieces
    def decoder_log_prob(self, x: Tensor, params: Tensor) -> Tensor:
        """log p(x | z) summed over pixels; x in [0, 1]. (B,)"""
        if self.likelihood == "bernoulli":
            return bernoulli_log_likelihood(x, params).flatten(1).sum(1)
        mean, log_scale = params.chunk(2, dim=1)
        log_scale = log_scale.clamp(min=-7.0)
        fn = discretized_logistic_log_likelihood if self.likelihood == "discretized_logistic" \
            else discretized_gaussian_log_likelihood
        return fn(x * 2.0 - 1.0, torch.tanh(mean), log_scale).flatten(1).sum(1)

    def decoder_mean(self, params: Tensor) -> Tensor:
        """E[x | z] in [0, 1] (for the discretized families: the location, which is the mean up to edge effects)."""
        if self.likelihood == "bernoulli":
            return torch.sigmoid(params)
        return (torch.tanh(params.chunk(2, dim=1)[0]) + 1.0) / 2.0

    def elbo_terms(self, x: Tensor, eps: Tensor | None = None, y: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """(log p(x|z[,y]), KL(q(z|x[,y]) || N(0, I)) analytic, z) with z = mean + sigma * eps (reparameterised)."""
        mean, log_var = self.encoder(x * 2.0 - 1.0, y)
        eps = torch.randn_like(mean) if eps is None else eps
        z = mean + torch.exp(0.5 * log_var) * eps
        kl = 0.5 * (mean ** 2 + log_var.exp() - 1.0 - log_var).sum(1)
        return self.decoder_log_prob(x, self.decoder(z, y)), kl, z

    # ---------------------------------------------------------------- training
    def on_fit_start(self) -> None:
        if self.likelihood == "bernoulli" and self.trainer.datamodule is not None:
            x = torch.stack([self.trainer.datamodule.split("train")[i][0] for i in range(64)])
            if not torch.all((x == 0) | (x == 1)):
                raise ValueError("model.likelihood=bernoulli needs binary images (0/1), but the data has grey levels; "
                                 "use discretized_logistic or discretized_gaussian for 8-bit data")

    def networks(self) -> list[str]:
        return ["encoder", "decoder"]

    def training_loss(self, images: Tensor, labels: Tensor | None = None) -> dict[str, Tensor]:
        """{"loss": the KL-annealed negative ELBO in nats per dim, "elbo_bpd": the plain negative
        ELBO in bits/dim} of a batch in [0, 1] (scripts/benchmark's bare loop calls it too)."""
        rec, kl, _ = self.elbo_terms(images, y=self.training_labels(labels))
        beta = min(1.0, self.global_step / self.kl_warmup_steps) if self.kl_warmup_steps else 1.0
        return {"loss": (kl * beta - rec).mean() / self.num_dims,
                "elbo_bpd": (kl - rec).detach().mean() / (self.num_dims * math.log(2))}

    def validation_step(self, batch, batch_idx: int) -> None:
        x = batch[0]
        rec, kl, _ = self.elbo_terms(x, torch.randn(x.shape[0], self.latent_dim, device=self.device,
                                                    generator=torch.Generator(self.device).manual_seed(batch_idx)),
                                     self.training_labels(batch[1]))
        self.log("val/loss", ((kl - rec).mean() / self.num_dims), prog_bar=True, sync_dist=True, batch_size=x.shape[0])

    def configure_optimizers(self):
        return self.optimizer_with_schedule(self.optimizer_factory, self.parameters())

    # ---------------------------------------------------------------- the interface
    @torch.no_grad()
    def log_likelihood(self, x: Tensor, generator: Noise = None, labels: Tensor | None = None,
                       num_samples: int | None = None) -> Tensor:
        """Burda et al. 2016 Eq. 8: log p(x) >= E log (1/K) sum_k p(x, z_k) / q(z_k | x), z_k ~ q(z|x).
        K=1 is the ELBO; the bound tightens as K grows. Nats per image. (B,) Conditional: every
        density given y, a bound on log p(x | y)."""
        k = int(num_samples or self.iw_samples)
        b = x.shape[0]
        y = self.check_labels(labels, b)
        mean, log_var = self.encoder(x * 2.0 - 1.0, y)                           # (B, L)
        eps = randn(generator, b, (k, self.latent_dim), self.device) if isinstance(generator, SampleNoise) \
            else torch.randn(b, k, self.latent_dim, device=self.device, generator=generator)  # (B, K, L)
        z = mean[:, None] + torch.exp(0.5 * log_var)[:, None] * eps
        log_q = gaussian_log_prob(z, mean[:, None], log_var[:, None])           # (B, K)
        log_prior = gaussian_log_prob(z, torch.zeros_like(z), torch.zeros_like(z))
        params = self.decoder(z.reshape(b * k, self.latent_dim), None if y is None else y.repeat_interleave(k))
        x_rep = x[:, None].expand(b, k, *x.shape[1:]).reshape(b * k, *x.shape[1:])
        log_px = self.decoder_log_prob(x_rep, params).reshape(b, k)
        return torch.logsumexp(log_px + log_prior - log_q, dim=1) - math.log(k)

    @torch.no_grad()
    def sample(self, n: int, generator: Noise = None, labels: Tensor | None = None, **sampler_kw) -> Tensor:
        """z ~ N(0, I) -> decoder mean (default) or a draw from p(x|z[,y])."""
        labels = self.check_labels(labels, n)

        def draw(m: int, noise: Noise, y: Tensor | None) -> Tensor:
            params = self.decoder(randn(noise, m, (self.latent_dim,), self.device), y)
            mean = self.decoder_mean(params)
            if self.sample_mean:
                return mean
            if self.likelihood == "bernoulli":
                return torch.bernoulli(mean)
            loc, log_scale = params.chunk(2, dim=1)
            u = torch.rand_like(loc).clamp(1e-5, 1 - 1e-5)
            noise_term = torch.log(u) - torch.log1p(-u) if self.likelihood == "discretized_logistic" \
                else torch.randn_like(loc)
            x = torch.tanh(loc) + log_scale.clamp(min=-7).exp() * noise_term
            return ((x.clamp(-1, 1) + 1) / 2)
        return self.sample_in_chunks(n, self.sample_batch_size, draw, generator, labels)

    def sampling_cost(self, **sampler_kw) -> dict[str, float]:
        return {"nfe": 1.0}
