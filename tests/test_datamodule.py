"""The shared datamodule and every dataset loader, on files the tests write in the real formats."""
import pickle
from pathlib import Path
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from datamodules.sampler import ResumableShuffleSampler
from datamodules import ImageDataModule
from datamodules.datasets import DatasetNotFoundError, load_split, split_indices


def test_digits_splits_are_disjoint_deterministic_and_cover_the_dataset():
    from sklearn.datasets import load_digits
    n = len(load_digits().images)
    parts = {s: split_indices(n, s, 100, 300) for s in ("train", "val", "test")}
    assert sum(len(p) for p in parts.values()) == n == 1797
    assert set(parts["train"]).isdisjoint(parts["val"]) and set(parts["train"]).isdisjoint(parts["test"])
    assert set(parts["val"]).isdisjoint(parts["test"])
    again = {s: split_indices(n, s, 100, 300) for s in ("train", "val", "test")}
    for s in parts:
        np.testing.assert_array_equal(parts[s], again[s])
    # images of the split are those of sklearn at those indices, on the 8-bit grid
    ds = load_split("digits", "unused", "test", 8)
    x, y = ds[0]
    ref = load_digits()
    i = parts["test"][0]
    torch.testing.assert_close(x[0], torch.from_numpy(np.round(ref.images[i] * 255 / 16) / 255).float())
    assert y == ref.target[i]


@pytest.mark.parametrize("size", [8, 16, 32])
def test_digits_datamodule_shapes_and_range(size):
    dm = ImageDataModule(name="digits", image_size=size, batch_size=32)
    dm.setup()
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (32, 1, size, size) and y.shape == (32,)
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    assert torch.equal((x * 255).round() / 255, x)  # 8-bit grid
    assert dm.image_shape == (1, size, size) and dm.num_classes == 10


def test_global_batch_size_is_split_across_processes():
    class FakeTrainer:
        world_size = 4
    dm = ImageDataModule(batch_size=64)
    dm.trainer = FakeTrainer()
    dm.setup()
    assert dm.batch_size_per_device == 16
    dm = ImageDataModule(batch_size=62)
    dm.trainer = FakeTrainer()
    with pytest.raises(ValueError, match="not divisible"):
        dm.setup()


def test_random_flip_only_on_train():
    dm = ImageDataModule(batch_size=1397, random_flip=True)
    dm.setup()
    x, _ = next(iter(dm.train_dataloader()))
    order, flips = dm.train_sampler().epoch_order(0)
    plain = torch.stack([dm.split("train")[int(i)][0] for i in order])
    assert 0.4 < float(flips.float().mean()) < 0.6
    torch.testing.assert_close(x[flips], plain[flips].flip(-1))
    torch.testing.assert_close(x[~flips], plain[~flips])
    val, _ = next(iter(dm.val_dataloader()))
    torch.testing.assert_close(val, torch.stack([dm.split("val")[i][0] for i in range(len(val))]))


def test_training_order_is_a_function_of_seed_epoch_and_batch():
    """What exact resume rests on: no hidden iterator state, and processes split each global batch."""
    dm = ImageDataModule(batch_size=64, seed=3)
    dm.setup()

    def batches(sampler, epoch):
        sampler.set_epoch(epoch)
        idx = [i for i, _ in sampler]
        return [idx[k:k + sampler.local_batch_size] for k in range(0, len(idx), sampler.local_batch_size)]

    single = dm.train_sampler()
    assert len(batches(single, 0)) == 1397 // 64 and batches(single, 0) == batches(single, 0)
    assert batches(single, 0) != batches(single, 1)
    halves = [ResumableShuffleSampler(dm.split("train"), 64, seed=3, num_replicas=2, rank=r) for r in (0, 1)]
    for g, batch in enumerate(batches(single, 1)):
        assert batch == batches(halves[0], 1)[g] + batches(halves[1], 1)[g]
    resumed = ResumableShuffleSampler(dm.split("train"), 64, seed=3, batches_done=lambda epoch: 5)
    assert batches(resumed, 1) == batches(single, 1)[5:]
    assert batches(ImageDataModule(batch_size=64, seed=4).train_sampler(), 0) != batches(single, 0)


def _write_idx(path, array):
    array = np.asarray(array, dtype=np.uint8)
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + b"".join(struct.pack(">I", d) for d in array.shape)
    path.write_bytes(header + array.tobytes())


@pytest.mark.parametrize("name,folder", [("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST")])
def test_mnist_loaders_read_idx_files(tmp_path, name, folder):
    raw = tmp_path / folder / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    train_x, test_x = rng.integers(0, 256, (60, 28, 28)), rng.integers(0, 256, (10, 28, 28))
    _write_idx(raw / "train-images-idx3-ubyte", train_x)
    _write_idx(raw / "train-labels-idx1-ubyte", np.arange(60) % 10)
    _write_idx(raw / "t10k-images-idx3-ubyte", test_x)
    _write_idx(raw / "t10k-labels-idx1-ubyte", np.arange(10) % 10)
    test = load_split(name, tmp_path, "test", 28)
    assert len(test) == 10
    torch.testing.assert_close(test[3][0][0], torch.from_numpy(test_x[3] / 255.0).float())
    train, val = load_split(name, tmp_path, "train", 32, val_size=10), load_split(name, tmp_path, "val", 32, val_size=10)
    assert len(train) == 50 and len(val) == 10 and train[0][0].shape == (1, 32, 32)


