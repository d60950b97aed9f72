"""Reference cache, checkpoint evaluation (1 vs 2 processes), sample-set scoring and its errors."""
import json
import math
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT
from models.configs import compose
from metrics.image_sets import ImageSetError, load_image_set
from metrics.reference import REAL_IMAGE_PASSES, ReferenceCacheWarning, cache_path, load_or_compute_reference, reference_spec



class CountingExtractor(torch.nn.Module):
    name, feature_dim, has_logits = "counting", 4, False

    def cache_key(self):
        return {"extractor": self.name}

    def forward(self, images):
        x = images.float().flatten(1)
        return {"pool": torch.stack([x.mean(1), x.std(1), x[:, 0], x[:, -1]], 1), "logits": None}


def test_reference_is_cached_and_a_second_evaluation_does_no_real_pass(tmp_path):
    from datamodules.datasets import load_split
    ds = load_split("digits", "", "train", 8)
    ext = CountingExtractor()
    before = REAL_IMAGE_PASSES["count"]
    first, computed = load_or_compute_reference(ext, ds, "digits", "train", 200, (1, 8, 8), tmp_path)
    assert computed and REAL_IMAGE_PASSES["count"] - before == 200
    second, computed = load_or_compute_reference(ext, ds, "digits", "train", 200, (1, 8, 8), tmp_path)
    assert not computed and REAL_IMAGE_PASSES["count"] - before == 200  # zero new real-image passes
    torch.testing.assert_close(first.sigma, second.sigma)
    # a different N is a different key
    _, computed = load_or_compute_reference(ext, ds, "digits", "train", 100, (1, 8, 8), tmp_path)
    assert computed


@pytest.mark.parametrize("damage", ["truncate", "nan", "spec"])
def test_corrupt_or_mismatched_cache_is_rebuilt_with_a_warning(tmp_path, damage):
    from datamodules.datasets import load_split
    ds = load_split("digits", "", "train", 8)
    ext = CountingExtractor()
    good, _ = load_or_compute_reference(ext, ds, "digits", "train", 50, (1, 8, 8), tmp_path)
    path = cache_path(tmp_path, reference_spec("digits", "train", 50, (1, 8, 8), ext.cache_key()))
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[:100])
    else:
        with np.load(path) as data:
            arrays = dict(data)
        if damage == "nan":
            arrays["mu"][0] = np.nan
        else:
            arrays["spec"] = np.array(json.dumps({"dataset": "cifar10"}))
        with open(path, "wb") as f:
            np.savez(f, **arrays)
    with pytest.warns(ReferenceCacheWarning, match="rebuilding"):
        rebuilt, computed = load_or_compute_reference(ext, ds, "digits", "train", 50, (1, 8, 8), tmp_path)
    assert computed
    torch.testing.assert_close(rebuilt.mu, good.mu)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ReferenceCacheWarning)
        load_or_compute_reference(ext, ds, "digits", "train", 50, (1, 8, 8), tmp_path)  # now valid again


def test_checkpoint_metrics_are_identical_on_one_and_two_processes(smoke_checkpoint, shared_cache, tmp_path):
    from scripts.evaluate import evaluate

    results = {}
    for n in (1, 2):
        cfg = compose("eval", [f"ckpt_path={smoke_checkpoint}", f"num_processes={n}", "evaluation.num_samples=24",
                            "evaluation.batch_size=5", "evaluation.bpd_num_images=6", "sampler.name=ddim",
                            "sampler.steps=10", "sampler.eta=1.0", f"paths.cache_dir={shared_cache}"], tmp_path / f"n{n}")
        results[n] = evaluate(cfg)
        assert json.loads((tmp_path / f"n{n}" / "results.json").read_text())["world_size"] == n
    one, two = results[1]["metrics"], results[2]["metrics"]
    assert {"fid", "is", "kid", "precision", "recall", "density", "coverage", "bpd", "nfe"} <= set(one)
    for name in one:
        if name != "sec_per_sample":
            assert two[name] == pytest.approx(one[name], rel=1e-6, abs=1e-9), name


def _write_pngs(folder, images):
    folder.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(images):
        Image.fromarray(img.squeeze(-1) if img.shape[-1] == 1 else img).save(folder / f"{i:04d}.png")


