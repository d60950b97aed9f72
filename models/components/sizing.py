"""Image sizes of networks that grow or shrink by factors of two from 4x4."""
from __future__ import annotations

import math

DOUBLING_SIZES = (8, 16, 32, 64)


def doubling_stages(image_size: int, what: str) -> int:
    """Number of stride-2 stages between 4x4 and ``image_size``; a clear error for other sizes."""
    if image_size not in DOUBLING_SIZES:
        raise ValueError(f"{what} between 4x4 and the image by factors of 2, so image_size must be one of "
                         f"{list(DOUBLING_SIZES)}; got {image_size}. Set datamodule.image_size accordingly")
    return int(math.log2(image_size)) - 2
