"""The interface every family implements (docs/ARCHITECTURE.md) and nothing else.

The evaluation callback and the table script use only ``sample``, ``log_likelihood``,
``sampling_cost``, ``likelihood_kind`` and ``num_params``: a fifth family plugs in by
subclassing :class:`GenerativeModule`. The pieces families share live in modules named for them:
models/noise.py (per-sample random streams), models/images.py (the [0, 1] image boundary,
bits/dim), models/training_loop.py (logging gate, NaN check), models/rng.py (exact resume).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Literal, Sequence

import pytorch_lightning as pl
import torch
from torch import Tensor

from models.noise import Noise, SampleNoise
from models.rng import ExactResumeMixin
from models.training_loop import TrainingLoopMixin

#: None: no likelihood (GAN); "exact": the exact likelihood of the 8-bit data; "dequantized": the
#: exact density of uniformly dequantized data, a lower bound on the 8-bit likelihood (flows);
#: "elbo": a variational lower bound (VAE, DDPM); "ode": the density of dequantized data from a
#: continuous flow's ODE (flow matching), itself a bound on the 8-bit likelihood
LikelihoodKind = Literal["exact", "dequantized", "elbo", "ode"] | None


@dataclass(frozen=True)
class LossTerm:
    """One loss of a family's training step: ``loss(images, labels)`` -> a scalar, minimised by the
    family's optimizer number ``optimizer`` (the order of ``configure_optimizers``) on every
    ``every``-th batch; ``updates_ema``: the EMA follows that optimizer step. What the compute
    count (models/compute.py) and the benchmark's bare loop (benchmarks/bare_loop.py) call."""

    loss: Callable[[Tensor, Tensor | None], Tensor]
    optimizer: int = 0
    every: int = 1
    updates_ema: bool = True


class TrainedModule(TrainingLoopMixin, ExactResumeMixin, pl.LightningModule):
    """What every module scripts/train.py trains shares: the logging gate and NaN check, exact
    resume, the run config stored in each checkpoint. The generative families and the noise-aware
    classifier (models/noisy_classifier.py) derive from it."""

    #: short name recorded in results.json ("ddpm", "gan", "noisy_classifier", ...)
    family: str = "module"
    likelihood_kind: LikelihoodKind = None

    def __init__(self):
        super().__init__()
        #: the composed run config, stored in every checkpoint so a checkpoint is self-describing
        self.run_config: dict | None = None
        self.init_training_loop()

    def set_schedule(self, warmup_steps: int = 0, warmup_fraction: float | None = None,
                     lr_decay: str = "constant") -> None:
        """The learning-rate schedule (models/optim.py), checked now, before any training work:
        ``warmup_fraction`` and ``lr_decay`` scale with the planned run (:meth:`planned_batches`)."""
        from models.optim import LR_DECAYS

        if lr_decay not in LR_DECAYS:
            raise ValueError(f"model.lr_decay must be one of {LR_DECAYS}, got {lr_decay!r}")
        if warmup_fraction is not None and not 0 <= float(warmup_fraction) < 1:
            raise ValueError(f"model.warmup_fraction must be in [0, 1), got {warmup_fraction!r}")
        self.warmup_steps, self.warmup_fraction, self.lr_decay = int(warmup_steps), warmup_fraction, lr_decay

    def training_step(self, batch, batch_idx: int) -> Tensor:
        """One batch of a module with one loss: ``training_loss``'s "loss" is minimised, and each of
        its entries logged as train/<name> on logging steps (the GAN, two optimizers, has its own)."""
        out = self.training_loss(batch[0], batch[1])
        self.check_finite_loss(out["loss"])
        self.log_train(lambda: {f"train/{name}": value for name, value in out.items()}, batch[0].shape[0])
        return out["loss"]

    def update_ema(self) -> None:
        """Move the family's EMA weights after an optimizer step (none by default)."""

    def loss_terms(self) -> list[LossTerm]:
        """The losses one training batch minimises (:class:`LossTerm`): by default
        ``training_loss``'s "loss" with the one optimizer."""
        return [LossTerm(lambda images, labels: self.training_loss(images, labels)["loss"])]

    def optimizer_with_schedule(self, factory, params) -> dict:
        from models.optim import build_optimizer

        return build_optimizer(factory, params, self.warmup_steps, self.warmup_fraction, self.lr_decay,
                               self.planned_batches())

    @property
    def num_params(self) -> int:
        """Parameters of the networks that define the model (EMA copies excluded)."""
        return sum(p.numel() for name, p in self.named_parameters() if not name.startswith("ema."))

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.raise_on_nonfinite_loss()  # never write a diverged model
        checkpoint["genbench_config"] = self.run_config
        checkpoint["genbench_batches_started"] = self.batches_started
        checkpoint.update(self.resume_state())

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.run_config = checkpoint.get("genbench_config", self.run_config)
        self.batches_started = int(checkpoint.get("genbench_batches_started", self.batches_started))
        self.load_resume_state(checkpoint)


