"""The interface every family implements (docs/ARCHITECTURE.md) and nothing else.

The evaluation callback and the table script use only ``sample``, ``log_likelihood``,
``sampling_cost``, ``likelihood_kind`` and ``num_params``: a fifth family plugs in by
subclassing :class:`GenerativeModule`. The pieces families share live in modules named for them:
models/noise.py (per-sample random streams), models/images.py (the [0, 1] image boundary,
bits/dim), models/training_loop.py (logging gate, NaN check), models/rng.py (exact resume).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Literal, Sequence

import pytorch_lightning as pl
import torch
from torch import Tensor

from models.noise import Noise, SampleNoise
from models.rng import ExactResumeMixin
from models.training_loop import TrainingLoopMixin

#: None: no likelihood (GAN); "exact": the exact likelihood of the 8-bit data; "dequantized": the
#: exact density of uniformly dequantized data, a lower bound on the 8-bit likelihood (flows);
#: "elbo": a variational lower bound (VAE, DDPM)
LikelihoodKind = Literal["exact", "dequantized", "elbo"] | None


class GenerativeModule(TrainingLoopMixin, ExactResumeMixin, pl.LightningModule):
    """Base class: one family per subclass. Data crosses the boundary as float images in [0, 1]."""

    #: short family name recorded in results.json ("ddpm", "gan", ...)
    family: str = "generative"
    likelihood_kind: LikelihoodKind = None
    #: the sampler keyword arguments a run evaluates with unless told otherwise
    default_sampler: dict[str, Any] = {}
    #: some backward passes leave parameters without gradients (a GAN's D step never reaches G):
    #: DDP must then look for unused parameters (train() picks the matching strategy)
    ddp_find_unused_parameters: bool = False

    def __init__(self, image_shape: Sequence[int]):
        super().__init__()
        self.image_shape = tuple(int(s) for s in image_shape)
        #: the composed run config, stored in every checkpoint so a checkpoint is self-describing
        self.run_config: dict | None = None
        self.init_training_loop()

    # ---------------------------------------------------------------- the interface
    @torch.no_grad()
    def sample(self, n: int, generator: Noise = None, **sampler_kw) -> Tensor:
        """(n, C, H, W) images in [0, 1]."""
        raise NotImplementedError

    def log_likelihood(self, x: Tensor, generator: Noise = None) -> Tensor:
        """Per-image log-likelihood (or its lower bound) in nats of 8-bit images ``x`` in [0, 1]."""
        raise NotImplementedError(f"{type(self).__name__} has no likelihood (likelihood_kind=None)")

    def sampling_cost(self, **sampler_kw) -> dict[str, float]:
        """Network function evaluations per sample, e.g. {"nfe": 1000}."""
        raise NotImplementedError

    def training_loss(self, images: Tensor) -> dict[str, Tensor]:
        """{"loss": the scalar a training step minimises, ...} for a batch of images in [0, 1]: what
        ``training_step`` calls, and what the benchmark's bare loop and the compute count call
        (the GAN has two: ``discriminator_step_loss`` and ``generator_step_loss``)."""
        raise NotImplementedError(f"{type(self).__name__} does not expose its training loss")

    def networks(self) -> list[str]:
        """Attribute names of the networks trained every step (what ``FastPaths`` compiles)."""
        return []

    # ---------------------------------------------------------------- shared helpers
    @property
    def num_params(self) -> int:
        """Parameters of the networks that define the model (EMA copies excluded)."""
        return sum(p.numel() for name, p in self.named_parameters() if not name.startswith("ema."))

    @property
    def num_dims(self) -> int:
        return math.prod(self.image_shape)

    def sampler_kwargs(self, **overrides) -> dict[str, Any]:
        """The family's default sampler updated by ``overrides``; keys this family does not use
        (e.g. DDIM steps given to a GAN in a mixed sweep) are dropped, so results record only
        what was actually used."""
        kw = dict(self.default_sampler)
        kw.update({k: v for k, v in overrides.items() if v is not None and k in self.default_sampler})
        return kw

    @torch.no_grad()
    def sample_in_chunks(self, n: int, chunk: int, draw: Callable[[int, Noise], Tensor],
                         noise: Noise = None) -> Tensor:
        """Call ``draw(m, noise_m)`` on chunks of at most ``chunk`` samples and concatenate."""
        out = []
        for start in range(0, n, chunk):
            m = min(chunk, n - start)
            sub = noise.slice(start, start + m) if isinstance(noise, SampleNoise) else noise
            out.append(draw(m, sub))
        return torch.cat(out)

    # ---------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.raise_on_nonfinite_loss()  # never write a diverged model
        checkpoint["genbench_config"] = self.run_config
        checkpoint.update(self.resume_state())

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.run_config = checkpoint.get("genbench_config", self.run_config)
        self.load_resume_state(checkpoint)
