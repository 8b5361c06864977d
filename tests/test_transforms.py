"""Scalers, uniform dequantisation and flips."""

import pytest
import torch

from scoresde.data import from_model_scale, random_hflip, to_model_scale, uniform_dequantize


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
