"""Scalers between discrete pixel levels and the model's continuous scale, dequantisation, flips.

Discrete data take integer values ``k in {0, ..., L-1}`` (``L = levels``: 256 for 8-bit images,
17 for the embedded 8x8 digits). Uniform dequantisation maps ``k`` to ``u = (k + U) / L`` with
``U ~ U[0, 1)^D``, so ``u in [0, 1)^D``; the model sees ``y = a u + b`` with
``(a, b) = (2, -1)`` (centred, ``y in [-1, 1)``) or ``(1, 0)`` (``y in [0, 1)``).
Without dequantisation the bin centres ``u = (k + 1/2) / L`` are used.
"""

from __future__ import annotations

import torch

__all__ = ["scale_affine", "to_model_scale", "from_model_scale", "uniform_dequantize", "random_hflip"]


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
