"""Feature-space metrics against independent references: scipy, torchmetrics, prdc, numpy formulas."""
import numpy as np
import pytest
import torch
from scipy import linalg

from metrics.feature_metrics import (FrechetDistance, InceptionScore, KernelInceptionDistance, PrecisionRecall,
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
    metric = PrecisionRecall(torch.from_numpy(real), k=k, chunk=100)
    metric.update(torch.from_numpy(fake[250:]), torch.arange(250, 500))
    metric.update(torch.from_numpy(fake[:250]), torch.arange(250))
    assert metric.compute() == pytest.approx(ours)


def test_prdc_of_identical_sets_is_perfect(features):
    real, _ = features
    r = precision_recall_density_coverage(torch.from_numpy(real), torch.from_numpy(real.copy()), k=3)
    assert r["precision"] == 1.0 and r["recall"] == 1.0 and r["coverage"] == 1.0