class GenerativeModule(TrainedModule):
    """Base class: one family per subclass. Data crosses the boundary as float images in [0, 1].

    A subclass that sets ``family`` in its body is registered under that name
    (models/registry.py); the main job, the benchmark, the compute count and the tests read the
    declarations below instead of asking for a family's name."""

    family: str = "generative"
    #: the sampler keyword arguments a run evaluates with unless told otherwise
    default_sampler: dict[str, Any] = {}
    #: the guidance a class-conditional model of this family can sample with: "classifier_free"
    #: (a null class trained with label dropout) and/or "classifier" (a noise-aware classifier of
    #: the same noising process, models/noisy_classifier.py)
    guidance_kinds: tuple[str, ...] = ()
    #: whether ``num_classes`` makes the family class-conditional (conf/conditioning/class.yaml)
    class_conditional: bool = True
    #: whether `scripts/main_job.py` trains it by default (otherwise: --families ... <family>)
    in_main_job: bool = True
    #: some backward passes leave parameters without gradients (a GAN's D step never reaches G):
    #: DDP must then look for unused parameters (train() picks the matching strategy)
    ddp_find_unused_parameters: bool = False

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "family" in cls.__dict__:
            from models.registry import register

            register(cls)

    @classmethod
    def likelihood_variants(cls) -> dict[str, dict[str, Any]]:
        """{label: model-config overrides} of each likelihood estimator the family offers (the
        likelihood table, scripts/likelihood_table.py); by default its one ``likelihood_kind``."""
        return {cls.likelihood_kind: {}} if cls.likelihood_kind else {}

    @classmethod
    def samplers_at_nfe(cls, nfe: int) -> dict[str, dict[str, Any]]:
        """{curve name: sampler settings} that each spend ``nfe`` network evaluations per sample
        (the FID-against-NFE curves, the guidance sweeps' sampler); the first is the family's
        choice at a small NFE. Empty: the family samples at one fixed cost."""
        return {}


    def __init__(self, image_shape: Sequence[int], num_classes: int | None = None):
        super().__init__()
        self.image_shape = tuple(int(s) for s in image_shape)
        if num_classes is not None and int(num_classes) < 2:
            raise ValueError(f"model.num_classes={num_classes}: a class-conditional model needs at least 2 "
                             "classes; use null for an unconditional model")
        #: classes of a class-conditional model; None = unconditional
        self.num_classes: int | None = None if num_classes is None else int(num_classes)

    # ---------------------------------------------------------------- the interface
    @torch.no_grad()
    def sample(self, n: int, generator: Noise = None, labels: Tensor | None = None, **sampler_kw) -> Tensor:
        """(n, C, H, W) images in [0, 1]; ``labels`` (n,) the class of each sample (class-conditional
        models and guided samplers: see :meth:`label_classes`)."""
        raise NotImplementedError

    def log_likelihood(self, x: Tensor, generator: Noise = None, labels: Tensor | None = None) -> Tensor:
        """Per-image log-likelihood (or its lower bound) in nats of 8-bit images ``x`` in [0, 1];
        for a class-conditional model log p(x | labels)."""
        raise NotImplementedError(f"{type(self).__name__} has no likelihood (likelihood_kind=None)")

    def sampling_cost(self, **sampler_kw) -> dict[str, float]:
        """Network function evaluations per sample, e.g. {"nfe": 1000}."""
        raise NotImplementedError

    def likelihood_details(self) -> dict[str, Any]:
        """How the last ``log_likelihood`` was computed, where that varies (solver tolerances, the
        divergence estimator); recorded beside bits/dim."""
        return {}

    def training_loss(self, images: Tensor, labels: Tensor | None = None) -> dict[str, Tensor]:
        """{"loss": the scalar a training step minimises, ...} for a batch of images in [0, 1] (and
        their labels, which only class-conditional models use): what
        ``training_step`` calls, and what the benchmark's bare loop and the compute count call
        (the GAN has two: ``discriminator_step_loss`` and ``generator_step_loss``)."""
        raise NotImplementedError(f"{type(self).__name__} does not expose its training loss")

    def networks(self) -> list[str]:
        """Attribute names of the networks trained every step (what ``FastPaths`` compiles)."""
        return []

    # ---------------------------------------------------------------- class conditioning
    def label_classes(self, **sampler_kw) -> int | None:
        """How many classes the labels of ``sample`` range over with these sampler settings (None:
        it takes no labels). The evaluator draws one label per sample when this is not None."""
        return self.num_classes

    def check_labels(self, labels: Tensor | None, n: int, num_classes: int | None = None) -> Tensor | None:
        """``labels`` as a (n,) long tensor on this module's device, checked against the classes;
        None for a model that takes none. A conditional model refuses to run without them."""
        num_classes = self.num_classes if num_classes is None else num_classes
        if num_classes is None:
            return None
        if labels is None:
            raise ValueError(f"{type(self).__name__} is class-conditional ({num_classes} classes): pass labels=")
        labels = torch.as_tensor(labels, device=self.device).long().reshape(-1)
        if labels.shape[0] != n:
            raise ValueError(f"got {labels.shape[0]} labels for {n} images")
        if labels.numel() and not (0 <= int(labels.min()) and int(labels.max()) < num_classes):
            raise ValueError(f"labels must lie in 0..{num_classes - 1}, got {int(labels.min())}..{int(labels.max())}")
        return labels

    def training_labels(self, labels: Tensor | None) -> Tensor | None:
        """The labels a training loss uses: the batch's for a conditional model (no host sync: the
        datamodule's labels were checked against num_classes before training), None otherwise."""
        if self.num_classes is None:
            return None
        if labels is None:
            raise ValueError(f"{type(self).__name__} is class-conditional: its training loss needs the batch's labels")
        return labels.long()

    # ---------------------------------------------------------------- shared helpers
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
    def sample_in_chunks(self, n: int, chunk: int, draw: Callable[[int, Noise, Tensor | None], Tensor],
                         noise: Noise = None, labels: Tensor | None = None) -> Tensor:
        """Call ``draw(m, noise_m, labels_m)`` on chunks of at most ``chunk`` samples and concatenate."""
        out = []
        for start in range(0, n, chunk):
            m = min(chunk, n - start)
            sub = noise.slice(start, start + m) if isinstance(noise, SampleNoise) else noise
            out.append(draw(m, sub, None if labels is None else labels[start:start + m]))
        return torch.cat(out)


