"""GAN (Goodfellow et al. 2014) with DCGAN/SNGAN networks, trained by manual optimization."""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.base import GenerativeModule, LossTerm
from models.noise import Noise, randn
from models.components.ema import EMA

LOSSES = ("nonsaturating", "hinge")
BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
BN_REFRESH_SEED = 2**31 - 2


def discriminator_loss(kind: str, real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    """nonsaturating: -log D(x) - log(1 - D(G(z))) (Goodfellow et al. Eq. 1);
    hinge: E[relu(1 - D(x))] + E[relu(1 + D(G(z)))] (Lim & Ye 2017; Miyato et al. 2018)."""
    if kind == "hinge":
        return F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean()
    return F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()


def generator_loss(kind: str, fake_logits: Tensor) -> Tensor:
    """nonsaturating: -log D(G(z)) (Goodfellow et al. Sec. 3); hinge: -E[D(G(z))]."""
    if kind == "hinge":
        return -fake_logits.mean()
    return F.softplus(-fake_logits).mean()


class GAN(GenerativeModule):
    """Args:
        generator, discriminator: plain nets (models.components.gan_nets).
        g_optimizer, d_optimizer: ``_partial_`` optimizers (DCGAN: Adam 2e-4, betas (0.5, 0.999)).
        loss: "nonsaturating" or "hinge".
        n_critic: discriminator steps per generator step.
        ema_decay: EMA of the generator, used for sampling (0 disables averaging: EMA = G).
        bn_refresh_samples: latents the sampling generator's batch-norm statistics are recomputed
            from before it samples (:meth:`refresh_batch_norm_statistics`).
        ema_warmup, ema_foreach: see components/ema.py.
        grad_clip: gradient-norm clip for both nets (None = off).
        num_classes: class-conditional with this many classes (null = unconditional): conditional
            batch norm in G, a projection D (Miyato & Koyama 2018); both nets must have the same.

    Note: Lightning's ``global_step`` counts every optimizer step, so one G step with n_critic D
    steps advances it by n_critic + 1; ``trainer.max_steps`` is in those units.
    """
    family = "gan"
    likelihood_kind = None
    ddp_find_unused_parameters = True  # the D step's backward never reaches G
    max_optimizer_steps_per_batch = 2  # a D step and at most one G step

    def __init__(self, generator: nn.Module, discriminator: nn.Module, g_optimizer: Callable, d_optimizer: Callable,
                 image_shape: Sequence[int], loss: str = "nonsaturating", n_critic: int = 1,
                 ema_decay: float = 0.999, ema_warmup: bool = True, ema_foreach: bool = True,
                 ema_rampup: float | None = None,
                 grad_clip: float | None = None, bn_refresh_samples: int = 1024,
                 sample_batch_size: int = 256, num_classes: int | None = None):
        super().__init__(image_shape, num_classes)
        for name, net in (("generator", generator), ("discriminator", discriminator)):
            if getattr(net, "num_classes", None) != self.num_classes:
                raise ValueError(f"model.num_classes={self.num_classes} but the {name} has num_classes="
                                 f"{getattr(net, 'num_classes', None)}; set model.{name}.num_classes to match")
        if loss not in LOSSES:
            raise ValueError(f"unknown GAN loss {loss!r}; choose one of {LOSSES}")
        if n_critic < 1:
            raise ValueError(f"n_critic must be >= 1, got {n_critic}")
        self.save_hyperparameters(ignore=["generator", "discriminator", "g_optimizer", "d_optimizer"], logger=False)
        self.automatic_optimization = False
        self.generator, self.discriminator = generator, discriminator
        self.ema = EMA(generator, ema_decay, warmup=ema_warmup, foreach=ema_foreach, rampup=ema_rampup)
        self.g_optimizer_factory, self.d_optimizer_factory = g_optimizer, d_optimizer
        self.loss_kind, self.n_critic, self.grad_clip = loss, n_critic, grad_clip
        self.sample_batch_size = sample_batch_size
        self.latent_dim = generator.latent_dim
        with torch.no_grad():  # shapes must agree before any training
            out = generator(torch.zeros(2, self.latent_dim), None if self.num_classes is None else torch.zeros(2).long())
        if tuple(out.shape[1:]) != self.image_shape:
            raise ValueError(f"generator produces {tuple(out.shape[1:])} images, data is {self.image_shape}")
        self._d_steps = 0
        self.bn_refresh_samples = int(bn_refresh_samples)
        self._bn_refreshed_at: int | None = None

    def configure_optimizers(self):
        return [self.g_optimizer_factory(params=self.generator.parameters()),
                self.d_optimizer_factory(params=self.discriminator.parameters())]

    def _step(self, optimizer, loss: Tensor) -> None:
        optimizer.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        if self.grad_clip:
            self.clip_gradients(optimizer, gradient_clip_val=self.grad_clip, gradient_clip_algorithm="norm")
        optimizer.step()

    def networks(self) -> list[str]:
        return ["generator", "discriminator"]

    # The two losses of a training step; scripts/benchmark's bare loop calls these same functions.
    # A conditional GAN's fakes take the real batch's labels: the data's class distribution.
    def discriminator_step_loss(self, images: Tensor, labels: Tensor | None = None) -> Tensor:
        """The D loss on a batch of real images in [0, 1] and as many fresh G samples."""
        real = images * 2.0 - 1.0                                             # (B, C, H, W) in [-1, 1]
        y = self.training_labels(labels)
        fake = self.generator(torch.randn(real.shape[0], self.latent_dim, device=real.device), y).detach()
        return discriminator_loss(self.loss_kind, self.discriminator(real, y), self.discriminator(fake, y))

    def generator_step_loss(self, batch_size: int, labels: Tensor | None = None) -> Tensor:
        y = self.training_labels(labels)
        fake = self.generator(torch.randn(batch_size, self.latent_dim, device=self.device), y)
        return generator_loss(self.loss_kind, self.discriminator(fake, y))

    def update_ema(self) -> None:
        self.ema.update(self.generator)

    def loss_terms(self) -> list[LossTerm]:
        """A D step on every batch (optimizer 1), a G step after every n_critic-th (optimizer 0),
        the EMA after it: what ``training_step`` does."""
        return [LossTerm(self.discriminator_step_loss, optimizer=1, updates_ema=False),
                LossTerm(lambda images, labels: self.generator_step_loss(images.shape[0], labels), optimizer=0,
                         every=self.n_critic)]

    def is_generator_step(self, d_steps: int) -> bool:
        """After the ``d_steps``-th discriminator step, a generator step follows every n_critic-th."""
        return d_steps % self.n_critic == 0

    def training_step(self, batch, batch_idx: int) -> None:
        g_opt, d_opt = self.optimizers()
        b = batch[0].shape[0]
        d_loss = self.discriminator_step_loss(batch[0], batch[1])
        self.check_finite_loss(d_loss, "discriminator loss")
        self._step(d_opt, d_loss)
        self._d_steps += 1
        self.log_train({"train/d_loss": d_loss}, b, prog_bar=("train/d_loss",))
        if not self.is_generator_step(self._d_steps):
            return
        g_loss = self.generator_step_loss(b, batch[1])
        self.check_finite_loss(g_loss, "generator loss")
        self._step(g_opt, g_loss)
        self.update_ema()
        self.log_train(lambda: {"train/g_loss": g_loss, "train/loss": g_loss + d_loss}, b, prog_bar=("train/g_loss",))

    def validation_step(self, batch, batch_idx: int) -> None:
        real = batch[0] * 2.0 - 1.0
        z = torch.randn(real.shape[0], self.latent_dim, device=self.device,
                        generator=torch.Generator(self.device).manual_seed(batch_idx))
        y = self.training_labels(batch[1])
        d_loss = discriminator_loss(self.loss_kind, self.discriminator(real, y), self.discriminator(self.ema(z, y), y))
        self.log("val/d_loss", d_loss, sync_dist=True, batch_size=real.shape[0])

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["gan_d_steps"] = self._d_steps

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        self._d_steps = checkpoint.get("gan_d_steps", 0)
        self._bn_refreshed_at = None

    # ---------------------------------------------------------------- the interface
    @torch.no_grad()
    def refresh_batch_norm_statistics(self) -> None:
        """Recompute the sampling generator's batch-norm statistics from its own activations.

        Why: the EMA generator's weights are an average, but the running statistics it would
        otherwise use are the live generator's (copied at every update), which belong to other
        weights. As in StyleGAN/BigGAN practice ("standing statistics"), the statistics are
        re-estimated from ``bn_refresh_samples`` latents of a fixed seed (a cumulative average
        over chunks), once per EMA update count: the same on every process and at every call, so
        samples stay independent of batch size and world size.
        """
        norms = [m for m in self.ema.shadow.modules() if isinstance(m, BATCH_NORMS)]
        version = int(self.ema.num_updates)
        if not norms or self._bn_refreshed_at == version:
            return
        momenta = [m.momentum for m in norms]
        for m in norms:
            m.reset_running_stats()
            m.momentum = None                      # cumulative moving average over the chunks
        gen = torch.Generator(self.device).manual_seed(BN_REFRESH_SEED)
        self.ema.shadow.train()
        try:
            for start in range(0, self.bn_refresh_samples, self.sample_batch_size):
                m = min(self.sample_batch_size, self.bn_refresh_samples - start)
                z = torch.randn(m, self.latent_dim, device=self.device, generator=gen)
                y = None if self.num_classes is None else \
                    torch.randint(0, self.num_classes, (m,), device=self.device, generator=gen)
                self.ema.shadow(z, y)
        finally:
            self.ema.shadow.eval()
            for m, momentum in zip(norms, momenta):
                m.momentum = momentum
        self._bn_refreshed_at = version

    @torch.no_grad()
    def sample(self, n: int, generator: Noise = None, labels: Tensor | None = None, **sampler_kw) -> Tensor:
        """G_ema(z[, y]), z ~ N(0, I), mapped from [-1, 1] to [0, 1] (batch-norm statistics refreshed first)."""
        labels = self.check_labels(labels, n)
        self.refresh_batch_norm_statistics()

        def draw(m: int, noise: Noise, y: Tensor | None) -> Tensor:
            z = randn(noise, m, (self.latent_dim,), self.device)
            return ((self.ema(z, y) + 1.0) / 2.0).clamp(0.0, 1.0)
        return self.sample_in_chunks(n, self.sample_batch_size, draw, generator, labels)

    def sampling_cost(self, **sampler_kw) -> dict[str, float]:
        return {"nfe": 1.0}
