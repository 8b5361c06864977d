"""Metrics against closed forms: Fréchet distance of Gaussians, MMD^2 of Gaussians under an RBF kernel,
sliced Wasserstein of shifted samples."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
import torch

from scoresde.metrics import (
    frechet_distance, gaussian_frechet_distance, gaussian_stats, knn_radii, median_bandwidth, mmd2_unbiased, precision_recall,
    sliced_wasserstein,
)

F64 = torch.float64


def _random_cov(D, seed):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(D, D, generator=g, dtype=F64)
    return A @ A.T / D + 0.1 * torch.eye(D, dtype=F64)


def test_gaussian_frechet_closed_forms():
    # 1-D: (mu1 - mu2)^2 + (s1 - s2)^2
    d = gaussian_frechet_distance(torch.tensor([1.0]), torch.tensor([[4.0]]), torch.tensor([-0.5]), torch.tensor([[0.25]]))
    assert d == pytest.approx(1.5**2 + (2.0 - 0.5) ** 2, rel=1e-12)
    # commuting (diagonal) covariances: |dmu|^2 + sum (sqrt(a) - sqrt(b))^2
    a, b = torch.tensor([1.0, 2.0, 9.0], dtype=F64), torch.tensor([4.0, 0.5, 1.0], dtype=F64)
    mu = torch.tensor([0.3, -1.0, 2.0], dtype=F64)
    d = gaussian_frechet_distance(mu, torch.diag(a), torch.zeros(3, dtype=F64), torch.diag(b))
    assert d == pytest.approx(float((mu**2).sum() + ((a.sqrt() - b.sqrt()) ** 2).sum()), rel=1e-12)
    # general covariances: scipy's sqrtm of C1 C2 (FID's formula)
    c1, c2 = _random_cov(6, 0), _random_cov(6, 1)
    m1, m2 = torch.randn(6, dtype=F64), torch.randn(6, dtype=F64)
    ref = float(((m1 - m2) ** 2).sum() + np.trace(c1.numpy() + c2.numpy() - 2 * scipy.linalg.sqrtm(c1.numpy() @ c2.numpy()).real))
    assert gaussian_frechet_distance(m1, c1, m2, c2) == pytest.approx(ref, rel=1e-9)
    # identical -> 0; symmetric
    assert abs(gaussian_frechet_distance(m1, c1, m1, c1)) < 1e-10
    assert gaussian_frechet_distance(m1, c1, m2, c2) == pytest.approx(gaussian_frechet_distance(m2, c2, m1, c1), rel=1e-9)


def test_frechet_distance_of_samples():
    """Samples of N(0, I) and N(mu, 4 I) in D = 3: closed form |mu|^2 + D (2 - 1)^2; tolerance from n."""
    g = torch.Generator().manual_seed(0)
    n, D = 20000, 3
    mu = torch.tensor([1.0, -2.0, 0.5], dtype=F64)
    x = torch.randn(n, D, generator=g, dtype=F64)
    y = mu + 2.0 * torch.randn(n, D, generator=g, dtype=F64)
    exact = float((mu**2).sum()) + D * 1.0
    # estimation error of means/covariances is O(1/sqrt(n)) relative
    assert frechet_distance(x, y) == pytest.approx(exact, abs=10 * (exact + D) / math.sqrt(n))
    assert frechet_distance(x, x) == pytest.approx(0.0, abs=1e-8)


def _gauss_mmd2(D, s, delta2, h):
    """Population MMD^2 between N(mu1, s^2 I) and N(mu2, s^2 I), |mu1 - mu2|^2 = delta2, RBF bandwidth h."""
    c = (h * h / (h * h + 2 * s * s)) ** (D / 2)
    return 2 * c * (1 - math.exp(-delta2 / (2 * (h * h + 2 * s * s))))


def test_mmd2_unbiased_matches_closed_form_and_is_unbiased():
    D, s, n, R = 3, 1.0, 200, 60
    mu = torch.tensor([0.5, 0.0, 0.0], dtype=F64)
    hs = [0.5, 1.0, 2.0]
    g = torch.Generator().manual_seed(1)
    same, diff = [], []
    for _ in range(R):
        x = torch.randn(n, D, generator=g, dtype=F64)
        y = torch.randn(n, D, generator=g, dtype=F64)
        same.append(float(mmd2_unbiased(x, y, hs)))
        diff.append(float(mmd2_unbiased(x, y + mu, hs)))
    same, diff = np.array(same), np.array(diff)
    se_same, se_diff = same.std(ddof=1) / math.sqrt(R), diff.std(ddof=1) / math.sqrt(R)
    assert abs(same.mean()) < 4 * se_same  # unbiased: mean 0 for equal distributions
    assert (same < 0).any()  # an unbiased estimate of 0 must take negative values
    exact = sum(_gauss_mmd2(D, s, 0.25, h) for h in hs)
    assert abs(diff.mean() - exact) < 4 * se_diff
    assert diff.mean() > 10 * se_same


def test_mmd2_exact_small_case():
    """Hand-computed U-statistic for 2 + 2 points in 1-D with one bandwidth."""
    x, y = torch.tensor([[0.0], [1.0]], dtype=F64), torch.tensor([[0.0], [2.0]], dtype=F64)
    k = lambda a, b: math.exp(-((a - b) ** 2) / 2)
    exact = k(0, 1) + k(0, 2) - 0.5 * (k(0, 0) + k(0, 2) + k(1, 0) + k(1, 2))
    assert float(mmd2_unbiased(x, y, 1.0)) == pytest.approx(exact, rel=1e-12)
    # default bandwidths: median heuristic of the pooled sample
    assert median_bandwidth(x, y) == pytest.approx(1.0)


def test_sliced_wasserstein_shift_is_exact():
    """y = x + mu: every 1-D projection is shifted by theta.mu, so SW_2^2 = mean_theta (theta.mu)^2 exactly,
    which tends to |mu|^2 / D."""
    g = torch.Generator().manual_seed(0)
    D, P = 4, 4000
    x = torch.randn(300, D, generator=g, dtype=F64)
    mu = torch.tensor([1.0, -1.0, 2.0, 0.0], dtype=F64)
    sw = float(sliced_wasserstein(x, x + mu, n_projections=P, generator=torch.Generator().manual_seed(5)))
    th = torch.randn(D, P, generator=torch.Generator().manual_seed(5), dtype=F64)
    th = th / th.norm(dim=0, keepdim=True)
    assert sw**2 == pytest.approx(float((mu @ th).pow(2).mean()), rel=1e-10)
    # Monte Carlo over directions: E (theta.mu)^2 = |mu|^2 / D, Var = O(|mu|^4 / D^2) -> tolerance 5 / sqrt(P)
    assert sw**2 == pytest.approx(float(mu.pow(2).sum()) / D, rel=5 / math.sqrt(P))
    # unequal sizes: a sample against itself duplicated has distance 0; identical sets -> 0
    assert float(sliced_wasserstein(x, torch.cat([x, x]), 16, torch.Generator().manual_seed(1))) == pytest.approx(0.0, abs=1e-12)
    assert float(sliced_wasserstein(x, x, 16, torch.Generator().manual_seed(1))) == 0.0


def test_sliced_wasserstein_1d_exact_unequal_sizes():
    """In 1-D the projection is +-1. Quantile functions of {0, 1} and {0, 1, 2} differ by 1 on (1/3, 1/2] and
    (2/3, 1] and by 0 elsewhere, so W_1 = W_2^2 = 1/6 + 1/3 = 1/2 (and the same for the reflected projection)."""
    x, y = torch.tensor([[0.0], [1.0]], dtype=F64), torch.tensor([[0.0], [1.0], [2.0]], dtype=F64)
    assert float(sliced_wasserstein(x, y, 4, torch.Generator().manual_seed(0), p=1)) == pytest.approx(0.5, rel=1e-12)
    assert float(sliced_wasserstein(x, y, 4, torch.Generator().manual_seed(0), p=2)) ** 2 == pytest.approx(0.5, rel=1e-12)


def test_metrics_validate_inputs():
    x = torch.zeros(5, 3)
    with pytest.raises(ValueError, match="features"):
        mmd2_unbiased(x, torch.zeros(5, 4))
    with pytest.raises(ValueError, match="bandwidths"):
        mmd2_unbiased(x, x, [-1.0])
    with pytest.raises(ValueError, match="at least 2"):
        mmd2_unbiased(x[:1], x)
    with pytest.raises(ValueError, match="n_projections"):
        sliced_wasserstein(x, x, 0)
    with pytest.raises(ValueError, match="at least 2"):
        frechet_distance(x[:1], x)
    with pytest.raises(TypeError):
        mmd2_unbiased(np.zeros((5, 3)), x)


def test_precision_recall_hand_computed_1d():
    # k = 1 radii of real [0, 1, 3, 7]: 1, 1, 2, 4 -> M(real) = [-1, 11]; fake [0.5, 12, -2, 10] -> precision 2/4.
    # radii of fake: 2.5, 2, 2.5, 2 -> M(fake) = [-4.5, 3] U [8, 14] holds 0, 1, 3 but not 7 -> recall 3/4.
    real = torch.tensor([[0.0], [1.0], [3.0], [7.0]])
    fake = torch.tensor([[0.5], [12.0], [-2.0], [10.0]])
    pr = precision_recall(real, fake, k=1)
    assert pr == {"precision": 0.5, "recall": 0.75, "k": 1}
    assert knn_radii(real.double(), 1).tolist() == [1.0, 1.0, 2.0, 4.0]


def test_precision_recall_identity_shift_and_mode_dropping():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(200, 5, generator=g)
    b = torch.randn(200, 5, generator=g) + 100.0
    real = torch.cat([a, b])
    assert precision_recall(real, real) == {"precision": 1.0, "recall": 1.0, "k": 3}
    far = precision_recall(real, real + 1000.0)
    assert far["precision"] == 0.0 and far["recall"] == 0.0
    # a model that draws only one of two equally likely modes: every sample realistic, half the data covered
    dropped = precision_recall(real, a.clone())
    assert dropped["precision"] == 1.0 and dropped["recall"] == 0.5
    # permuting either set changes nothing
    perm = torch.randperm(400, generator=g)
    assert precision_recall(real[perm], a.flip(0)) == dropped


def test_precision_recall_validates():
    with pytest.raises(ValueError, match="more than k"):
        precision_recall(torch.zeros(3, 2), torch.zeros(10, 2), k=3)
    with pytest.raises(ValueError, match="k must be"):
        precision_recall(torch.zeros(10, 2), torch.zeros(10, 2), k=0)
    with pytest.raises(ValueError, match="same number of features"):
        precision_recall(torch.zeros(10, 2), torch.zeros(10, 3))


def test_gaussian_stats_reproduce_frechet_distance():
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(50, 4, generator=g), torch.randn(60, 4, generator=g) * 2 + 1
    mu1, s1 = gaussian_stats(x)
    mu2, s2 = gaussian_stats(y)
    assert mu1.shape == (4,) and s1.shape == (4, 4)
    assert gaussian_frechet_distance(mu1, s1, mu2, s2) == pytest.approx(frechet_distance(x, y), rel=1e-12)
