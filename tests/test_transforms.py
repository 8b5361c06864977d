"""Scalers, uniform dequantisation, flips and the noise-mixture augmentation."""

import math

import pytest
import torch

from scoresde.data import from_model_scale, noise_mixture, random_hflip, to_model_scale, uniform_dequantize


@pytest.mark.parametrize("centered, lo, hi", [(True, -1.0, 1.0), (False, 0.0, 1.0)])
@pytest.mark.parametrize("levels", [17, 256])
def test_dequantised_values_stay_in_their_bins(centered, lo, hi, levels):
    k = torch.arange(levels).repeat(50)
    y = uniform_dequantize(k, levels, centered, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert float(y.min()) >= lo and float(y.max()) < hi
    u = from_model_scale(y, centered)
    assert torch.equal(torch.floor(u * levels).long(), k)
    # the fractional position within the bin is uniform: mean 1/2, variance 1/12
    frac = u * levels - k
    n = frac.numel()
    assert abs(float(frac.mean()) - 0.5) < 4 * (1 / 12) ** 0.5 / n**0.5
    centres = uniform_dequantize(k, levels, centered, noise=False, dtype=torch.float64)
    assert torch.allclose(from_model_scale(centres, centered), (k.double() + 0.5) / levels)


def test_scalers_round_trip():
    u = torch.rand(100, dtype=torch.float64)
    for c in (True, False):
        assert torch.allclose(from_model_scale(to_model_scale(u, c), c), u)
    assert torch.allclose(to_model_scale(u, True), 2 * u - 1)


def test_dequantize_rejects_out_of_range_levels():
    with pytest.raises(ValueError, match="levels - 1"):
        uniform_dequantize(torch.tensor([0, 17]), 17)
    with pytest.raises(ValueError, match="levels"):
        uniform_dequantize(torch.tensor([0, 1]), 1)


def test_random_hflip_per_image():
    x = torch.arange(2 * 1 * 2 * 3, dtype=torch.float32).reshape(2, 1, 2, 3).repeat(50, 1, 1, 1)
    y = random_hflip(x, generator=torch.Generator().manual_seed(0))
    flipped = (y != x).flatten(1).any(1)
    assert torch.equal(y[flipped], x[flipped].flip(-1))
    assert torch.equal(y[~flipped], x[~flipped])
    assert 20 < int(flipped.sum()) < 80
    with pytest.raises(ValueError, match="B, C, H, W"):
        random_hflip(torch.zeros(3, 4))


def test_noise_mixture_picks_samples_with_probability_prob_and_leaves_the_rest_unchanged():
    n, d, prob, smin, smax = 4000, 256, 0.25, 0.03, 0.3
    y = torch.rand(n, d, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2 - 1
    out = noise_mixture(y, prob, smin, smax, generator=torch.Generator().manual_seed(1))
    assert out.shape == y.shape and out.dtype == y.dtype
    changed = (out != y).any(dim=1)
    # binomial count of augmented samples: within 5 standard deviations of n p
    assert abs(int(changed.sum()) - n * prob) < 5 * math.sqrt(n * prob * (1 - prob))
    assert torch.equal(out[~changed], y[~changed])
    # each augmented sample carries one sigma: its per-sample std estimate lies in [smin, smax] up to the
    # estimate's relative error (~1/sqrt(2 d) = 4.4 %, bound at 5 of those), and log sigma is uniform
    sig = (out - y)[changed].std(dim=1)
    rel = 5 / math.sqrt(2 * d)
    assert float(sig.min()) > smin * (1 - rel) and float(sig.max()) < smax * (1 + rel)
    u = (sig.log() - math.log(smin)) / math.log(smax / smin)  # ~ U[0, 1]
    m = len(u)
    assert abs(float(u.mean()) - 0.5) < 5 * math.sqrt(1 / 12 / m)
    assert abs(float((u < 0.5).double().mean()) - 0.5) < 5 * math.sqrt(0.25 / m)


def test_noise_mixture_moments_equal_the_mixture_of_data_and_smoothed_data():
    """Output = (1-p) p_data + p * p_data * N(0, sigma^2): mean kept, variance + p E[sigma^2] per coordinate."""
    n, prob, smin, smax = 200_000, 0.4, 0.05, 0.5
    g = torch.Generator().manual_seed(2)
    y = 0.3 * torch.randn(n, 2, generator=g, dtype=torch.float64) + torch.tensor([1.0, -2.0], dtype=torch.float64)
    out = noise_mixture(y, prob, smin, smax, generator=g)
    e_sig2 = (smax**2 - smin**2) / (2 * math.log(smax / smin))  # E[sigma^2] for log-uniform sigma
    want_var = 0.09 + prob * e_sig2
    assert torch.allclose(out.mean(0), torch.tensor([1.0, -2.0], dtype=torch.float64), atol=5 * math.sqrt(want_var / n))
    # the variance estimate's standard error sqrt(Var[(x - mean)^2] / n), from the sample itself; 5 of those
    sq = (out - out.mean(0)) ** 2
    assert ((out.var(0) - want_var).abs() < 5 * (sq.var(0) / n).sqrt()).all()


def test_noise_mixture_edge_probabilities_and_bad_input():
    y = torch.randn(64, 3, 4, 4, generator=torch.Generator().manual_seed(3))
    assert torch.equal(noise_mixture(y, 0.0, 0.1, 0.2), y)
    g = torch.Generator().manual_seed(5)
    state = g.get_state()
    noise_mixture(y, 0.0, 0.1, 0.2, generator=g)
    assert torch.equal(g.get_state(), state)  # prob 0 draws nothing: runs without the augmentation keep their stream
    assert ((noise_mixture(y, 1.0, 0.1, 0.2, generator=torch.Generator().manual_seed(4)) - y).flatten(1) != 0).all()
    with pytest.raises(ValueError, match="prob must lie in"):
        noise_mixture(y, 1.5, 0.1, 0.2)
    with pytest.raises(ValueError, match="prob must be"):
        noise_mixture(y, -0.1, 0.1, 0.2)
    with pytest.raises(ValueError, match="std_min must be"):
        noise_mixture(y, 0.5, 0.0, 0.2)
    with pytest.raises(ValueError, match="std_min must be <= std_max"):
        noise_mixture(y, 0.5, 0.3, 0.2)