def test_sample_sets_from_folder_npz_and_dataset_agree(tmp_path, shared_cache):
    from scripts.evaluate import evaluate
    from metrics.image_sets import load_dataset_images

    real, _, _ = load_dataset_images("digits:test", "")
    nhwc = real.permute(0, 2, 3, 1).numpy()
    np.savez(tmp_path / "samples.npz", arr_0=nhwc[:150])
    _write_pngs(tmp_path / "folder", nhwc[:150])
    out = {}
    for name, source in [("npz", tmp_path / "samples.npz"), ("folder", tmp_path / "folder")]:
        cfg = compose("eval", [f"samples={source}", "reference=digits:train", "evaluation.extractor=classifier",
                            f"paths.cache_dir={shared_cache}", "save_features=true"], tmp_path / name)
        out[name] = evaluate(cfg)["metrics"]
    assert out["npz"] == pytest.approx(out["folder"])
    assert out["npz"]["precision"] > 0.5 and math.isfinite(out["npz"]["fid"])
    feats = np.load(tmp_path / "npz" / "features.npz")
    assert feats["samples_pool"].shape[0] == 150 and "samples_logits" in feats


def test_cli_scores_a_sample_set_and_prints_one_json_line(tmp_path, shared_cache):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "a.npz", arr_0=rng.integers(0, 256, (40, 8, 8, 1), dtype=np.uint8))
    proc = subprocess.run([sys.executable, "scripts/evaluate.py", f"samples={tmp_path / 'a.npz'}", "reference=digits",
                           "evaluation.extractor=classifier", f"paths.cache_dir={shared_cache}",
                           f"hydra.run.dir={tmp_path / 'out'}"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    line = json.loads(proc.stdout.strip().splitlines()[-1])
    assert line["feature_extractor"] == "classifier" and line["num_samples"] == 40 and "fid" in line["metrics"]
    assert (tmp_path / "out" / "results.json").is_file()


def test_bad_image_sets_get_clear_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ImageSetError, match="holds no images"):
        load_image_set(str(tmp_path / "empty"))
    _write_pngs(tmp_path / "mixed", [np.zeros((8, 8, 1), np.uint8)])
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "mixed" / "x.png")
    with pytest.raises(ImageSetError, match="differ in size/channels"):
        load_image_set(str(tmp_path / "mixed"))
    np.savez(tmp_path / "f.npz", arr_0=np.zeros((2, 8, 8, 3), np.float32))
    with pytest.raises(ImageSetError, match="must be uint8"):
        load_image_set(str(tmp_path / "f.npz"))
    with pytest.raises(ImageSetError, match="neither a folder"):
        load_image_set("imagenet21k")


def test_channel_mismatch_between_samples_and_reference(tmp_path, shared_cache):
    from scripts.evaluate import evaluate
    np.savez(tmp_path / "rgb.npz", arr_0=np.zeros((10, 8, 8, 3), np.uint8))
    np.savez(tmp_path / "gray.npz", arr_0=np.zeros((10, 8, 8, 1), np.uint8))
    cfg = compose("eval", [f"samples={tmp_path / 'rgb.npz'}", f"reference={tmp_path / 'gray.npz'}",
                        "evaluation.extractor=inception_pool", f"paths.cache_dir={shared_cache}"], tmp_path / "o")
    with pytest.raises(ValueError, match="channel"):
        evaluate(cfg)


def test_images_outside_unit_range_from_a_model_are_refused():
    from models.images import check_images
    with pytest.raises(ValueError, match=r"outside \[0, 1\]"):
        check_images(torch.full((2, 1, 8, 8), 1.5), (1, 8, 8), "BadModel.sample")
    with pytest.raises(ValueError, match="expected"):
        check_images(torch.zeros(2, 3, 8, 8), (1, 8, 8), "BadModel.sample")


def test_adm_npz_round_trip_gives_the_same_metrics(smoke_checkpoint, shared_cache, tmp_path):
    """save_samples=true writes the checkpoint's samples in the ADM format (arr_0 uint8 NHWC); scoring
    that file as a sample set against the same reference gives the checkpoint evaluation's metrics."""
    from scripts.evaluate import evaluate

    first = evaluate(compose("eval", [f"ckpt_path={smoke_checkpoint}", "evaluation.num_samples=40", "evaluation.bpd_num_images=0",
                                   "sampler.name=ddim", "sampler.steps=5", "save_samples=true",
                                   f"paths.cache_dir={shared_cache}"], tmp_path / "ckpt"))
    (npz,) = (tmp_path / "ckpt").glob("samples_*.npz")
    assert npz.name == "samples_40x8x8x1.npz"
    with np.load(npz) as data:
        assert data["arr_0"].dtype == np.uint8 and data["arr_0"].shape == (40, 8, 8, 1) and "arr_1" not in data
    again = evaluate(compose("eval", [f"samples={npz}", "reference=digits:train", "evaluation.extractor=classifier",
                                   f"paths.cache_dir={shared_cache}"], tmp_path / "npz"))
    for name in ("fid", "kid", "is", "precision", "recall", "density", "coverage"):
        assert again["metrics"][name] == pytest.approx(first["metrics"][name], rel=1e-6, abs=1e-9), name


