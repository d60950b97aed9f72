"""The interface every family implements (DESIGN.md) and the pieces they share.

The evaluation callback and the table script use only ``sample``, ``log_likelihood``,
``sampling_cost``, ``likelihood_kind`` and ``num_params``: a fifth family plugs in by
subclassing :class:`GenerativeModule`.
"""
from __future__ import annotations

import math
from contextlib import ExitStack
from typing import Any, Callable, Literal, Sequence

import pytorch_lightning as pl
import torch
import torch.distributed as dist
from pytorch_lightning.core.optimizer import LightningOptimizer
from pytorch_lightning.plugins.precision import MixedPrecision, Precision
from pytorch_lightning.strategies import SingleDeviceStrategy
from pytorch_lightning.utilities.model_helpers import is_overridden
from torch import Tensor

from models.rng import isolated_rng, rng_states, set_rng_states

LikelihoodKind = Literal["exact", "elbo"] | None


class SampleNoise:
    """Per-sample random streams: sample ``i`` of a batch draws only from a generator seeded with
    ``seeds[i]``. Samples therefore do not depend on batch size or on how many processes share
    the work (the per-sample seeding of the StyleGAN/EDM evaluation code)."""

    def __init__(self, seeds: Sequence[int], device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.generators = [torch.Generator(self.device).manual_seed(int(s)) for s in seeds]

    def __len__(self) -> int:
        return len(self.generators)

    def slice(self, start: int, stop: int) -> "SampleNoise":
        """The streams of samples start..stop-1 (shared generators, not copies)."""
        part = SampleNoise([], self.device)
        part.generators = self.generators[start:stop]
        return part

    def randn(self, *shape: int, dtype: torch.dtype = torch.float32) -> Tensor:
        """(len(seeds), *shape) standard normal noise."""
        return torch.stack([torch.randn(shape, generator=g, device=self.device, dtype=dtype)
                            for g in self.generators])

    def rand(self, *shape: int, dtype: torch.dtype = torch.float32) -> Tensor:
        return torch.stack([torch.rand(shape, generator=g, device=self.device, dtype=dtype)
                            for g in self.generators])


Noise = SampleNoise | torch.Generator | None


def randn(noise: Noise, n: int, shape: Sequence[int], device: torch.device) -> Tensor:
    """(n, *shape) standard normal draws from ``noise`` (per-sample streams, one generator, or the
    global RNG)."""
    if isinstance(noise, SampleNoise):
        if len(noise) != n:
            raise ValueError(f"SampleNoise holds {len(noise)} seeds, {n} samples were asked for")
        return noise.randn(*shape).to(device)
    gen_device = noise.device if isinstance(noise, torch.Generator) else device
    return torch.randn((n, *shape), generator=noise, device=gen_device).to(device)


def bits_per_dim(nats: Tensor, num_dims: int) -> Tensor:
    """Negative log-likelihood in nats per image -> bits per dimension: nats / (D ln 2)."""
    return nats / (num_dims * math.log(2.0))


def dequantize(x: Tensor, noise: Noise = None) -> Tensor:
    """Uniform dequantization of 8-bit images in [0, 1]: y = (255 x + u) / 256, u ~ U[0, 1).

    The continuous density of y on [0, 1]^D lower-bounds the discrete likelihood of x on the
    256-level grid (Theis et al. 2016); log p(x) >= log p_y(y) - D log 256.
    """
    u = noise.rand(*x.shape[1:]).to(x) if isinstance(noise, SampleNoise) else \
        torch.rand(x.shape, generator=noise, device=x.device, dtype=x.dtype)
    return (x * 255.0 + u) / 256.0


def check_images(images: Tensor, shape: Sequence[int], who: str) -> Tensor:
    """The boundary contract: float (N, C, H, W) images in [0, 1]."""
    if images.ndim != 4 or tuple(images.shape[1:]) != tuple(shape):
        raise ValueError(f"{who} produced images of shape {tuple(images.shape)}, expected (N, {', '.join(map(str, shape))})")
    if not torch.isfinite(images).all():
        raise FloatingPointError(f"{who} produced non-finite pixel values (NaN/inf): the model has diverged")
    lo, hi = float(images.min()), float(images.max())
    if lo < -1e-6 or hi > 1 + 1e-6:
        raise ValueError(f"{who} produced pixel values in [{lo:.3f}, {hi:.3f}], outside [0, 1]; "
                         "sample() must return images in [0, 1]")
    return images


class GenerativeModule(pl.LightningModule):
    """Base class: one family per subclass. Data crosses the boundary as float images in [0, 1]."""

    #: short family name recorded in results.json ("ddpm", "gan", ...)
    family: str = "generative"
    likelihood_kind: LikelihoodKind = None
    #: the sampler keyword arguments a run evaluates with unless told otherwise
    default_sampler: dict[str, Any] = {}
    #: some backward passes leave parameters without gradients (a GAN's D step never reaches G):
    #: DDP must then look for unused parameters (train() picks the matching strategy)
    ddp_find_unused_parameters: bool = False
    #: optimizer steps (Lightning global steps) one batch may take: finds the last batch
    max_optimizer_steps_per_batch: int = 1

    def __init__(self, image_shape: Sequence[int]):
        super().__init__()
        self.image_shape = tuple(int(s) for s in image_shape)
        #: the composed run config, stored in every checkpoint so a checkpoint is self-describing
        self.run_config: dict | None = None
        #: training losses as host floats, taken at logging steps, for the progress bar
        self.progress_scalars: dict[str, float] = {}
        self._logging_step_key: tuple[int, int] | None = None
        self._logging_step = True
        #: per loss name, (step, loss on the device) of the steps since the last NaN check
        self._unchecked_losses: dict[str, list[tuple[int, Tensor]]] = {}
        #: manual_backward is only loss.backward() and manual_optimizer_step only the torch step,
        #: with Lightning's step accounting, in this fit (see lightning_dispatch_is_plain)
        self._plain_backward = self._plain_optimizer_step = False

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

    def is_logging_step(self) -> bool:
        """The steps on which training scalars are logged and the NaN check synchronises: the
        first, every ``trainer.log_every_n_steps``-th batch (when Lightning writes its loggers) and
        the last. Each ``self.log`` costs ~0.7 ms of Lightning bookkeeping and a host sync is a
        pipeline stall on a GPU, against a few ms for a small network's whole step. Decided once
        per batch, at its first call, so every call within a batch (and a callback's at the batch
        start) gets the same answer."""
        trainer = self._trainer
        if trainer is None:
            return True
        batch = trainer.fit_loop.total_batch_idx
        key = (id(trainer), batch)
        if self._logging_step_key != key:
            every = max(int(trainer.log_every_n_steps), 1)
            last = 0 < trainer.max_steps <= self.global_step + self.max_optimizer_steps_per_batch
            self._logging_step_key = key
            self._logging_step = batch == 0 or (batch + 1) % every == 0 or last
        return self._logging_step

    def log_train(self, scalars: dict[str, Tensor] | Callable[[], dict[str, Tensor]], batch_size: int,
                  prog_bar: Sequence[str] = ("train/loss",)) -> None:
        """Log training scalars on logging steps only (see :meth:`is_logging_step`). ``scalars`` may
        be a function returning them, so that scalars computed only for the log cost nothing on
        the other steps. The ``prog_bar`` ones are also copied to the host here, in one transfer,
        for :class:`models.progress.TrainingProgressBar` (Lightning's own progress-bar path would
        copy them again at every later step of the epoch)."""
        if not self.is_logging_step():
            return
        values = {name: value.detach() for name, value in (scalars() if callable(scalars) else scalars).items()}
        for name, value in values.items():
            self.log(name, value, on_step=True, on_epoch=False, batch_size=batch_size)
        shown = [name for name in values if name in prog_bar]
        if shown:
            host = torch.stack([values[name].float().reshape(()) for name in shown]).tolist()
            self.progress_scalars.update(zip(shown, host))

    def lightning_dispatch_is_plain(self, hooks: Sequence[str]) -> bool:
        """Whether Lightning's manual-optimization calls that dispatch ``hooks`` would do nothing
        else: one device (no DDP bookkeeping), no loss scaling (32-bit, or bf16 autocast) and no
        callback or module implementing any of ``hooks``. Dispatching a hook to every callback,
        through the strategy and precision plugin, costs ~0.15 ms per backward on a CPU (2% of the
        digits GAN's step for its two) and less per optimizer step (skipping it gained 0.4%)."""
        trainer = self._trainer
        if trainer is None or type(trainer.strategy) is not SingleDeviceStrategy:
            return False
        precision = trainer.strategy.precision_plugin
        if not (type(precision) is Precision or (type(precision) is MixedPrecision and precision.scaler is None)):
            return False
        return not any(is_overridden(hook, self, pl.LightningModule) for hook in hooks) and \
            not any(is_overridden(hook, callback, pl.Callback) for callback in trainer.callbacks for hook in hooks)

    def manual_backward(self, loss: Tensor, *args: Any, **kwargs: Any) -> None:
        """Lightning's, or straight to :meth:`backward` where that is all it would do (decided once
        per fit, at the training start: :meth:`lightning_dispatch_is_plain`)."""
        if self._plain_backward:
            self.backward(loss, *args, **kwargs)
        else:
            super().manual_backward(loss, *args, **kwargs)

    def manual_optimizer_step(self, optimizer: LightningOptimizer) -> None:
        """``optimizer.step()`` for manual optimization. Where Lightning's strategy and precision
        plugin would only dispatch ``on_before_optimizer_step`` to nobody (decided once per fit:
        :meth:`lightning_dispatch_is_plain`), the wrapped torch optimizer steps directly between
        Lightning's own before/after-step calls, which count the step (``global_step``) and time
        it for the profiler exactly as ``LightningOptimizer.step`` does."""
        if self._plain_optimizer_step:
            optimizer._on_before_step()
            optimizer.optimizer.step()
            optimizer._on_after_step()
        else:
            optimizer.step()

    def check_finite_loss(self, loss: Tensor, name: str = "loss") -> None:
        """Queue ``loss`` for the NaN/inf check, which runs at the next logging step or before the
        next checkpoint is written, whichever comes first, so a diverged model is never saved over
        the last good checkpoint. Queueing is free (no device op, no host sync); the check is one
        stacked ``isfinite`` (per step, the few tiny tensor ops of a running flag cost ~0.1 ms on a
        CPU: 1% of a small model's step)."""
        self._unchecked_losses.setdefault(name, []).append((self.global_step, loss.detach()))
        if self.is_logging_step():
            self.raise_on_nonfinite_loss()

    def raise_on_nonfinite_loss(self) -> None:
        """Stop on NaN/inf, on every rank at once (a rank raising alone would hang DDP)."""
        for name in sorted(self._unchecked_losses):  # the same order on every rank
            queued = self._unchecked_losses[name]
            step = -1
            if queued:
                finite = torch.isfinite(torch.stack([loss.float().sum() for _, loss in queued]))
                bad = torch.nonzero(~finite).flatten().tolist()  # the host sync: logging steps and checkpoints only
                step = queued[bad[0]][0] if bad else -1
                queued.clear()
            bad = step >= 0
            if self._trainer is not None:
                bad = self.trainer.strategy.reduce_boolean_decision(bad, all=False)
            if bad:
                where = f"step {step}" if step >= 0 else "a step of another process"
                raise FloatingPointError(
                    f"non-finite training {name} at {where} of {type(self).__name__} (detected at step "
                    f"{self.global_step}): training stopped. The last good checkpoint is kept in the run's "
                    "checkpoints/ folder; lower the learning rate or enable gradient clipping, then resume "
                    "with ckpt_path=last.")

    # ---------------------------------------------------------------- exact resume
    #: seed of the validation noise: the same t/noise at every validation, and none of it
    #: drawn from the training stream (so the training stream does not depend on val frequency)
    validation_seed: int = 2**31 - 1

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.raise_on_nonfinite_loss()  # never write a diverged model
        checkpoint["genbench_config"] = self.run_config
        # every process's training noise stream, so that a resumed run draws what it would have
        states = rng_states()
        if dist.is_available() and dist.is_initialized():
            gathered: list = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, states)
            states_per_rank = gathered
        else:
            states_per_rank = [states]
        checkpoint["rng_states_per_rank"] = states_per_rank

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.run_config = checkpoint.get("genbench_config", self.run_config)
        self._rng_to_restore = checkpoint.get("rng_states_per_rank")

    def on_train_start(self) -> None:
        manual = not self.automatic_optimization
        self._plain_backward = manual and self.lightning_dispatch_is_plain(("on_before_backward", "on_after_backward"))
        self._plain_optimizer_step = manual and self.lightning_dispatch_is_plain(("on_before_optimizer_step",))
        # Restored here, after sanity checks and data setup, right before the first step.
        saved = getattr(self, "_rng_to_restore", None)
        rank, world = self.trainer.global_rank, self.trainer.world_size
        if saved is not None and len(saved) == world:
            set_rng_states(saved[rank])
        elif world > 1:
            # seed_everything gave every process the same stream: decorrelate their noise
            torch.manual_seed(torch.initial_seed() + 1_000_003 * rank)
        self._rng_to_restore = None

    def on_train_end(self) -> None:
        # manual_backward/manual_optimizer_step outside this fit go through Lightning
        self._plain_backward = self._plain_optimizer_step = False

    def on_validation_epoch_start(self) -> None:
        self._validation_rng = ExitStack()
        self._validation_rng.enter_context(isolated_rng(self.validation_seed + self.global_rank))

    def on_validation_epoch_end(self) -> None:
        self._validation_rng.close()  # the training stream continues as if validation drew nothing
