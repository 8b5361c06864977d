"""Two-sample distances between sample sets: MMD, sliced Wasserstein, Fréchet distance, k-NN precision / recall.

All functions take samples as ``(n, *dims)`` tensors (flattened to ``(n, D)`` inside) and compute in
the inputs' dtype and device. Features for image metrics are pluggable: pass any feature matrix to
``frechet_distance`` (e.g. Inception pool features, or the raw pixels of small images).
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

__all__ = ["mmd2_unbiased", "median_bandwidth", "sliced_wasserstein", "frechet_distance", "gaussian_frechet_distance",
           "gaussian_stats", "knn_radii", "precision_recall"]

DEFAULT_BANDWIDTH_SCALES = (0.25, 0.5, 1.0, 2.0, 4.0)


def _flat_pair(x: torch.Tensor, y: torch.Tensor, name_x: str = "x", name_y: str = "y"):
    if not (torch.is_tensor(x) and torch.is_tensor(y)):
        raise TypeError(f"{name_x} and {name_y} must be tensors; got {type(x).__name__}, {type(y).__name__}")
    if x.dim() < 1 or y.dim() < 1:
        raise ValueError(f"{name_x} and {name_y} must have shape (n, *dims); got {tuple(x.shape)}, {tuple(y.shape)}")
    xf = x.reshape(x.shape[0], -1)
    yf = y.reshape(y.shape[0], -1).to(dtype=xf.dtype, device=xf.device)
    if xf.shape[1] != yf.shape[1]:
        raise ValueError(f"{name_x} and {name_y} must have the same number of features; got {xf.shape[1]} and {yf.shape[1]}")
    return xf, yf


def median_bandwidth(x: torch.Tensor, y: torch.Tensor, max_points: int = 2000) -> float:
    """Median heuristic: the median pairwise Euclidean distance in the pooled sample ``[x; y]``.

    Uses the first ``max_points`` rows of the pooled sample (deterministic). Returns a float > 0.
    """
    xf, yf = _flat_pair(x, y)
    z = torch.cat([xf, yf])[:max_points]
    d = torch.cdist(z, z)
    iu = torch.triu_indices(len(z), len(z), offset=1, device=z.device)
    med = float(d[iu[0], iu[1]].median())
    return med if med > 0 else 1.0


def mmd2_unbiased(x: torch.Tensor, y: torch.Tensor, bandwidths: Sequence[float] | float | None = None) -> torch.Tensor:
    """Unbiased estimate (U-statistic) of the squared maximum mean discrepancy with a sum of RBF kernels.

    ``k(a, b) = sum_j exp(-|a - b|^2 / (2 h_j^2))`` and (Gretton et al. 2012, eq. 3)::

        MMD^2_u = 1/(n(n-1)) sum_{i != i'} k(x_i, x_i') + 1/(m(m-1)) sum_{j != j'} k(y_j, y_j')
                  - 2/(n m) sum_{i, j} k(x_i, y_j)

    Args:
        x: ``(n, *dims)`` samples, ``n >= 2``.
        y: ``(m, *dims)`` samples, ``m >= 2``, same ``dims``.
        bandwidths: the ``h_j``; default ``median * (0.25, 0.5, 1, 2, 4)`` with ``median`` the median
            heuristic of the pooled sample (``median_bandwidth``).

    Returns:
        0-d tensor. Its expectation is 0 exactly when the two distributions are equal (it can be negative).
    """
    xf, yf = _flat_pair(x, y)
    n, m = xf.shape[0], yf.shape[0]
    if n < 2 or m < 2:
        raise ValueError(f"mmd2_unbiased needs at least 2 samples in each set; got n={n}, m={m}")
    if bandwidths is None:
        med = median_bandwidth(xf, yf)
        bandwidths = [med * c for c in DEFAULT_BANDWIDTH_SCALES]
    elif isinstance(bandwidths, (int, float)):
        bandwidths = [float(bandwidths)]
    bandwidths = [float(h) for h in bandwidths]
    if not bandwidths or any(not (math.isfinite(h) and h > 0) for h in bandwidths):
        raise ValueError(f"bandwidths must be a non-empty list of finite numbers > 0; got {bandwidths}")

    def kernel(a, b):
        d2 = torch.cdist(a, b).pow(2)
        return sum(torch.exp(-d2 / (2 * h * h)) for h in bandwidths)

    kxx, kyy, kxy = kernel(xf, xf), kernel(yf, yf), kernel(xf, yf)
    sxx = (kxx.sum() - kxx.diagonal().sum()) / (n * (n - 1))
    syy = (kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1))
    return sxx + syy - 2 * kxy.mean()


def sliced_wasserstein(x: torch.Tensor, y: torch.Tensor, n_projections: int = 128, generator: torch.Generator | None = None, p: int = 2) -> torch.Tensor:
    """Monte-Carlo sliced ``p``-Wasserstein distance ``SW_p(x, y) = (E_theta W_p^p(theta.x, theta.y))^(1/p)``.

    ``theta`` are ``n_projections`` directions drawn uniformly on the unit sphere from ``generator``.
    Each 1-D ``W_p^p`` between empirical measures is computed exactly from quantile functions
    (sorted values; with ``n != m`` both are evaluated on the merged grid of quantile levels).

    Args:
        x: ``(n, *dims)``; y: ``(m, *dims)``.
    Returns:
        0-d tensor ``>= 0``.
    """
    if isinstance(n_projections, bool) or not isinstance(n_projections, int) or n_projections < 1:
        raise ValueError(f"n_projections must be an integer >= 1; got {n_projections!r}")
    if p not in (1, 2):
        raise ValueError(f"p must be 1 or 2; got {p!r}")
    xf, yf = _flat_pair(x, y)
    D = xf.shape[1]
    theta = torch.randn(D, n_projections, generator=generator, device=generator.device if generator is not None else xf.device, dtype=xf.dtype).to(xf.device)
    theta = theta / theta.norm(dim=0, keepdim=True)
    px, _ = torch.sort(xf @ theta, dim=0)  # (n, P)
    py, _ = torch.sort(yf @ theta, dim=0)  # (m, P)
    n, m = px.shape[0], py.shape[0]
    if n == m:
        wpp = (px - py).abs().pow(p).mean(0)
    else:
        # quantile levels: merged breakpoints of both empirical CDFs
        levels = torch.unique(torch.cat([torch.arange(1, n + 1, device=xf.device, dtype=xf.dtype) / n,
                                         torch.arange(1, m + 1, device=xf.device, dtype=xf.dtype) / m]))
        widths = torch.diff(levels, prepend=levels.new_zeros(1))
        ix = torch.clamp(torch.ceil(levels * n - 1e-9).long() - 1, 0, n - 1)
        iy = torch.clamp(torch.ceil(levels * m - 1e-9).long() - 1, 0, m - 1)
        wpp = ((px[ix] - py[iy]).abs().pow(p) * widths[:, None]).sum(0)
    return wpp.mean().pow(1.0 / p)


def gaussian_frechet_distance(mu1, cov1, mu2, cov2) -> float:
    """Fréchet (2-Wasserstein squared) distance between ``N(mu1, cov1)`` and ``N(mu2, cov2)``::

        d^2 = |mu1 - mu2|^2 + tr(cov1 + cov2 - 2 (cov1^(1/2) cov2 cov1^(1/2))^(1/2))

    Computed in float64 with symmetric eigen-decompositions (the inner matrix is symmetric PSD), so
    it is real and stable also for singular covariances. Shapes: ``mu (D,)``, ``cov (D, D)``. Returns a float.
    """
    mu1, mu2 = (np.asarray(torch.as_tensor(v).detach().cpu(), dtype=np.float64) for v in (mu1, mu2))
    c1, c2 = (np.asarray(torch.as_tensor(v).detach().cpu(), dtype=np.float64) for v in (cov1, cov2))
    if mu1.shape != mu2.shape or c1.shape != c2.shape or c1.shape != (mu1.shape[0], mu1.shape[0]):
        raise ValueError(f"means must be (D,) and covariances (D, D) with equal D; got {mu1.shape}, {c1.shape}, {mu2.shape}, {c2.shape}")

    def psd_sqrt(a):
        w, v = np.linalg.eigh(0.5 * (a + a.T))
        return (v * np.sqrt(np.clip(w, 0, None))) @ v.T

    s1 = psd_sqrt(c1)
    inner = s1 @ c2 @ s1
    w = np.linalg.eigvalsh(0.5 * (inner + inner.T))
    tr_sqrt = np.sqrt(np.clip(w, 0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(c1) + np.trace(c2) - 2 * tr_sqrt)


def frechet_distance(feats_x: torch.Tensor, feats_y: torch.Tensor) -> float:
    """Fréchet distance (FID's formula) between Gaussians fitted to two feature sets.

    ``feats_x (n, *dims)``, ``feats_y (m, *dims)`` (flattened to ``(., F)``, ``n, m >= 2``); means and
    unbiased covariances are estimated, then ``gaussian_frechet_distance`` is applied. Returns a float.
    Note: the plug-in estimate is biased upwards for finite ``n`` (roughly by ``tr(cov) F / n``-sized terms).
    """
    xf, yf = _flat_pair(feats_x, feats_y, "feats_x", "feats_y")
    if xf.shape[0] < 2 or yf.shape[0] < 2:
        raise ValueError(f"frechet_distance needs at least 2 samples in each set; got {xf.shape[0]} and {yf.shape[0]}")
    xf, yf = xf.double(), yf.double()
    return gaussian_frechet_distance(xf.mean(0), torch.cov(xf.T).reshape(xf.shape[1], xf.shape[1]),
                                     yf.mean(0), torch.cov(yf.T).reshape(yf.shape[1], yf.shape[1]))


def gaussian_stats(feats: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """``(mu (F,), sigma (F, F))``: mean and unbiased covariance of ``feats (n, *dims)`` (``n >= 2``), float64.

    The reference statistics of FID files (``mu``, ``sigma``): ``frechet_distance(x, y)`` equals
    ``gaussian_frechet_distance(*gaussian_stats(x), *gaussian_stats(y))``.
    """
    if not torch.is_tensor(feats) or feats.dim() < 1:
        raise TypeError(f"feats must be a tensor of shape (n, *dims); got {type(feats).__name__}")
    f = feats.reshape(feats.shape[0], -1).double().cpu()
    if f.shape[0] < 2:
        raise ValueError(f"gaussian_stats needs at least 2 samples; got {f.shape[0]}")
    return f.mean(0).numpy(), torch.cov(f.T).reshape(f.shape[1], f.shape[1]).numpy()


def _pairwise_dist(a: torch.Tensor, b: torch.Tensor, block: int = 4096) -> torch.Tensor:
    """Euclidean distances ``(n, m)`` between the rows of ``a (n, F)`` and ``b (m, F)``, computed in blocks."""
    return torch.cat([torch.cdist(a[i:i + block], b) for i in range(0, a.shape[0], block)]) if a.shape[0] else a.new_zeros(0, b.shape[0])


def knn_radii(feats: torch.Tensor, k: int = 3) -> torch.Tensor:
    """Radius of each point's k-NN ball within its own set: the distance to its ``k``-th nearest *other*
    point. ``feats (n, F)`` with ``n > k``; returns ``(n,)``."""
    n = feats.shape[0]
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"k must be an integer >= 1; got {k!r}")
    if n <= k:
        raise ValueError(f"k-NN radii with k={k} need more than k points; got {n}")
    d = _pairwise_dist(feats, feats)
    # the k+1-th smallest distance (the smallest is the point itself, at 0)
    return d.kthvalue(k + 1, dim=1).values


def _coverage(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor) -> float:
    """Fraction of ``points`` that lie in at least one ball ``|p - centres[j]| <= radii[j]``."""
    d = _pairwise_dist(points, centres)
    return float((d <= radii[None, :]).any(dim=1).double().mean())


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = 3) -> dict:
    """Improved precision and recall (Kynkäänniemi et al., 2019) of ``fake`` against ``real`` features.

    The support of each set is estimated as the union of its points' k-NN balls,
    ``M(X) = U_i B(x_i, r_k(x_i))`` with ``r_k`` the distance to the ``k``-th nearest other point of the same set;
    then ``precision = mean_j 1[fake_j in M(real)]`` (how much of the model's mass is realistic) and
    ``recall = mean_i 1[real_i in M(fake)]`` (how much of the data the model covers). Both lie in ``[0, 1]``.
    The paper uses ``k = 3`` and equal set sizes (the estimates depend on ``n``: compare at the same size).

    Shapes: ``real (n, *dims)``, ``fake (m, *dims)`` (flattened), ``n, m > k``. Computed in float64 on the inputs'
    device. Returns ``{"precision": float, "recall": float, "k": k}``.
    """
    rf, ff = _flat_pair(real, fake, "real", "fake")
    rf, ff = rf.double(), ff.double()
    r_real, r_fake = knn_radii(rf, k), knn_radii(ff, k)
    return {"precision": _coverage(ff, rf, r_real), "recall": _coverage(rf, ff, r_fake), "k": k}
