"""Image sets for scoring sample sets directly: a folder of images, an ADM / guided-diffusion .npz
(``arr_0``: uint8 NHWC, optional ``arr_1``: labels; a reference batch may also carry its
precomputed statistics ``mu, sigma`` and ``mu_s, sigma_s``) or a registered dataset
(``digits`` / ``cifar10:test``). All images -> uint8 NCHW."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image


class ImageSetError(ValueError):
    pass


#: .npz files are read as plain arrays: an object array would be a pickle, which can run code
PICKLE_HINT = ("; genbench reads .npz files without pickles (an object array can execute code when loaded): "
               "save plain numeric arrays, e.g. np.savez(path, arr_0=np.asarray(images, dtype=np.uint8))")


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


def _npz_check(path: Path, arr: np.ndarray) -> None:
    """arr_0 as the ADM evaluator reads it: uint8 (N, H, W, 1|3); other layouts refused with the fix."""
    if arr.ndim != 4:
        raise ImageSetError(f"{path}: arr_0 must be a batch of images (N, H, W, C), got shape {arr.shape}")
    if arr.dtype != np.uint8:
        hint = ("values in [0, 1]: np.round(x * 255).clip(0, 255).astype(np.uint8)"
                if np.issubdtype(arr.dtype, np.floating) and arr.size and 0 <= arr.min() and arr.max() <= 1
                else "values in [-1, 1]: np.round((x + 1) * 127.5).clip(0, 255).astype(np.uint8)"
                if np.issubdtype(arr.dtype, np.floating) and arr.size and -1 <= arr.min() and arr.max() <= 1
                else "convert to 8-bit pixels 0..255 (np.uint8)")
        raise ImageSetError(f"{path}: arr_0 must be uint8 pixels 0..255, got {arr.dtype}; for {hint}")
    if arr.shape[-1] not in (1, 3):
        hint = "; it looks NCHW: arr.transpose(0, 2, 3, 1)" if arr.shape[1] in (1, 3) else ""
        raise ImageSetError(f"{path}: arr_0 must be NHWC with 1 or 3 channels last, got shape {arr.shape}{hint}")


def load_npz(path: Path) -> torch.Tensor:
    try:
        with np.load(path, allow_pickle=False) as data:
            if "arr_0" not in data:
                raise ImageSetError(f"{path} has no 'arr_0' array (guided-diffusion format: uint8 NHWC); keys: {list(data)}")
            arr = data["arr_0"]
    except (OSError, ValueError) as err:
        if isinstance(err, ImageSetError):
            raise
        raise ImageSetError(f"cannot read {path}: {err}{PICKLE_HINT if 'allow_pickle' in str(err) else ''}") from err
    _npz_check(path, arr)
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


def npz_labels(path: Path) -> torch.Tensor | None:
    """``arr_1`` (the samples' classes) of an .npz, if it has one."""
    with np.load(path, allow_pickle=False) as data:
        return torch.from_numpy(data["arr_1"].astype(np.int64)) if "arr_1" in data.files else None


def npz_statistics(path: Path) -> dict[str, torch.Tensor] | None:
    """The precomputed reference statistics of an ADM reference batch (``mu, sigma`` and, for sFID,
    ``mu_s, sigma_s``) as float64, read without touching its images; None when it has none."""
    try:
        with np.load(path, allow_pickle=False) as data:
            if not {"mu", "sigma"} <= set(data.files):
                return None
            stats = {k: torch.from_numpy(np.asarray(data[k], dtype=np.float64)) for k in ("mu", "sigma", "mu_s", "sigma_s")
                     if k in data.files}
    except (OSError, ValueError) as err:
        raise ImageSetError(f"cannot read {path}: {err}{PICKLE_HINT if 'allow_pickle' in str(err) else ''}") from err
    for mu, sigma in (("mu", "sigma"), ("mu_s", "sigma_s")):
        if (mu in stats) != (sigma in stats):
            raise ImageSetError(f"{path} has {mu if mu in stats else sigma} without "
                                f"{sigma if mu in stats else mu}: give both or neither")
        if mu in stats and (stats[mu].ndim != 1 or stats[sigma].shape != (len(stats[mu]),) * 2):
            raise ImageSetError(f"{path}: {mu} {tuple(stats[mu].shape)} and {sigma} {tuple(stats[sigma].shape)} "
                                "are not a mean vector and its covariance")
    return stats


def npz_count(path: Path) -> int | None:
    """How many images ``arr_0`` holds, from its .npy header alone (no image is read)."""
    import zipfile

    with zipfile.ZipFile(path) as z:
        if "arr_0.npy" not in z.namelist():
            return None
        with z.open("arr_0.npy") as f:
            version = np.lib.format.read_magic(f)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, _, _ = read_header(f)
    return int(shape[0]) if shape else None


def save_npz(path: Path, images: torch.Tensor, labels: torch.Tensor | None = None) -> Path:
    """uint8 NCHW images (and their labels) as an ADM-format .npz (arr_0 NHWC, arr_1), written to a
    temporary file and renamed into place."""
    from metrics.cache_files import atomic_write

    if images.dtype != torch.uint8 or images.ndim != 4:
        raise ImageSetError(f"samples must be uint8 (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
    arrays = {"arr_0": images.permute(0, 2, 3, 1).contiguous().numpy()}
    if labels is not None:
        arrays["arr_1"] = labels.cpu().numpy().astype(np.int64)
    atomic_write(path, lambda f: np.savez(f, **arrays))
    return path


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