def _write_cifar_batches(base: Path) -> dict:
    base.mkdir(parents=True)
    rng = np.random.default_rng(0)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (4, 3072), dtype=np.uint8)
        batches[name] = data
        with open(base / name, "wb") as f:
            pickle.dump({"data": data, "labels": list(range(4))}, f)
    with open(base / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, f)
    return batches


def _publish_md5s_of(base: Path, monkeypatch) -> None:
    """Stand-in files get "published" checksums: torchvision's public class attributes, which both
    torchvision and genbench read."""
    import hashlib

    import torchvision.datasets as tvd

    md5 = {f.name: hashlib.md5(f.read_bytes()).hexdigest() for f in base.iterdir()}
    monkeypatch.setattr(tvd.CIFAR10, "train_list", [[f"data_batch_{i}", md5[f"data_batch_{i}"]] for i in range(1, 6)])
    monkeypatch.setattr(tvd.CIFAR10, "test_list", [["test_batch", md5["test_batch"]]])
    monkeypatch.setattr(tvd.CIFAR10, "meta", {**tvd.CIFAR10.meta, "md5": md5["batches.meta"]})


def test_cifar10_loader_reads_python_batches_after_checking_their_md5(tmp_path, monkeypatch):
    batches = _write_cifar_batches(tmp_path / "cifar-10-batches-py")
    _publish_md5s_of(tmp_path / "cifar-10-batches-py", monkeypatch)
    test = load_split("cifar10", tmp_path, "test", 32)
    assert len(test) == 4
    torch.testing.assert_close(test[1][0], torch.from_numpy(batches["test_batch"][1].reshape(3, 32, 32) / 255.0).float())
    assert len(load_split("cifar10", tmp_path, "train", 32, val_size=2)) == 18


def test_cifar10_files_that_are_not_the_published_ones_are_refused_before_unpickling(tmp_path):
    """Against torchvision's real published MD5s: stand-in batches, and a crafted pickle that would
    create a file when loaded, are refused naming the file; the crafted pickle never runs."""
    from datamodules.datasets import DatasetChecksumError

    base = tmp_path / "cifar-10-batches-py"
    _write_cifar_batches(base)
    with pytest.raises(DatasetChecksumError, match=r"data_batch_1 does not match its published MD5.*extract"):
        load_split("cifar10", tmp_path, "train", 32)
    marker = tmp_path / "pwned"

    class Crafted:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (base / "data_batch_1").write_bytes(pickle.dumps(Crafted()))
    with pytest.raises(DatasetChecksumError, match="data_batch_1"):
        load_split("cifar10", tmp_path, "test", 32)
    assert not marker.exists()


def test_celeba64_center_crops_and_uses_the_partition_file(tmp_path):
    root = tmp_path / "celeba"
    (root / "img_align_celeba").mkdir(parents=True)
    lines = []
    for i in range(6):
        arr = np.zeros((218, 178, 3), dtype=np.uint8)
        arr[39:179, 19:159] = 200  # the central 140x140 region
        Image.fromarray(arr).save(root / "img_align_celeba" / f"{i:06d}.jpg", quality=100)
        lines.append(f"{i:06d}.jpg {i % 3}")
    (root / "list_eval_partition.txt").write_text("\n".join(lines) + "\n")
    ds = load_split("celeba64", tmp_path, "val", 64)
    assert len(ds) == 2
    x, _ = ds[0]
    assert x.shape == (3, 64, 64) and abs(float(x.mean()) - 200 / 255) < 0.02


def test_image_folder_with_class_subfolders(tmp_path):
    for cls in ("cats", "dogs"):
        (tmp_path / cls).mkdir()
        for i in range(10):
            Image.fromarray(np.full((40, 50, 3), 10 * i, dtype=np.uint8)).save(tmp_path / cls / f"{i}.png")
    splits = {s: load_split("image_folder", tmp_path, s, 16) for s in ("train", "val", "test")}
    assert [len(splits[s]) for s in ("train", "val", "test")] == [18, 1, 1]
    assert splits["train"][0][0].shape == (3, 16, 16)
    assert {y for _, y in splits["train"]} == {0, 1}


def test_missing_dataset_offline_says_where_to_put_files(tmp_path):
    with pytest.raises(DatasetNotFoundError, match=r"copy the four idx files.*MNIST/raw"):
        load_split("mnist", tmp_path, "train", 28)
    with pytest.raises(DatasetNotFoundError, match="cifar-10-batches-py"):
        load_split("cifar10", tmp_path, "train", 32)
    with pytest.raises(DatasetNotFoundError, match="img_align_celeba"):
        load_split("celeba64", tmp_path, "train", 64)
    with pytest.raises(DatasetNotFoundError, match="does not exist"):
        load_split("image_folder", tmp_path / "nope", "train", 32)


