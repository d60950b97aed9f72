"""The sample grid: torchvision's make_grid layout, and one class per row for a conditional model."""
import torch

from metrics.evaluation import grid_order, image_grid


def test_unconditional_grid_is_the_first_samples_square():
    order, per_row = grid_order(num_samples=512, grid_size=100, labels=None)
    assert order == list(range(100)) and per_row == 10


def test_conditional_grid_holds_one_class_per_row_in_class_order():
    labels = torch.tensor([3, 1, 0, 2, 1, 0, 3, 2, 2, 0, 1, 3, 0])
    order, per_row = grid_order(num_samples=len(labels), grid_size=8, labels=labels)
    assert per_row == 2
    rows = [labels[order[r * per_row:(r + 1) * per_row]].tolist() for r in range(4)]
    assert rows == [[0, 0], [1, 1], [2, 2], [3, 3]]
    # each row holds that class's first samples, in sample order
    assert order[:2] == [2, 5] and order[2:4] == [1, 4]


def test_image_grid_places_image_k_at_row_k_div_nrow():
    images = torch.arange(6, dtype=torch.uint8).mul(40).view(6, 1, 1, 1).expand(6, 1, 2, 2).contiguous()
    grid = image_grid(images, nrow=3, pad=1)  # (H, W, C)
    assert grid.shape == (2 * 3 + 1, 3 * 3 + 1, 1)
    assert grid[1, 1, 0] == 0 and grid[1, 4, 0] == 40 and grid[4, 1, 0] == 120 and grid[4, 7, 0] == 200
    assert grid[0, 0, 0] == 255  # white padding
