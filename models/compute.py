"""Training compute: model FLOPs of one training batch (forward + backward, counted by
torch.utils.flop_counter on the family's own loss terms). The callback that multiplies it by the
batches a run trains is metrics/compute.py."""
from __future__ import annotations

import copy

from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from models.base import LossTerm
from models.rng import isolated_rng


def training_flops_per_image(module, images: Tensor, labels: Tensor | None = None, probe_images: int = 2) -> float:
    """FLOPs of one training step per image, counted on ``probe_images`` images (FLOPs of these
    networks are linear in the batch) of a copy of ``module``: the run's weights, batch-norm
    statistics and random stream are left exactly as they were. A batch is the family's loss
    terms (``loss_terms``), each weighted by how often it steps (the GAN: one D update and
    1 / n_critic G updates); optimizer and EMA updates are not counted, as MFU does not count them.

    Attention is counted through torch's math kernel: the fused CPU kernel of
    ``scaled_dot_product_attention`` counts 0 in ``FlopCounterMode``, while the math kernel's matrix
    products count what the fused kernels compute (4 B H L^2 d forward)."""
    probe = copy.deepcopy(module).train()
    x = images[:probe_images]
    y = None if labels is None else labels[:probe_images]
    with isolated_rng(0), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        total = 0.0
        # a genbench module declares its loss terms; any other module with a training_loss has one
        terms = probe.loss_terms() if hasattr(probe, "loss_terms") else \
            [LossTerm(lambda images, labels: probe.training_loss(images, labels)["loss"])]
        for term in terms:
            before = counter.get_total_flops()
            term.loss(x, y).backward()
            total += (counter.get_total_flops() - before) / term.every
    return float(total) / x.shape[0]