def test_config_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match="1 channel"):
        ImageDataModule(name="digits", channels=3)
    with pytest.raises(KeyError, match="registered"):
        ImageDataModule(name="imagenet21k")


def test_in_memory_batches_equal_the_dataloader_batches():
    """The fast path (one gather on the device) yields the DataLoader path's batches bit for bit,
    flips and mid-epoch resume included."""
    from datamodules.in_memory import InMemoryLoader
    dm = ImageDataModule(batch_size=64, seed=5, random_flip=True, in_memory=True)
    dm.setup()
    fast = dm.train_dataloader()
    assert isinstance(fast, InMemoryLoader)
    dm.in_memory = False
    slow = dm.train_dataloader()
    for epoch in (0, 2):
        fast.sampler.set_epoch(epoch)
        slow.sampler.set_epoch(epoch)
        pairs = list(zip(fast, slow, strict=True))
        assert len(pairs) == len(fast) == len(slow) == 1397 // 64
        for (xf, yf), (xs, ys) in pairs:
            assert torch.equal(xf, xs) and torch.equal(yf, ys)
    fast.sampler.batches_done = lambda epoch: 7
    assert torch.equal(next(iter(fast))[0], pairs[7][1][0])


def test_batches_already_on_the_device_pass_through_the_transfer_hook():
    dm = ImageDataModule(batch_size=4)
    x, y = torch.rand(4, 1, 8, 8), torch.arange(4)
    batch = (x, y)
    assert dm.transfer_batch_to_device(batch, torch.device("cpu"), 0) is batch     # no walk, no copy
    moved = dm.transfer_batch_to_device([x.double(), {"y": y}], torch.device("meta"), 0)   # others: Lightning's walk
    assert moved[0].device.type == "meta" and moved[1]["y"].device.type == "meta"


def test_imagenet_folders_give_class_labels_and_the_adm_centre_crop(tmp_path):
    """train/<class>/ and val/<class>/ -> labels from the sorted class folders; every image through
    guided-diffusion's centre crop (box-halving while the short side >= 2 x size, bicubic to size,
    central crop), checked against PIL steps written out here."""
    rng = np.random.default_rng(0)
    for split, per_class in (("train", 12), ("val", 2)):
        for wnid in ("n02", "n01"):
            (tmp_path / split / wnid).mkdir(parents=True)
            for i in range(per_class):
                Image.fromarray(rng.integers(0, 256, (40, 70, 3), dtype=np.uint8)).save(tmp_path / split / wnid / f"{i}.png")
    test = load_split("imagenet", tmp_path, "test", 8)
    train, val = (load_split("imagenet", tmp_path, s, 8) for s in ("train", "val"))
    assert (len(train), len(val), len(test)) == (22, 2, 4)
    assert sorted({y for _, y in test}) == [0, 1] and test.labels == [0, 0, 1, 1]   # n01 -> 0, n02 -> 1
    x, _ = test[0]
    with Image.open(tmp_path / "val" / "n01" / "0.png") as img:
        img = img.convert("RGB")
        img = img.resize((35, 20), Image.BOX)                  # short side 40 >= 16: halve
        img = img.resize((17, 10), Image.BOX)                  # 20 >= 16: halve again; 10 < 16: stop
        img = img.resize((14, 8), Image.BICUBIC)               # short side 10 -> 8 (17 * 0.8 = 13.6 -> 14)
        expected = np.asarray(img)[:, 3:11].transpose(2, 0, 1)
    np.testing.assert_array_equal((x.numpy() * 255).round().astype(np.uint8), expected)
    (tmp_path / "val" / "n99").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "val" / "n99" / "x.png")
    with pytest.raises(ValueError, match="class folders that train/ lacks"):
        load_split("imagenet", tmp_path, "test", 8)


def test_downsampled_imagenet_npz_rows_are_rgb_planes_with_one_based_labels(tmp_path):
    rng = np.random.default_rng(1)
    planes = rng.integers(0, 256, (30, 3, 8, 8), dtype=np.uint8)
    labels = rng.integers(1, 1001, 30)
    for k, part in enumerate((slice(0, 20), slice(20, 30)), start=1):
        np.savez(tmp_path / f"train_data_batch_{k}.npz", data=planes[part].reshape(-1, 192), labels=labels[part])
    np.savez(tmp_path / "val_data.npz", data=planes[:5].reshape(-1, 192), labels=labels[:5])
    test = load_split("imagenet", tmp_path, "test", 8, layout="npz")
    np.testing.assert_array_equal(test.images.numpy(), planes[:5])
    np.testing.assert_array_equal(test.labels.numpy(), labels[:5] - 1)
    train = load_split("imagenet", tmp_path, "train", 8, layout="npz", val_size=4)
    assert len(train) == 26
    with pytest.raises(ValueError, match="holds 8x8 images but datamodule.image_size=16"):
        load_split("imagenet", tmp_path, "test", 16, layout="npz")
    with pytest.raises(DatasetNotFoundError, match="no val_data.npz"):
        load_split("imagenet", tmp_path / "empty", "test", 8)