def test_precomputed_reference_statistics_are_used_without_reading_the_images(tmp_path, shared_cache):
    """An ADM reference batch with mu/sigma/mu_s/sigma_s: FID and sFID from those statistics equal the
    ones from the same images, while its arr_0 (here float32, which reading would refuse) is never read."""
    from metrics.extractors import InceptionPoolExtractor
    from metrics.feature_metrics import mean_cov
    from metrics.image_sets import load_dataset_images
    from scripts.evaluate import evaluate

    real, _, _ = load_dataset_images("digits:test", "")
    nhwc = real.permute(0, 2, 3, 1).numpy()
    np.savez(tmp_path / "samples.npz", arr_0=nhwc[:24])
    np.savez(tmp_path / "ref_images.npz", arr_0=nhwc[100:140])
    out = InceptionPoolExtractor()(real[100:140])
    (mu, sigma), (mu_s, sigma_s) = mean_cov(out["pool"]), mean_cov(out["spatial"])
    np.savez(tmp_path / "ref_stats.npz", arr_0=nhwc[100:140].astype(np.float32), mu=mu.numpy(), sigma=sigma.numpy(),
             mu_s=mu_s.numpy(), sigma_s=sigma_s.numpy())
    common = [f"samples={tmp_path / 'samples.npz'}", "evaluation.extractor=inception_pool", "evaluation.metrics=[fid,sfid]",
              f"paths.cache_dir={shared_cache}"]
    from_images = evaluate(compose("eval", [*common, f"reference={tmp_path / 'ref_images.npz'}"], tmp_path / "a"))
    from_stats = evaluate(compose("eval", [*common, f"reference={tmp_path / 'ref_stats.npz'}"], tmp_path / "b"))
    for name in ("fid", "sfid"):
        assert from_stats["metrics"][name] == pytest.approx(from_images["metrics"][name], rel=1e-4), name
    assert from_stats["details"]["reference"]["num_images"] == 40          # from the .npy header alone
    # without mu_s/sigma_s, sFID is refused with the fix; "auto" scores FID only
    np.savez(tmp_path / "ref_pool_only.npz", mu=mu.numpy(), sigma=sigma.numpy())
    with pytest.raises(ValueError, match="no spatial statistics"):
        evaluate(compose("eval", [*common, f"reference={tmp_path / 'ref_pool_only.npz'}"], tmp_path / "c"))
    auto = evaluate(compose("eval", [c for c in common if "metrics" not in c] + [f"reference={tmp_path / 'ref_pool_only.npz'}"],
                                 tmp_path / "d"))
    assert "fid" in auto["metrics"] and "sfid" not in auto["metrics"]


def test_bad_adm_npz_files_are_refused_with_the_fix(tmp_path):
    from metrics.image_sets import npz_statistics

    cases = {"unit.npz": (np.full((2, 8, 8, 1), 0.5, np.float32), r"must be uint8.*np\.round\(x \* 255\)"),
             "signed.npz": (np.full((2, 8, 8, 3), -0.5, np.float32), r"must be uint8.*\(x \+ 1\) \* 127\.5"),
             "nchw.npz": (np.zeros((2, 3, 8, 8), np.uint8), r"NHWC.*looks NCHW: arr\.transpose\(0, 2, 3, 1\)"),
             "flat.npz": (np.zeros((2, 64), np.uint8), r"batch of images \(N, H, W, C\)")}
    for name, (arr, match) in cases.items():
        np.savez(tmp_path / name, arr_0=arr)
        with pytest.raises(ImageSetError, match=match):
            load_image_set(str(tmp_path / name))
    np.savez(tmp_path / "half.npz", mu=np.zeros(4))
    assert npz_statistics(tmp_path / "half.npz") is None                      # mu without sigma: no statistics
    np.savez(tmp_path / "odd.npz", mu=np.zeros(4), sigma=np.eye(4), mu_s=np.zeros(3))
    with pytest.raises(ImageSetError, match="mu_s without sigma_s"):
        npz_statistics(tmp_path / "odd.npz")
    np.savez(tmp_path / "shape.npz", mu=np.zeros(4), sigma=np.eye(3))
    with pytest.raises(ImageSetError, match="not a mean vector and its covariance"):
        npz_statistics(tmp_path / "shape.npz")
