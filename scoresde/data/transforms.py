"""Scalers between discrete pixel levels and the model's continuous scale, dequantisation, flips.

Discrete data take integer values ``k in {0, ..., L-1}`` (``L = levels``: 256 for 8-bit images,
17 for the embedded 8x8 digits). Uniform dequantisation maps ``k`` to ``u = (k + U) / L`` with
``U ~ U[0, 1)^D``, so ``u in [0, 1)^D``; the model sees ``y = a u + b`` with
``(a, b) = (2, -1)`` (centred, ``y in [-1, 1)``) or ``(1, 0)`` (``y in [0, 1)``).
Without dequantisation the bin centres ``u = (k + 1/2) / L`` are used.
"""

from __future__ import annotations

import torch

from scoresde._validate import check_positive

__all__ = ["scale_affine", "to_model_scale", "from_model_scale", "uniform_dequantize", "random_hflip", "noise_mixture"]


def _check_levels(levels) -> int:
    if isinstance(levels, bool) or not isinstance(levels, int) or levels < 2:
        raise ValueError(f"levels must be an integer >= 2; got {levels!r}")
    return levels


def scale_affine(centered: bool) -> tuple[float, float]:
    """``(a, b)`` of the map ``y = a u + b`` from ``u in [0, 1)`` to the model's scale."""
    return (2.0, -1.0) if centered else (1.0, 0.0)


def to_model_scale(u: torch.Tensor, centered: bool = True) -> torch.Tensor:
    """``y = 2u - 1`` (centred) or ``y = u``; shape preserved."""
    a, b = scale_affine(centered)
    return a * u + b


def from_model_scale(y: torch.Tensor, centered: bool = True) -> torch.Tensor:
    """Inverse of ``to_model_scale``: ``u = (y - b) / a``; shape preserved."""
    a, b = scale_affine(centered)
    return (y - b) / a


def uniform_dequantize(
    k: torch.Tensor,
    levels: int,
    centered: bool = True,
    generator: torch.Generator | None = None,
    dtype: torch.dtype | None = None,
    noise: bool = True,
) -> torch.Tensor:
    """Integer levels ``k`` (any shape) to continuous model-scale ``y = a (k + U) / L + b``.

    ``noise=False`` uses the bin centres ``U = 1/2`` instead of uniform noise.
    Raises ``ValueError`` if any ``k`` lies outside ``[0, levels - 1]``.
    """
    levels = _check_levels(levels)
    if k.numel() and (int(k.min()) < 0 or int(k.max()) > levels - 1):
        raise ValueError(f"data values must lie in [0, levels - 1] = [0, {levels - 1}]; got [{int(k.min())}, {int(k.max())}]")
    dtype = dtype or torch.get_default_dtype()
    kf = k.to(dtype)
    if noise:
        U = torch.rand(k.shape, generator=generator, device=k.device, dtype=dtype)
    else:
        U = torch.full_like(kf, 0.5)
    return to_model_scale((kf + U) / levels, centered)


def random_hflip(x: torch.Tensor, generator: torch.Generator | None = None, p: float = 0.5) -> torch.Tensor:
    """Flip each image ``(B, C, H, W)`` left-right with probability ``p`` (one draw per image)."""
    if x.dim() != 4:
        raise ValueError(f"random_hflip expects images (B, C, H, W); got shape {tuple(x.shape)}")
    flip = torch.rand(x.shape[0], generator=generator, device=x.device) < p
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def noise_mixture(
    y: torch.Tensor, prob: float, std_min: float, std_max: float, generator: torch.Generator | None = None,
    return_level: bool = False,
):
    """Noise-mixture augmentation: with probability ``prob`` per sample, ``y + sigma z`` with ``z ~ N(0, I)``
    and ``sigma`` log-uniform in ``[std_min, std_max]`` (one draw per sample); other samples unchanged.

    A model trained on the augmented batches learns
    ``q = (1 - prob) p_data + prob * int p_data * N(0, sigma^2 I) dpi(sigma)``. Since ``q >= (1 - prob) p_data``,
    the price on in-distribution data is at most ``-log(1 - prob)`` nats per sample (``-log(1 - prob) / (D ln 2)``
    bits/dim: 0.0065 for ``prob = 0.25``, ``D = 64``), while a test point outside the training support keeps at
    least ``prob`` times the smoothed density instead of a vanishing one: a regulariser of the density's tails.

    ``prob = 0`` returns ``y`` itself and draws nothing from ``generator`` (a run without the augmentation
    keeps the random stream it had before the augmentation existed).

    Shapes: ``y (B, ...)`` in the model's scale; returns the same shape and dtype. With ``return_level``, returns
    ``(y_aug, level)`` with ``level (B,)`` each sample's noise std (0 for the samples left clean): the condition of
    a non-leaking, augmentation-conditioned model (``losses.conditioned_noise_mixture``).
    """
    prob = check_positive("prob", prob, allow_zero=True)
    if prob > 1:
        raise ValueError(f"prob must lie in [0, 1]; got {prob!r}")
    std_min, std_max = check_positive("std_min", std_min), check_positive("std_max", std_max)
    if std_min > std_max:
        raise ValueError(f"std_min must be <= std_max; got std_min={std_min!r}, std_max={std_max!r}")
    if prob == 0:
        return (y, y.new_zeros(y.shape[0])) if return_level else y
    b = y.shape[0]
    pick = torch.rand(b, generator=generator, device=y.device) < prob
    u = torch.rand(b, generator=generator, device=y.device, dtype=y.dtype)
    sigma = std_min * (std_max / std_min) ** u
    z = torch.randn(y.shape, generator=generator, device=y.device, dtype=y.dtype)
    level = torch.where(pick, sigma, torch.zeros_like(sigma))
    out = y + level.reshape(b, *([1] * (y.dim() - 1))) * z
    return (out, level) if return_level else out
