"""Gaussian-mixture baseline: dequantised bits/dim against a hand computation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from scoresde.baselines import BitsPerDim, dequantize_unit, fit_gmm_baseline, gmm_bits_per_dim
from scoresde.data import load_dataset, uniform_dequantize


def _small_data(seed, n, levels=5, shape=(1, 2, 2)):
    g = torch.Generator().manual_seed(seed)
    # correlated integer data: a shared level plus a small per-pixel offset, clipped to [0, L-1]
    base = torch.randint(0, levels, (n, 1, 1, 1), generator=g)
    off = torch.randint(-1, 2, (n, *shape), generator=g)
    return (base + off).clamp(0, levels - 1).to(torch.uint8)


def _gauss_logpdf(u, mu, cov):
    D = u.shape[1]
    L = np.linalg.cholesky(cov)
    z = np.linalg.solve(L, (u - mu).T)
    return -0.5 * (D * math.log(2 * math.pi) + 2 * np.log(np.diag(L)).sum() + (z**2).sum(0))


def test_one_component_bpd_equals_hand_computation():
    levels, reg = 5, 1e-6
    tr, va, te = _small_data(0, 60, levels), _small_data(1, 20, levels), _small_data(2, 25, levels)
    res = fit_gmm_baseline(tr, va, levels, components=(1,), seed=3, reg_covar=reg)
    assert res.n_components == 1 and set(res.val_bpd) == {1}

    # the fitted 1-component model is the Gaussian MLE of the dequantised training data (+ reg I)
    u_tr = uniform_dequantize(tr, levels, centered=False, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    u_tr = u_tr.reshape(60, -1).numpy()
    mu = u_tr.mean(0)
    cov = (u_tr - mu).T @ (u_tr - mu) / len(u_tr) + reg * np.eye(4)
    np.testing.assert_allclose(res.gmm.means_[0], mu, rtol=1e-10)
    np.testing.assert_allclose(res.gmm.covariances_[0], cov, rtol=1e-8, atol=1e-12)

    # bpd = mean over draws of -log N(u; mu, cov) / (D ln 2) + log2 L, draws from seed 7 in order
    n_dequant = 3
    g = torch.Generator().manual_seed(7)
    nll = np.zeros(25)
    for _ in range(n_dequant):
        u = uniform_dequantize(te, levels, centered=False, generator=g, dtype=torch.float64).reshape(25, -1).numpy()
        nll -= _gauss_logpdf(u, mu, cov)
    per_image = nll / n_dequant / (4 * math.log(2)) + math.log2(levels)
    got = gmm_bits_per_dim(res.gmm, te, levels, n_dequant=n_dequant, seed=7)
    assert isinstance(got, BitsPerDim)
    assert got.mean == pytest.approx(per_image.mean(), rel=1e-9)
    assert got.stderr == pytest.approx(per_image.std(ddof=1) / math.sqrt(25), rel=1e-7)
    # validation number uses seed + 1 and one draw
    assert res.val_bpd[1].mean == pytest.approx(gmm_bits_per_dim(res.gmm, va, levels, 1, seed=4).mean, rel=1e-12)


class _Uniform:
    """Uniform density on [0, 1)^D: log p_u = 0, so bpd = log2 L exactly."""

    def score_samples(self, u):
        assert u.dtype == np.float64 and ((u >= 0) & (u < 1)).all()
        return np.zeros(len(u))


def test_uniform_density_gives_log2_levels_and_numpy_input():
    x = np.random.default_rng(0).integers(0, 17, (10, 1, 8, 8))
    b = gmm_bits_per_dim(_Uniform(), x, 17, n_dequant=2)
    assert b.mean == pytest.approx(math.log2(17), abs=1e-12) and b.stderr < 1e-12


def test_selection_picks_lowest_validation_bpd_and_is_deterministic():
    tr = load_dataset("digits", "train").x
    va = load_dataset("digits", "val").x
    a = fit_gmm_baseline(tr, va, 17, components=(1, 2, 4), seed=0)
    b = fit_gmm_baseline(tr, va, 17, components=(1, 2, 4), seed=0)
    assert a.n_components == min(a.val_bpd, key=lambda K: a.val_bpd[K].mean)
    assert all(a.val_bpd[K] == b.val_bpd[K] for K in (1, 2, 4))
    # a mixture beats the single Gaussian on digits, and both beat the uniform density (log2 17 = 4.09)
    assert a.val_bpd[a.n_components].mean < a.val_bpd[1].mean < math.log2(17)


def test_dequantize_unit_bins():
    k = torch.tensor([[0, 3], [4, 1]])
    u = dequantize_unit(k, 5, torch.Generator().manual_seed(0))
    assert u.shape == (2, 2) and u.dtype == np.float64
    np.testing.assert_array_equal(np.floor(u * 5), k.numpy())


def test_bad_inputs_raise():
    tr = _small_data(0, 10)
    with pytest.raises(ValueError, match="levels"):
        gmm_bits_per_dim(_Uniform(), tr, 1)
    with pytest.raises(ValueError, match=r"\[0, levels - 1\]"):
        gmm_bits_per_dim(_Uniform(), tr, 3)
    with pytest.raises(TypeError, match="integer levels"):
        gmm_bits_per_dim(_Uniform(), tr.float(), 5)
    with pytest.raises(ValueError, match="n_dequant"):
        gmm_bits_per_dim(_Uniform(), tr, 5, n_dequant=0)
    with pytest.raises(TypeError, match="score_samples"):
        gmm_bits_per_dim(object(), tr, 5)
    with pytest.raises(ValueError, match="components"):
        fit_gmm_baseline(tr, tr, 5, components=(1, 11))
    with pytest.raises(ValueError, match="components"):
        fit_gmm_baseline(tr, tr, 5, components=())
    with pytest.raises(ValueError, match="per-sample shape"):
        fit_gmm_baseline(tr, tr.reshape(10, 4), 5)
