"""Random-number state as checkpoint data, and regions of code that must not disturb it.

Exact resume needs the training noise stream (DDPM timesteps and noise, GAN latents, VAE
reparameterisation noise, flow dequantization) to continue where the checkpoint left it; that
holds only if everything else (validation, evaluation, data loading) leaves the global RNG alone.
"""
from __future__ import annotations

import random
from contextlib import contextmanager
from typing import Any, Iterator

import numpy as np
import torch


def rng_states() -> dict[str, Any]:
    """The global generators of torch (CPU and every initialised CUDA device), numpy and random.
    Plain tensors and tuples only, so that checkpoints load with ``weights_only=True``."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)),
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    kind, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    state = states["python"]
    random.setstate((state[0], tuple(state[1]), state[2]))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


@contextmanager
def isolated_rng(seed: int | None = None) -> Iterator[None]:
    """Run a block with its own random stream (seeded when ``seed`` is given) and put the global
    generators back afterwards, as if the block had drawn nothing."""
    saved = rng_states()
    try:
        if seed is not None:
            torch.manual_seed(seed)
        yield
    finally:
        set_rng_states(saved)
