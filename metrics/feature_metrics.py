"""Feature-space metrics as torchmetrics Metrics over GENERATED features, scored against fixed
reference (real) statistics/features. States sync across processes on ``compute()``.

List states carry each feature's global sample index, and ``compute`` sorts by it, so results do
not depend on how samples were split across processes or batches.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat


# ----------------------------------------------------------------------------- functional forms

def mean_cov(features: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and unbiased covariance (N-1), float64."""
    x = features.double()
    mu = x.mean(0)
    xc = x - mu
    return mu, xc.T @ xc / (x.shape[0] - 1)


def mean_and_covariance(sum_x: Tensor, sum_xx: Tensor, n) -> tuple[Tensor, Tensor]:
    """float64 mean and unbiased covariance from running sums (sum x, sum x x^T) of n vectors."""
    mu = sum_x / n
    return mu, (sum_xx - n * torch.outer(mu, mu)) / (n - 1)


def frechet_distance(mu1: Tensor, sigma1: Tensor, mu2: Tensor, sigma2: Tensor) -> Tensor:
    """FID (Heusel et al. 2017): ||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^{1/2}).

    tr((S1 S2)^{1/2}) = sum_i sqrt(lambda_i) with lambda_i the eigenvalues of S1 S2, which equal
    those of the symmetric PSD matrix B^T S2 B for any factor S1 = B B^T: B = the Cholesky factor
    when S1 is positive definite (cheap), else S1^{1/2} from a symmetric eigendecomposition
    (rank-deficient S1, fewer samples than dimensions). One symmetric eigenvalue problem, values
    clamped at 0, so the result is always real (no complex sqrtm, no negative FID from
    round-off). float64 throughout.
    """
    mu1, mu2, sigma1, sigma2 = mu1.double(), mu2.double(), sigma1.double(), sigma2.double()
    factor, info = torch.linalg.cholesky_ex(sigma1)
    if int(info) != 0:
        evals1, evecs1 = torch.linalg.eigh(sigma1)
        factor = (evecs1 * evals1.clamp(min=0).sqrt()) @ evecs1.T
    inner = factor.T @ sigma2 @ factor
    evals = torch.linalg.eigvalsh((inner + inner.T) / 2)
    tr_covmean = evals.clamp(min=0).sqrt().sum()
    fid = (mu1 - mu2).square().sum() + torch.trace(sigma1) + torch.trace(sigma2) - 2 * tr_covmean
    return fid.clamp(min=0)


def inception_score(logits: Tensor, splits: int = 10) -> tuple[float, float]:
    """Salimans et al. 2016: exp(E_x KL(p(y|x) || p(y))), over ``splits`` consecutive chunks; mean, std."""
    log_p = torch.log_softmax(logits.double(), dim=1)
    scores = []
    for part in torch.tensor_split(log_p, splits):
        p = part.exp()
        log_py = torch.log(p.mean(0, keepdim=True))
        scores.append(torch.exp((p * (part - log_py)).sum(1).mean()))
    s = torch.stack(scores)
    return float(s.mean()), float(s.std(unbiased=False))


def _poly_kernel(x: Tensor, y: Tensor) -> Tensor:
    return (x @ y.T / x.shape[1] + 1.0) ** 3


def kernel_inception_distance(real: Tensor, fake: Tensor, num_subsets: int = 100, subset_size: int = 1000,
                              seed: int = 0) -> tuple[float, float]:
    """Binkowski et al. 2018: unbiased MMD^2 with k(x, y) = (x.y / d + 1)^3, averaged over random
    subsets (subset size clipped to the smaller set); mean and std over subsets."""
    m = min(subset_size, real.shape[0], fake.shape[0])
    if m < 2:
        raise ValueError("KID needs at least 2 real and 2 generated samples")
    gen = np.random.default_rng(seed)
    real, fake = real.double(), fake.double()
    values = []
    for _ in range(num_subsets):
        x = fake[torch.from_numpy(gen.choice(fake.shape[0], m, replace=False))]
        y = real[torch.from_numpy(gen.choice(real.shape[0], m, replace=False))]
        kxx, kyy, kxy = _poly_kernel(x, x), _poly_kernel(y, y), _poly_kernel(x, y)
        mmd = ((kxx.sum() - kxx.diagonal().sum()) + (kyy.sum() - kyy.diagonal().sum())) / (m * (m - 1)) \
            - 2 * kxy.mean()
        values.append(mmd)
    v = torch.stack(values)
    return float(v.mean()), float(v.std(unbiased=False))