class NetEMAMixin:
    """An EMA of ``self.net`` (``self.ema``, models/components/ema.py) moved right after every
    optimizer step, so that a checkpoint taken at a step's end holds that step's update: the
    DDPM's and flow matching's."""

    def update_ema(self) -> None:
        self.ema.update(self.net)

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        self.update_ema()


class NullClassMixin:
    """Class conditioning through a network's class embedding, with a null class that trains the
    unconditional model in the same network (classifier-free guidance, Ho & Salimans 2022): the
    DDPM's and flow matching's."""

    num_classes: int | None
    label_dropout: float = 0.0

    def set_label_dropout(self, net, label_dropout: float) -> None:
        """Check that ``net`` conditions on this module's classes (and has a null class when labels
        are dropped), then keep p = ``label_dropout``."""
        if getattr(net, "num_classes", None) != self.num_classes:
            raise ValueError(f"model.num_classes={self.num_classes} but the network has "
                             f"num_classes={getattr(net, 'num_classes', None)}; set model.net.num_classes to match")
        if not 0.0 <= float(label_dropout) < 1.0:
            raise ValueError(f"model.label_dropout must be in [0, 1), got {label_dropout}")
        if label_dropout and not getattr(net, "null_class", False):
            raise ValueError("model.label_dropout > 0 trains a null class, but the network has none; "
                             "set model.net.null_class=true (and model.num_classes)")
        self.label_dropout = float(label_dropout)

    @property
    def null_label(self) -> int:
        """The label of the unconditional model inside a conditional network."""
        return int(self.num_classes)

    def drop_labels(self, labels: Tensor) -> Tensor:
        """Each label replaced by the null class with probability ``label_dropout`` (Ho & Salimans 2022, Algorithm 1)."""
        if not self.label_dropout:
            return labels
        drop = torch.rand(labels.shape, device=labels.device) < self.label_dropout
        return torch.where(drop, torch.full_like(labels, self.null_label), labels)

