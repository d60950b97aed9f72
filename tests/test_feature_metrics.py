"""Feature-space metrics against independent references: scipy, torchmetrics, prdc, numpy formulas."""
import numpy as np
import pytest
import torch
from scipy import linalg

from metrics.feature_metrics import (density_coverage, FrechetDistance, InceptionScore, KernelInceptionDistance, PrecisionRecall,
                                     frechet_distance, inception_score, kernel_inception_distance, mean_cov,
                                     precision_recall_density_coverage)


def scipy_fid(x: np.ndarray, y: np.ndarray) -> float:
    """The pytorch-fid / TTUR formula: scipy.linalg.sqrtm of the covariance product."""
    mu1, mu2 = x.mean(0), y.mean(0)
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    covmean = linalg.sqrtm(s1.dot(s2))
    covmean = covmean.real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


@pytest.fixture(scope="module")
def features():
    rng = np.random.default_rng(0)
    real = rng.normal(size=(600, 32)) @ rng.normal(size=(32, 32)) * 0.3
    fake = rng.normal(size=(500, 32)) @ rng.normal(size=(32, 32)) * 0.3 + 0.2
    return real, fake


def test_fid_equals_scipy_sqrtm_formula(features):
    real, fake = features
    mu1, s1 = mean_cov(torch.from_numpy(fake))
    mu2, s2 = mean_cov(torch.from_numpy(real))
    ours = float(frechet_distance(mu1, s1, mu2, s2))
    assert ours == pytest.approx(scipy_fid(fake, real), rel=1e-6)


def test_fid_with_a_rank_deficient_covariance_equals_scipy():
    """Fewer samples than dimensions: S1 is singular, the Cholesky factor does not exist and the
    eigendecomposition path is taken; scipy's sqrtm still agrees."""
    rng = np.random.default_rng(1)
    few = rng.normal(size=(20, 32))                 # rank 19 < 32
    many = rng.normal(size=(400, 32)) * 1.2 + 0.1
    mu1, s1 = mean_cov(torch.from_numpy(few))
    mu2, s2 = mean_cov(torch.from_numpy(many))
    assert int(torch.linalg.cholesky_ex(s1).info) != 0
    assert float(frechet_distance(mu1, s1, mu2, s2)) == pytest.approx(scipy_fid(few, many), rel=1e-6)


def test_fid_metric_streaming_equals_torchmetrics(features):
    from torchmetrics.image.fid import FrechetInceptionDistance

    class Identity(torch.nn.Module):
        num_features = 32

        def forward(self, x):
            return x

    real, fake = (torch.from_numpy(a) for a in features)
    ref = FrechetInceptionDistance(feature=Identity(), normalize=True)
    ref.update(real.float(), real=True)
    ref.update(fake.float(), real=False)
    mu, sigma = mean_cov(real.float())
    ours = FrechetDistance(mu, sigma)
    for chunk in fake.float().split(77):  # batch size must not matter
        ours.update(chunk)
    assert float(ours.compute()) == pytest.approx(float(ref.compute()), rel=1e-5)


def test_fid_of_a_set_with_itself_is_zero_and_never_negative(features):
    real, _ = features
    mu, s = mean_cov(torch.from_numpy(real))
    assert float(frechet_distance(mu, s, mu, s)) == pytest.approx(0.0, abs=1e-8)
    # rank-deficient covariances (N < D) stay real and >= 0
    few = torch.randn(10, 64, dtype=torch.float64)
    mu, s = mean_cov(few)
    value = frechet_distance(mu, s, mu, s)
    assert value.dtype == torch.float64 and 0.0 <= float(value) < 1e-6


def test_inception_score_equals_numpy_formula():
    logits = torch.randn(1000, 10, dtype=torch.float64) * 3
    p = torch.softmax(logits, 1).numpy()
    scores = []
    for part in np.array_split(p, 10):
        py = part.mean(0, keepdims=True)
        scores.append(np.exp((part * (np.log(part) - np.log(py))).sum(1).mean()))
    mean, std = inception_score(logits, 10)
    assert mean == pytest.approx(np.mean(scores), rel=1e-9) and std == pytest.approx(np.std(scores), rel=1e-9)
    # the metric object sorts by global sample index, so arrival order does not matter
    metric = InceptionScore(10)
    order = torch.randperm(1000)
    for chunk in order.split(128):
        metric.update(logits[chunk], chunk)
    assert metric.compute()[0] == pytest.approx(mean, rel=1e-12)