def _pairwise_chunks(a: Tensor, b: Tensor, chunk: int):
    """Yields (start, distances of a[start:start+chunk] to all of b): (chunk, len(b)); never len(a) x len(b)."""
    for start in range(0, a.shape[0], chunk):
        yield start, torch.cdist(a[start:start + chunk], b)


def kth_neighbour_radii(x: Tensor, k: int, chunk: int = 1024) -> Tensor:
    """Distance of each row of x to its k-th nearest other row (the row itself excluded)."""
    if x.shape[0] <= k:
        raise ValueError(f"need more than k={k} samples for k-NN radii, got {x.shape[0]}")
    radii = torch.empty(x.shape[0], dtype=x.dtype, device=x.device)
    for start, d in _pairwise_chunks(x, x, chunk):
        radii[start:start + d.shape[0]] = d.topk(k + 1, dim=1, largest=False).values[:, -1]
    return radii


def precision_recall(real: Tensor, fake: Tensor, k: int = 3, chunk: int = 1024,
                     real_radii: Tensor | None = None) -> dict[str, float]:
    """Improved precision/recall (Kynkaanniemi et al. 2019) with k-NN balls, in row chunks
    (memory O(chunk * N)): precision = fraction of fake samples inside some real ball; recall =
    fraction of real samples inside some fake ball. Strict inequalities, as in the prdc package."""
    real, fake = real.double(), fake.double()
    real_radii = kth_neighbour_radii(real, k, chunk) if real_radii is None else real_radii.double()
    fake_radii = kth_neighbour_radii(fake, k, chunk)
    in_real_ball = torch.zeros(fake.shape[0], dtype=torch.bool, device=fake.device)
    for start, d in _pairwise_chunks(fake, real, chunk):                     # (chunk, N_real)
        in_real_ball[start:start + d.shape[0]] = (d < real_radii[None, :]).any(1)
    recalled = torch.zeros(real.shape[0], dtype=torch.bool, device=real.device)
    for start, d in _pairwise_chunks(real, fake, chunk):                     # (chunk, N_fake)
        recalled[start:start + d.shape[0]] = (d < fake_radii[None, :]).any(1)
    return {"precision": float(in_real_ball.double().mean()), "recall": float(recalled.double().mean())}


def density_coverage(real: Tensor, fake: Tensor, k: int = 5, chunk: int = 1024,
                     real_radii: Tensor | None = None) -> dict[str, float]:
    """Density and coverage (Naeem et al. 2020; their default k = 5): density = (1 / kM)
    sum over fake samples of the number of real k-NN balls holding it; coverage = fraction of real
    balls holding at least one fake sample."""
    real, fake = real.double(), fake.double()
    real_radii = kth_neighbour_radii(real, k, chunk) if real_radii is None else real_radii.double()
    ball_counts = torch.zeros(fake.shape[0], dtype=torch.float64, device=fake.device)
    for start, d in _pairwise_chunks(fake, real, chunk):                     # (chunk, N_real)
        ball_counts[start:start + d.shape[0]] = (d < real_radii[None, :]).sum(1).double()
    covered = torch.zeros(real.shape[0], dtype=torch.bool, device=real.device)
    for start, d in _pairwise_chunks(real, fake, chunk):                     # (chunk, N_fake)
        covered[start:start + d.shape[0]] = d.min(1).values < real_radii[start:start + d.shape[0]]
    return {"density": float(ball_counts.sum() / (k * fake.shape[0])), "coverage": float(covered.double().mean())}


def precision_recall_density_coverage(real: Tensor, fake: Tensor, k: int = 3, chunk: int = 1024,
                                      dc_k: int | None = None) -> dict[str, float]:
    """Both pairs: precision/recall with ``k``, density/coverage with ``dc_k`` (default ``k``)."""
    return {**precision_recall(real, fake, k, chunk), **density_coverage(real, fake, dc_k or k, chunk)}


def extrapolate_to_infinity(sizes: np.ndarray, values: np.ndarray) -> tuple[float, float, float]:
    """Least-squares fit value(N) = a + b / N (Chong & Forsyth 2020): (a, b, RMS residual). The
    intercept a is the value an infinite sample would give."""
    design = np.stack([np.ones_like(sizes, dtype=np.float64), 1.0 / np.asarray(sizes, dtype=np.float64)], 1)
    coef, *_ = np.linalg.lstsq(design, np.asarray(values, dtype=np.float64), rcond=None)
    residual = float(np.sqrt(np.mean((design @ coef - values) ** 2)))
    return float(coef[0]), float(coef[1]), residual


