"""Image sets for scoring sample sets directly: a folder of images, a guided-diffusion .npz
(``arr_0``: uint8 NHWC) or a registered dataset (``digits`` / ``cifar10:test``). All -> uint8 NCHW."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image


class ImageSetError(ValueError):
    pass


def load_folder(folder: Path) -> torch.Tensor:
    from datamodules.datasets import IMAGE_EXTENSIONS, list_image_files

    files = list_image_files(folder)
    if not files:
        raise ImageSetError(f"folder {folder} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    arrays, first = [], None
    for f in files:
        with Image.open(f) as img:
            mode = "L" if img.mode in ("L", "1", "I;16", "I") else "RGB"
            arr = np.asarray(img.convert(mode), dtype=np.uint8)
        arr = arr[..., None] if arr.ndim == 2 else arr
        if first is None:
            first = (f, arr.shape)
        elif arr.shape != first[1]:
            raise ImageSetError(f"images in {folder} differ in size/channels: {first[0].name} is {first[1]}, "
                                f"{f.name} is {arr.shape}; resize them to one size first")
        arrays.append(arr)
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def load_npz(path: Path) -> torch.Tensor:
    try:
        with np.load(path) as data:
            if "arr_0" not in data:
                raise ImageSetError(f"{path} has no 'arr_0' array (guided-diffusion format: uint8 NHWC); keys: {list(data)}")
            arr = data["arr_0"]
    except (OSError, ValueError) as err:
        if isinstance(err, ImageSetError):
            raise
        raise ImageSetError(f"cannot read {path}: {err}") from err
    if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] not in (1, 3):
        raise ImageSetError(f"{path}: arr_0 must be uint8 (N, H, W, 1|3), got {arr.dtype} {arr.shape}")
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


def load_dataset_images(spec: str, data_dir: str, image_size: int | None = None) -> tuple[torch.Tensor, str, str]:
    """``name`` or ``name:split`` -> (uint8 images, name, split)."""
    from datamodules.datasets import get_entry, load_split
    from metrics.evaluation import quantize

    name, _, split = spec.partition(":")
    split = split or "train"
    size = image_size or get_entry(name).info.native_size
    ds = load_split(name, data_dir, split, size)
    return quantize(torch.stack([ds[i][0] for i in range(len(ds))])), name, split


def load_image_set(source: str, data_dir: str = "data", image_size: int | None = None) -> torch.Tensor:
    path = Path(source)
    if path.suffix == ".npz":
        if not path.is_file():
            raise ImageSetError(f"{path} does not exist")
        return load_npz(path)
    if path.is_dir():
        return load_folder(path)
    from datamodules.datasets import REGISTRY
    if source.partition(":")[0] in REGISTRY:
        return load_dataset_images(source, data_dir, image_size)[0]
    raise ImageSetError(f"{source!r} is neither a folder, an .npz file nor a dataset ({sorted(REGISTRY)})")
