"""The training-compute count includes attention (the fused CPU attention kernel counts 0 FLOPs in
torch.utils.flop_counter; the count must not depend on which kernel runs)."""
import torch
import torch.nn.functional as F

from models.compute import training_flops_per_image


class AttentionOnly(torch.nn.Module):
    """A "family" whose training loss is one self-attention over the image's pixels (L = H W
    tokens of width d = C), so its FLOPs have a closed form."""

    def __init__(self, heads: int, width: int):
        super().__init__()
        self.heads = heads
        self.proj = torch.nn.Parameter(torch.ones(width))

    def training_loss(self, x, y=None):
        b, c, h, w = x.shape
        tokens = (x.flatten(2).transpose(1, 2) * self.proj).reshape(b, h * w, self.heads, c // self.heads).transpose(1, 2)
        return {"loss": F.scaled_dot_product_attention(tokens, tokens, tokens).sum()}


def test_attention_flops_are_counted_with_their_closed_form():
    b, heads, c, side = 2, 2, 8, 8
    module = AttentionOnly(heads, c)
    flops = training_flops_per_image(module, torch.rand(b, c, side, side), probe_images=b)
    length, d = side * side, c // heads
    forward = 2 * (2 * heads * length * length * d)            # Q K^T and P V, per image
    elementwise = 2 * c * length                               # the projection's multiply, forward and backward
    assert flops >= 3 * forward                                # forward + backward (2x) of both products
    assert abs(flops - 3 * forward) <= elementwise + 1e-9, (flops, 3 * forward)