def subsample_sizes(n: int, num_points: int = 15, min_fraction: float = 0.5) -> np.ndarray:
    """``num_points`` sub-sample sizes evenly spaced from ``min_fraction * n`` to ``n``."""
    return np.unique(np.linspace(math.ceil(n * min_fraction), n, num_points).round().astype(int))


def fid_infinity(features: Tensor, ref_mu: Tensor, ref_sigma: Tensor, num_points: int = 15,
                 min_fraction: float = 0.5, seed: int = 0) -> dict:
    """FID_inf (Chong & Forsyth 2020, Sec. 3): FID of sub-samples of the generated features drawn
    without replacement (duplicates would inflate FID) at ``num_points`` sizes, fitted linearly
    in 1/N, extrapolated to 1/N = 0. No extra network pass: the features are already there."""
    gen = np.random.default_rng(seed)
    sizes = subsample_sizes(features.shape[0], num_points, min_fraction)
    values = []
    for m in sizes:
        idx = torch.from_numpy(np.sort(gen.choice(features.shape[0], m, replace=False)))
        mu, sigma = mean_cov(features[idx])
        values.append(float(frechet_distance(mu, sigma, ref_mu, ref_sigma)))
    intercept, slope, residual = extrapolate_to_infinity(sizes, np.array(values))
    return {"fid_inf": intercept, "slope": slope, "residual": residual, "sizes": sizes.tolist(), "values": values}


def is_infinity(logits: Tensor, num_points: int = 15, min_fraction: float = 0.5, seed: int = 0) -> dict:
    """IS_inf (Chong & Forsyth 2020): IS of sub-samples (one split each) extrapolated to 1/N = 0."""
    gen = np.random.default_rng(seed)
    sizes = subsample_sizes(logits.shape[0], num_points, min_fraction)
    values = [inception_score(logits[torch.from_numpy(gen.choice(logits.shape[0], m, replace=False))], splits=1)[0]
              for m in sizes]
    intercept, slope, residual = extrapolate_to_infinity(sizes, np.array(values))
    return {"is_inf": intercept, "slope": slope, "residual": residual, "sizes": sizes.tolist(), "values": values}


# ----------------------------------------------------------------------------- Metrics

class GeneratedFeatures(Metric):
    """Base: collects generated features (and, optionally, logits) with their global indices."""

    full_state_update = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("features", default=[], dist_reduce_fx="cat")
        self.add_state("indices", default=[], dist_reduce_fx="cat")

    def update(self, features: Tensor, indices: Tensor) -> None:
        self.features.append(features.double())
        self.indices.append(indices.long().to(features.device))

    def ordered(self) -> Tensor:
        feats, idx = dim_zero_cat(self.features), dim_zero_cat(self.indices)
        return feats[idx.argsort()]

    def compute(self) -> Tensor:
        return self.ordered()


