"""Per-sample random streams: what makes generated samples independent of batch size and of how
many processes share the work (the per-sample seeding of the StyleGAN/EDM evaluation code)."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor


class SampleNoise:
    """Sample ``i`` of a batch draws only from a generator seeded with ``seeds[i]``."""

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


#: where random draws come from: per-sample streams, one generator, or the global RNG (None)
Noise = SampleNoise | torch.Generator | None


def randn(noise: Noise, n: int, shape: Sequence[int], device: torch.device) -> Tensor:
    """(n, *shape) standard normal draws from ``noise``."""
    if isinstance(noise, SampleNoise):
        if len(noise) != n:
            raise ValueError(f"SampleNoise holds {len(noise)} seeds, {n} samples were asked for")
        return noise.randn(*shape).to(device)
    gen_device = noise.device if isinstance(noise, torch.Generator) else device
    return torch.randn((n, *shape), generator=noise, device=gen_device).to(device)


def dequantize(x: Tensor, noise: Noise = None) -> Tensor:
    """Uniform dequantization of 8-bit images in [0, 1]: y = (255 x + u) / 256, u ~ U[0, 1).

    The continuous density of y on [0, 1]^D lower-bounds the discrete likelihood of x on the
    256-level grid (Theis et al. 2016): log P(x) >= log p_y(y) - D log 256.
    """
    u = noise.rand(*x.shape[1:]).to(x) if isinstance(noise, SampleNoise) else \
        torch.rand(x.shape, generator=noise, device=x.device, dtype=x.dtype)
    return (x * 255.0 + u) / 256.0


#: the per-sample seed's second word for the label stream (the image noise uses the seed alone)
LABEL_STREAM = 7


def sample_labels(seeds: Sequence[int], num_classes: int, probabilities: Sequence[float] | None = None) -> Tensor:
    """The class of each generated sample, drawn from its own seed (uniform, or with the given class
    probabilities), so labels, like the noise, do not depend on batch size or process count. (n,) long."""
    import numpy as np

    p = None if probabilities is None else np.asarray(probabilities, dtype=np.float64)
    if p is not None and (p.shape != (num_classes,) or (p < 0).any() or not np.isclose(p.sum(), 1.0)):
        raise ValueError(f"class probabilities must be {num_classes} non-negative numbers summing to 1")
    return torch.tensor([int(np.random.default_rng([int(s), LABEL_STREAM]).choice(num_classes, p=p)) for s in seeds],
                        dtype=torch.long)