def numpy_unbiased_mmd2(x, y):
    d = x.shape[1]
    k = lambda a, b: (a @ b.T / d + 1) ** 3
    m = x.shape[0]
    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    return (kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (m * (m - 1)) - 2 * kxy.mean()


def test_kid_equals_unbiased_mmd_when_the_subset_is_everything(features):
    real, fake = features
    n = 500
    kid, std = kernel_inception_distance(torch.from_numpy(real[:n]), torch.from_numpy(fake), num_subsets=3, subset_size=n)
    assert kid == pytest.approx(numpy_unbiased_mmd2(fake, real[:n]), rel=1e-9) and std < 1e-9 * abs(kid) + 1e-12
    metric = KernelInceptionDistance(torch.from_numpy(real), num_subsets=20, subset_size=100)
    metric.update(torch.from_numpy(fake), torch.arange(500))
    assert metric.compute()[0] == pytest.approx(kernel_inception_distance(torch.from_numpy(real), torch.from_numpy(fake), 20, 100)[0])


@pytest.mark.parametrize("k", [3, 5])
def test_precision_recall_density_coverage_equal_prdc(features, k):
    from prdc import compute_prdc

    real, fake = features
    ref = compute_prdc(real_features=real, fake_features=fake, nearest_k=k)
    ours = precision_recall_density_coverage(torch.from_numpy(real), torch.from_numpy(fake), k=k, chunk=64)
    for name in ("precision", "recall", "density", "coverage"):
        assert ours[name] == pytest.approx(float(ref[name]), abs=1e-9), name
    # the metric compares equal-size sets: prdc on the same 500 reference rows and 500 samples
    metric = PrecisionRecall(torch.from_numpy(real), pr_k=k, dc_k=k, chunk=100, seed=3)
    metric.update(torch.from_numpy(fake[250:]), torch.arange(250, 500))
    metric.update(torch.from_numpy(fake[:250]), torch.arange(250))
    equal = compute_prdc(real_features=metric.reference_subset(500).numpy(), fake_features=fake, nearest_k=k)
    assert metric.compute() == pytest.approx({name: float(v) for name, v in equal.items()}, abs=1e-9)


def test_density_coverage_take_their_own_k(features):
    """Precision/recall at k = 3 (Kynkaanniemi et al., the ADM evaluator) and density/coverage at
    k = 5 (Naeem et al.) in one metric, each equal to prdc at its own k."""
    from prdc import compute_prdc

    real, fake = features
    real = real[:500]                                            # equal sizes: nothing subsampled
    at3 = compute_prdc(real_features=real, fake_features=fake, nearest_k=3)
    at5 = compute_prdc(real_features=real, fake_features=fake, nearest_k=5)
    metric = PrecisionRecall(torch.from_numpy(real), pr_k=3, dc_k=5, chunk=100)
    metric.update(torch.from_numpy(fake), torch.arange(500))
    got = metric.compute()
    expected = {"precision": at3["precision"], "recall": at3["recall"], "density": at5["density"],
                "coverage": at5["coverage"]}
    assert got == pytest.approx({k: float(v) for k, v in expected.items()}, abs=1e-9)
    assert at3["coverage"] != pytest.approx(at5["coverage"])      # the two k differ in these data


def test_expected_coverage_of_identical_distributions_is_naeem_et_als_value():
    """Naeem et al. 2020: for identical distributions E[coverage] = 1 - (N - 1)...(N - k) /
    ((M + N - 1)...(M + N - k)) -> 1 - 1/2^k for M = N: 0.875 at k = 3, 0.969 at k = 5."""
    rng = np.random.default_rng(3)
    real = torch.from_numpy(rng.normal(size=(2000, 8)))
    fake = torch.from_numpy(rng.normal(size=(2000, 8)))
    for k, expected in ((3, 0.875), (5, 0.96875)):
        assert density_coverage(real, fake, k)["coverage"] == pytest.approx(expected, abs=0.015)


def test_prdc_of_identical_sets_is_perfect(features):
    real, _ = features
    r = precision_recall_density_coverage(torch.from_numpy(real), torch.from_numpy(real.copy()), k=3)
    assert r["precision"] == 1.0 and r["recall"] == 1.0 and r["coverage"] == 1.0


def test_fid_infinity_is_closer_to_the_population_fid_than_fid_at_the_largest_n():
    """Chong & Forsyth 2020: FID is biased by 1/N; extrapolating sub-sample FIDs to 1/N = 0 removes
    it. Generated features from a known Gaussian, reference = the exact population statistics."""
    from metrics.feature_metrics import fid_infinity

    d, n = 64, 500
    rng = np.random.default_rng(0)
    a = rng.normal(size=(d, d)) / np.sqrt(d)
    sigma_g, mu_g = 0.5 * np.eye(d) + a @ a.T, np.full(d, 0.1)
    population = float(mu_g @ mu_g + np.trace(np.eye(d) + sigma_g - 2 * linalg.sqrtm(sigma_g).real))
    ref_mu, ref_sigma = torch.zeros(d, dtype=torch.float64), torch.eye(d, dtype=torch.float64)
    for seed in range(4):
        x = torch.from_numpy(rng.multivariate_normal(mu_g, sigma_g, size=n))
        fid_n = float(frechet_distance(*mean_cov(x), ref_mu, ref_sigma))
        fit = fid_infinity(x, ref_mu, ref_sigma, seed=seed)
        assert abs(fit["fid_inf"] - population) < 0.5 * abs(fid_n - population), (seed, fit["fid_inf"], fid_n, population)
        assert fit["sizes"][0] == n // 2 and fit["sizes"][-1] == n and fit["slope"] > 0   # FID falls as N grows


def test_extrapolation_recovers_an_exact_one_over_n_law():
    from metrics.feature_metrics import extrapolate_to_infinity

    sizes = np.array([100, 150, 200, 300, 400])
    intercept, slope, residual = extrapolate_to_infinity(sizes, 2.5 + 40.0 / sizes)
    assert intercept == pytest.approx(2.5) and slope == pytest.approx(40.0) and residual < 1e-12


class CountingExtractor(torch.nn.Module):
    """8-d features and 4 logits straight from the pixels; counts the images it sees."""
    name, feature_dim, has_logits = "counting", 8, True

    def __init__(self):
        super().__init__()
        self.images = 0

    def forward(self, images):
        self.images += images.shape[0]
        x = images.float().flatten(1)[:, :8] / 255.0
        return {"pool": x, "logits": x[:, :4] * 3}


class UniformNoiseModel(torch.nn.Module):
    """A 'generative model' whose samples are the per-sample streams' uniform noise."""
    image_shape, device, likelihood_kind = (1, 4, 4), torch.device("cpu"), None

    def sampler_kwargs(self, **kw):
        return {}

    def sampling_cost(self, **kw):
        return {"nfe": 1.0}

    def sample(self, n, generator=None, **kw):
        return generator.rand(1, 4, 4)


def _counting_metrics(real, names):
    from metrics.features import FeatureMetrics
    from metrics.reference import ReferenceStats

    ref = torch.from_numpy(real[:300, :8])
    mu, sigma = mean_cov(ref)
    reference = ReferenceStats(mu, sigma, ref.float(), {"dataset": "x", "split": "train", "num_images": 300,
                                                        "extractor": {"extractor": "counting"}})
    return FeatureMetrics(CountingExtractor(), reference, names)


def test_fid_and_is_infinity_come_from_the_one_extractor_pass(features):
    """FID_inf and IS_inf sub-sample the features the evaluation already has: the extractor sees
    each generated image once."""
    from metrics.evaluation import Evaluator

    fm = _counting_metrics(features[0], ["fid", "is"])
    result = Evaluator(num_samples=64, batch_size=16, bpd_num_images=0, grid_size=0).evaluate(
        UniformNoiseModel(), None, {}, [fm])
    assert fm.extractor.images == 64
    assert {"fid_inf", "fid_inf_residual", "is_inf"} <= set(result.metrics)
    assert result.details["extractors"]["counting"]["fid_inf"]["sizes"][0] == 32


def test_repeated_sample_sets_give_a_sampling_interval(features):
    """evaluation.repeats=R: R independent sample sets; the metric is their mean and _ci95 the
    Student-t half-width over them; the first set is the one a single evaluation draws."""
    from scipy import stats

    from metrics.evaluation import Evaluator

    single = Evaluator(num_samples=64, batch_size=16, bpd_num_images=0, grid_size=0).evaluate(
        UniformNoiseModel(), None, {}, [_counting_metrics(features[0], ["fid", "kid"])])
    fm = _counting_metrics(features[0], ["fid", "kid"])
    result = Evaluator(num_samples=64, batch_size=16, bpd_num_images=0, grid_size=4, repeats=3).evaluate(
        UniformNoiseModel(), None, {}, [fm])
    sets = result.details["repeats"]["per_set"]
    fids = [m["fid"] for m in sets]
    assert fm.extractor.images == 3 * 64 and len(set(fids)) == 3            # independent sets
    assert fids[0] == pytest.approx(single.metrics["fid"])
    assert result.metrics["fid"] == pytest.approx(np.mean(fids))
    low, high = stats.t.interval(0.95, 2, loc=np.mean(fids), scale=stats.sem(fids))
    assert result.metrics["fid_ci95"] == pytest.approx((high - low) / 2)
    with pytest.raises(ValueError, match="repeats must be >= 1"):
        Evaluator(repeats=0)


def test_sfid_is_refused_without_spatial_features_or_reference_statistics(features):
    """sFID asked of an extractor without spatial features, or against a reference whose statistics
    lack the spatial ones: refused, naming the fix; "auto" leaves it out instead."""
    from metrics.features import FeatureMetrics, MetricNotAvailableError

    real, _ = features
    with pytest.raises(MetricNotAvailableError, match="no spatial features.*inception_pool"):
        _counting_metrics(real, ["fid", "sfid"])
    no_spatial = _counting_metrics(real, ["fid"]).reference

    class Spatial(CountingExtractor):
        has_spatial = True

    with pytest.raises(MetricNotAvailableError, match="no spatial statistics.*mu_s/sigma_s"):
        FeatureMetrics(Spatial(), no_spatial, ["fid", "sfid"])
    assert FeatureMetrics(Spatial(), no_spatial, "auto").sfid is None
    assert _counting_metrics(real, "auto").sfid is None


def test_precision_recall_compare_real_and_generated_sets_of_equal_size():
    """Kynkaanniemi et al. compare equal numbers of real and generated samples: with 300 reference
    images and 512 samples, the metric scores the first 300 samples (and records the sizes); with
    more reference images than samples, a seeded subset of the reference of the samples' size."""
    from prdc import compute_prdc

    rng = np.random.default_rng(1)
    real, fake = rng.normal(size=(300, 16)), rng.normal(size=(512, 16)) * 1.3
    metric = PrecisionRecall(torch.from_numpy(real), pr_k=3, dc_k=5)
    metric.update(torch.from_numpy(fake), torch.arange(512))
    got = metric.compute()
    at3 = compute_prdc(real_features=real, fake_features=fake[:300], nearest_k=3)
    assert got["precision"] == pytest.approx(float(at3["precision"]), abs=1e-9)
    assert got["recall"] == pytest.approx(float(at3["recall"]), abs=1e-9)
    unequal = compute_prdc(real_features=real, fake_features=fake, nearest_k=3)
    assert got["recall"] != pytest.approx(float(unequal["recall"]), abs=1e-3)     # what the unequal sets gave
    assert metric.compared == {"real": 300, "generated": 512, "compared": 300}
    many_real = PrecisionRecall(torch.from_numpy(fake), pr_k=3, dc_k=5, seed=7)
    many_real.update(torch.from_numpy(real), torch.arange(300))
    subset = many_real.reference_subset(300).numpy()
    assert subset.shape == (300, 16)
    assert many_real.compute()["recall"] == pytest.approx(
        float(compute_prdc(real_features=subset, fake_features=real, nearest_k=3)["recall"]), abs=1e-9)
