import pytest
import torch

from models.components.unet import UNet, timestep_embedding


@pytest.mark.parametrize("size,mult", [(8, (1, 2)), (16, (1, 2)), (16, (1, 2, 2)), (28, (1, 2)),
                                       (32, (1, 2, 2, 2)), (64, (1, 2, 2, 2))])
def test_output_shape_equals_input_shape(size, mult):
    net = UNet(3, size, base_channels=32, channel_mult=mult, num_res_blocks=1, attention_resolutions=(size // 2,))
    x = torch.randn(2, 3, size, size)
    assert net(x, torch.tensor([0, 999])).shape == x.shape


def test_unsupported_size_is_a_clear_error_naming_allowed_sizes():
    with pytest.raises(ValueError, match=r"multiple of 8.*Supported sizes up to 64: \[16, 24, 32"):
        UNet(1, 12, base_channels=32, channel_mult=(1, 2, 2, 2))
    with pytest.raises(ValueError, match="attention_resolutions"):
        UNet(1, 8, base_channels=32, channel_mult=(1, 2), attention_resolutions=(16,))


def test_ho2020_cifar10_unet_has_35_7M_parameters():
    """Ho et al. 2020, Sec. 4 / Table: the CIFAR-10 model has 35.7M parameters."""
    net = UNet(3, 32, base_channels=128, channel_mult=(1, 2, 2, 2), num_res_blocks=2,
               attention_resolutions=(16,), dropout=0.1)
    assert sum(p.numel() for p in net.parameters()) == pytest.approx(35.7e6, abs=0.1e6)


def test_timestep_embedding_is_sinusoidal():
    emb = timestep_embedding(torch.tensor([0, 5]), 8)
    assert emb.shape == (2, 8)
    torch.testing.assert_close(emb[0], torch.tensor([0.0] * 4 + [1.0] * 4))
    assert float(emb[1, 0]) == pytest.approx(torch.sin(torch.tensor(5.0)).item())
