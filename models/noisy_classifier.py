"""The noise-aware classifier of classifier guidance (Dhariwal & Nichol 2021, Sec. 4.1), trained by
scripts/train.py on the same datamodule (``model=noisy_classifier``).

It models p_phi(y | x_t, t) on images noised by the forward process of the DDPM it will guide
(same schedule and T), t ~ U{0..T-1}; guided sampling needs grad_x log p_phi(y | x_t), which
:meth:`NoisyClassifier.guidance_gradient` returns scaled by s.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.base import TrainedModule
from models.diffusion.gaussian_diffusion import GaussianDiffusion, GuidanceGradient

#: accuracy is logged per noise level in this many equal bins of t (ADM logs quartiles)
NOISE_BINS = 4


class NoisyClassifier(TrainedModule):
    """Args:
        net: log-probabilities' logits of (x_t, t), e.g. models.components.unet.EncoderClassifier.
        diffusion: the forward process of the DDPMs it will guide.
        optimizer: a ``_partial_`` torch optimizer (ADM Table 12: AdamW 3e-4 or 6e-4, weight decay 0.05).
        image_shape: (C, H, W) of the data.
        num_classes: classes of the dataset (the config fills it from the datamodule).
    """

    family = "noisy_classifier"
    likelihood_kind = None

    def __init__(self, net: nn.Module, diffusion: GaussianDiffusion, optimizer: Callable, image_shape: Sequence[int],
                 num_classes: int, warmup_steps: int = 0, warmup_fraction: float | None = None,
                 lr_decay: str = "constant"):
        super().__init__()
        if not num_classes or int(num_classes) < 2:
            raise ValueError(f"model=noisy_classifier needs a labelled dataset; got num_classes={num_classes}")
        if getattr(net, "num_classes", None) != int(num_classes):
            raise ValueError(f"model.num_classes={num_classes} but the classifier network has "
                             f"num_classes={getattr(net, 'num_classes', None)}; set model.net.num_classes to match")
        self.save_hyperparameters(ignore=["net", "diffusion", "optimizer"], logger=False)
        self.net, self.diffusion, self.optimizer_factory = net, diffusion, optimizer
        self.image_shape, self.num_classes = tuple(int(s) for s in image_shape), int(num_classes)
        self.set_schedule(warmup_steps, warmup_fraction, lr_decay)

    # ---------------------------------------------------------------- training
    def noised(self, images: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """(x_t, t): images in [0, 1] noised by q(x_t | x_0) (Eq. 4 of Ho et al.) at t ~ U{0..T-1}."""
        x0 = images * 2.0 - 1.0
        t = torch.randint(0, self.diffusion.num_timesteps, (x0.shape[0],), device=x0.device, generator=generator)
        noise = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
        return self.diffusion.q_sample(x0, t, noise), t

    def training_loss(self, images: Tensor, labels: Tensor | None = None) -> dict[str, Tensor]:
        """{"loss": cross-entropy of p_phi(y | x_t, t), "acc": accuracy} of a labelled batch."""
        if labels is None:
            raise ValueError("the noisy classifier's loss needs the batch's labels")
        x_t, t = self.noised(images)
        logits = self.net(x_t, t)
        return {"loss": F.cross_entropy(logits, labels.long()),
                "acc": (logits.argmax(1) == labels).float().mean().detach()}

    def validation_step(self, batch, batch_idx: int) -> None:
        """Loss and accuracy overall and per noise level (NOISE_BINS bins of t), fixed noise per batch."""
        images, labels = batch[0], batch[1].long()
        x_t, t = self.noised(images, torch.Generator(device=images.device).manual_seed(batch_idx))
        logits = self.net(x_t, t)
        correct = (logits.argmax(1) == labels).float()
        b = images.shape[0]
        self.log("val/loss", F.cross_entropy(logits, labels), prog_bar=True, sync_dist=True, batch_size=b)
        self.log("val/acc", correct.mean(), prog_bar=True, sync_dist=True, batch_size=b)
        edges = np.linspace(0, self.diffusion.num_timesteps, NOISE_BINS + 1).astype(int)
        bins = torch.bucketize(t, torch.as_tensor(edges[1:-1], device=t.device), right=True)
        for k in range(NOISE_BINS):
            mask = bins == k
            # a weighted mean over the epoch: per batch the bin's mean with the bin's count as weight
            self.log(f"val/acc_t{edges[k]}_{edges[k + 1] - 1}", (correct * mask).sum() / mask.sum().clamp(min=1),
                     sync_dist=True, batch_size=max(int(mask.sum()), 1))

    def configure_optimizers(self):
        return self.optimizer_with_schedule(self.optimizer_factory, self.net.parameters())

    # ---------------------------------------------------------------- guidance
    def guidance_gradient(self, labels: Tensor, scale: float) -> GuidanceGradient:
        """(x_t, t) -> s * grad_x log p_phi(y | x_t, t) for the given labels (ADM's cond_fn); t is an
        index of this classifier's own (the original, un-respaced) process."""
        def gradient(x: Tensor, t: Tensor) -> Tensor:
            with torch.enable_grad():
                x_in = x.detach().requires_grad_(True)
                log_probs = F.log_softmax(self.net(x_in, t), dim=-1)
                selected = log_probs[torch.arange(x_in.shape[0], device=x_in.device), labels]
                return torch.autograd.grad(selected.sum(), x_in)[0] * scale
        return gradient

    def check_guides(self, model) -> None:
        """Refuse, naming both sides, to guide a DDPM this classifier was not trained for: another
        dataset, class count, image shape or forward process."""
        problems = []
        mine, theirs = (self.run_config or {}).get("datamodule", {}), (model.run_config or {}).get("datamodule", {})
        if mine.get("name") and theirs.get("name") and mine["name"] != theirs["name"]:
            problems.append(f"dataset {mine['name']!r} vs the model's {theirs['name']!r}")
        if model.num_classes is not None and model.num_classes != self.num_classes:
            problems.append(f"{self.num_classes} classes vs the model's {model.num_classes}")
        if tuple(model.image_shape) != self.image_shape:
            problems.append(f"image shape {self.image_shape} vs the model's {tuple(model.image_shape)}")
        if model.diffusion.num_timesteps != self.diffusion.num_timesteps or not torch.allclose(
                model.diffusion.betas.cpu(), self.diffusion.betas.cpu()):
            problems.append(f"diffusion schedule ({self.diffusion.schedule}, T={self.diffusion.num_timesteps}) vs the "
                            f"model's ({model.diffusion.schedule}, T={model.diffusion.num_timesteps})")
        if problems:
            raise ValueError("the guidance classifier was trained for another setting: " + "; ".join(problems)
                             + ". Train one on this model's data and schedule (scripts/train.py model=noisy_classifier)")


def load_noisy_classifier(ckpt_path: str | Path, device: torch.device | str = "cpu") -> NoisyClassifier:
    """A noisy classifier rebuilt from its checkpoint (stored run config and weights), in eval mode."""
    from models.checkpoints import load_module

    module, _, _ = load_module(ckpt_path, device)
    if not isinstance(module, NoisyClassifier):
        raise ValueError(f"{ckpt_path} holds a {type(module).__name__}, not a noisy classifier (train one with "
                         "scripts/train.py model=noisy_classifier); it cannot guide sampling")
    return module