class ClassAccuracy(Metric):
    """Accuracy of the dataset classifier on generated samples against their intended labels
    (``class_acc``; the "classification accuracy score" idea of Ravuri & Vinyals 2019, here with
    a classifier trained on real data scoring the samples)."""

    full_state_update = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("correct", default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("total", default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, logits: Tensor, labels: Tensor) -> None:
        self.correct += (logits.argmax(1) == labels.to(logits.device)).sum()
        self.total += labels.numel()

    def compute(self) -> Tensor:
        return self.correct / self.total.clamp(min=1)


def intra_fid(gen_features: Tensor, gen_labels: Tensor, ref_features: Tensor, ref_labels: Tensor,
              num_classes: int) -> dict[str, Any]:
    """Intra-FID (Miyato & Koyama 2018, Sec. 5): the FID of each class's samples against that class's
    real images, averaged over classes (classes with fewer than 2 samples on either side are skipped
    and listed)."""
    per_class, skipped = {}, []
    for c in range(num_classes):
        g, r = gen_features[gen_labels == c], ref_features[ref_labels == c]
        if g.shape[0] < 2 or r.shape[0] < 2:
            skipped.append(c)
            continue
        per_class[c] = float(frechet_distance(*mean_cov(g), *mean_cov(r)))
    if not per_class:
        raise ValueError("intra-FID: no class has 2 generated and 2 real samples")
    return {"intra_fid": float(np.mean(list(per_class.values()))), "per_class": per_class, "skipped": skipped}


class FrechetDistance(Metric):
    """FID of generated features against fixed reference mean/covariance. States: float64 sums of
    x and x x^T and the count (fixed size: DDP sync cost does not grow with N)."""

    full_state_update = False

    def __init__(self, ref_mu: Tensor, ref_sigma: Tensor, **kwargs):
        super().__init__(**kwargs)
        d = ref_mu.shape[0]
        self.register_buffer("ref_mu", ref_mu.double(), persistent=False)
        self.register_buffer("ref_sigma", ref_sigma.double(), persistent=False)
        self.add_state("sum", default=torch.zeros(d, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("outer", default=torch.zeros(d, d, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("n", default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, features: Tensor) -> None:
        x = features.double()
        self.sum += x.sum(0)
        self.outer += x.T @ x
        self.n += x.shape[0]

    def compute(self) -> Tensor:
        if self.n < 2:
            raise ValueError("FID needs at least 2 generated samples")
        return frechet_distance(*mean_and_covariance(self.sum, self.outer, self.n), self.ref_mu, self.ref_sigma)


class InceptionScore(GeneratedFeatures):
    def __init__(self, splits: int = 10, **kwargs):
        super().__init__(**kwargs)
        self.splits = splits

    def compute(self) -> tuple[float, float]:
        return inception_score(self.ordered(), self.splits)


class KernelInceptionDistance(GeneratedFeatures):
    def __init__(self, ref_features: Tensor, num_subsets: int = 100, subset_size: int = 1000, seed: int = 0, **kwargs):
        super().__init__(**kwargs)
        self.register_buffer("ref_features", ref_features.double(), persistent=False)
        self.num_subsets, self.subset_size, self.seed = num_subsets, subset_size, seed

    def compute(self) -> tuple[float, float]:
        return kernel_inception_distance(self.ref_features, self.ordered(), self.num_subsets, self.subset_size, self.seed)


class PrecisionRecall(GeneratedFeatures):
    """Improved precision/recall (k = ``pr_k``) and density/coverage (k = ``dc_k``) against fixed
    reference features, on real and generated sets of equal size as Kynkaanniemi et al. 2019
    compare them (the k-NN radii, and so recall, depend on the set sizes): the larger set is
    subsampled to the smaller one's size, the reference by a permutation seeded by ``seed``, the
    generated set by its first samples (independent draws in sample order). ``compared`` records the
    sizes after each compute. The reference k-NN radii are computed once per (k, size)."""

    def __init__(self, ref_features: Tensor, pr_k: int = 3, dc_k: int = 5, chunk: int = 1024, seed: int = 0,
                 **kwargs):
        super().__init__(**kwargs)
        self.register_buffer("ref_features", ref_features.double(), persistent=False)
        self.pr_k, self.dc_k, self.chunk, self.seed = pr_k, dc_k, chunk, seed
        self._ref_radii: dict[tuple[int, int], Tensor] = {}
        self.compared: dict[str, int] = {}

    def reference_subset(self, n: int) -> Tensor:
        """``n`` reference rows: all of them, or a seeded random subset kept in reference order."""
        total = self.ref_features.shape[0]
        if n >= total:
            return self.ref_features
        keep = torch.randperm(total, generator=torch.Generator().manual_seed(self.seed))[:n].sort().values
        return self.ref_features[keep.to(self.ref_features.device)]

    def ref_radii(self, k: int, n: int | None = None) -> Tensor:
        n = self.ref_features.shape[0] if n is None else min(n, self.ref_features.shape[0])
        if (k, n) not in self._ref_radii:
            self._ref_radii[(k, n)] = kth_neighbour_radii(self.reference_subset(n), k, self.chunk)
        return self._ref_radii[(k, n)].to(self.ref_features)

    def compute(self) -> dict[str, float]:
        fake = self.ordered()
        n = min(fake.shape[0], self.ref_features.shape[0])
        real, fake_n = self.reference_subset(n), fake[:n]
        self.compared = {"real": int(self.ref_features.shape[0]), "generated": int(fake.shape[0]), "compared": n}
        return {**precision_recall(real, fake_n, self.pr_k, self.chunk, self.ref_radii(self.pr_k, n)),
                **density_coverage(real, fake_n, self.dc_k, self.chunk, self.ref_radii(self.dc_k, n))}


def small_sample_warning(n: int, dim: int) -> str | None:
    if n < dim:
        return (f"FID from {n} samples < feature dimension {dim}: the covariance is rank deficient and FID "
                f"is biased upwards; compare only FIDs with the same N")
    return None


__all__ = ["ClassAccuracy", "intra_fid", "frechet_distance", "inception_score", "kernel_inception_distance", "precision_recall", "density_coverage",
           "precision_recall_density_coverage", "fid_infinity", "is_infinity", "extrapolate_to_infinity",
           "FrechetDistance", "InceptionScore", "KernelInceptionDistance", "PrecisionRecall", "mean_cov",
           "small_sample_warning"]
