"""Random-number state as checkpoint data, and regions of code that must not disturb it.

Exact resume needs the training noise stream (DDPM timesteps and noise, GAN latents, VAE
reparameterisation noise, flow dequantization) to continue where the checkpoint left it; that
holds only if everything else (validation, evaluation, data loading) leaves the global RNG alone.
"""
from __future__ import annotations

import random
from contextlib import ExitStack, contextmanager
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


class ExactResumeMixin:
    """What a LightningModule needs for exact resume, through Lightning's public hooks only:

    - every process's global RNG state in the checkpoint, restored right before the first
      resumed step (Lightning saves no RNG state);
    - the position in the current epoch (batches done), which the datamodule's resumable
      training order reads to skip what was already trained on;
    - validation drawing from its own stream, so the training stream does not depend on how
      often validation runs.
    """

    #: seed of the validation noise: the same t/noise at every validation
    validation_seed: int = 2**31 - 1

    def resume_state(self) -> dict[str, Any]:
        """Checkpoint entries: RNG states per rank and the (epoch, batches done) position."""
        import torch.distributed as dist

        states = rng_states()
        if dist.is_available() and dist.is_initialized():
            states_per_rank: list = [None] * dist.get_world_size()
            dist.all_gather_object(states_per_rank, states)
        else:
            states_per_rank = [states]
        return {"rng_states_per_rank": states_per_rank,
                "epoch_position": list(getattr(self, "_epoch_position", (0, 0)))}

    def load_resume_state(self, checkpoint: dict[str, Any]) -> None:
        self._rng_to_restore = checkpoint.get("rng_states_per_rank")
        position = checkpoint.get("epoch_position")
        self._resume_position = tuple(position) if position else None

    def batches_done_in_epoch(self, epoch: int) -> int:
        """Batches of ``epoch`` already trained on: non-zero only for the epoch a checkpoint was
        taken in, before its first resumed batch (Lightning resumes at the batch after the last
        completed one, which is what was recorded at the start of that batch)."""
        position = getattr(self, "_resume_position", None)
        return int(position[1]) if position is not None and int(position[0]) == int(epoch) else 0

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # a checkpoint written at this batch's end has this many batches of the epoch behind it
        self._epoch_position = (self.current_epoch, batch_idx + 1)
        self._resume_position = None   # the resumed epoch is under way: the skip is spent

    def on_train_start(self) -> None:
        # Restored here, after sanity checks and data setup, right before the first step.
        saved = getattr(self, "_rng_to_restore", None)
        rank, world = self.trainer.global_rank, self.trainer.world_size
        if saved is not None and len(saved) == world:
            set_rng_states(saved[rank])
        elif world > 1:
            # seed_everything gave every process the same stream: decorrelate their noise
            torch.manual_seed(torch.initial_seed() + 1_000_003 * rank)
        self._rng_to_restore = None

    def on_validation_epoch_start(self) -> None:
        self._validation_rng = ExitStack()
        self._validation_rng.enter_context(isolated_rng(self.validation_seed + self.global_rank))

    def on_validation_epoch_end(self) -> None:
        self._validation_rng.close()  # the training stream continues as if validation drew nothing
