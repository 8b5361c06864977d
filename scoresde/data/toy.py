"""Toy 2-D data sets and the default Gaussian mixtures (whose scores and densities are exact).

Every generator returns an ``(n, 2)`` float tensor, standardised per coordinate with the
*exact* moments of its raw distribution: ``x = (x_raw - E[x_raw]) / std(x_raw)``, so each
coordinate has mean 0 and variance 1 (in expectation; ``raw_moments`` documents each one).
Randomness comes only from the ``generator`` argument; samples are drawn on the
generator's device unless ``device`` is given, in ``dtype`` (default: torch's default dtype).

Raw distributions (before standardisation):

* ``swiss_roll``: ``t ~ U[3 pi / 2, 9 pi / 2]``, ``x_raw = (t cos t, t sin t) + 0.5 z``.
* ``two_moons``: ``theta ~ U[0, pi]``, upper moon ``(cos theta, sin theta)`` or lower moon
  ``(1 - cos theta, 1/2 - sin theta)`` with probability 1/2 each, plus ``0.1 z``.
* ``eight_gaussians``: mixture of 8 equal-weight ``N(c_k, 0.1^2 I)`` with ``c_k`` the 8th roots
  of unity (radius 1). After standardisation it is still a Gaussian mixture:
  ``eight_gaussians_gmm()`` returns it, with its exact oracle.
* ``checkerboard``: uniform on the 8 dark squares of a 4x4 board on ``[-2, 2]^2``
  (square ``(col, row)`` with ``col + row`` even).
"""

from __future__ import annotations

import functools
import math

import torch

from ..oracle import GaussianMixture

__all__ = [
    "swiss_roll",
    "two_moons",
    "eight_gaussians",
    "eight_gaussians_gmm",
    "checkerboard",
    "default_gmm",
    "raw_moments",
    "TOY_GENERATORS",
]

SWISS_ROLL_NOISE = 0.5
MOONS_NOISE = 0.1
EIGHT_GAUSSIANS_STD = 0.1


def _check_n(n) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be an integer >= 0; got {n!r}")
    return n


def _kw(generator, device, dtype):
    if device is None and generator is not None:
        device = generator.device
    return dict(device=device, dtype=dtype or torch.get_default_dtype())


@functools.lru_cache(maxsize=None)
def _swiss_roll_moments() -> tuple[tuple[float, float], tuple[float, float]]:
    """Exact mean and std of ``(t cos t, t sin t) + s z`` for ``t ~ U[a, b]`` (closed-form integrals)."""
    a, b = 1.5 * math.pi, 4.5 * math.pi
    L = b - a
    # antiderivatives: int t cos t = t sin t + cos t; int t sin t = sin t - t cos t;
    # int t^2 cos^2 t = t^3/6 + (t^2/2 - 1/4) sin(2t)/2 + t cos(2t)/4; int t^2 sin^2 t = t^3/3 - int t^2 cos^2 t
    F1c = lambda t: t * math.sin(t) + math.cos(t)  # noqa: E731
    F1s = lambda t: math.sin(t) - t * math.cos(t)  # noqa: E731
    F2c = lambda t: t**3 / 6 + (t**2 / 2 - 0.25) * math.sin(2 * t) / 2 + t * math.cos(2 * t) / 4  # noqa: E731
    F2s = lambda t: t**3 / 3 - F2c(t)  # noqa: E731
    mx, my = (F1c(b) - F1c(a)) / L, (F1s(b) - F1s(a)) / L
    vx = (F2c(b) - F2c(a)) / L - mx**2 + SWISS_ROLL_NOISE**2
    vy = (F2s(b) - F2s(a)) / L - my**2 + SWISS_ROLL_NOISE**2
    return (mx, my), (math.sqrt(vx), math.sqrt(vy))


def raw_moments(name: str) -> tuple[tuple[float, float], tuple[float, float]]:
    """Exact per-coordinate ``(mean, std)`` of the raw distribution of a toy set (see module doc).

    Two moons: ``E = (1/2, 1/4)``, ``Var = (3/4 + s^2, 9/16 - 1/pi + s^2)``; eight Gaussians:
    ``E = 0``, ``Var = 1/2 + s^2``; checkerboard: ``E = 0``, ``Var = 4/3``; swiss roll: closed-form
    integrals of ``t cos t``, ``t^2 cos^2 t`` (and sin) over ``t ~ U[3pi/2, 9pi/2]``.
    """
    s = MOONS_NOISE**2
    if name == "swissroll":
        return _swiss_roll_moments()
    if name == "moons":
        return (0.5, 0.25), (math.sqrt(0.75 + s), math.sqrt(9 / 16 - 1 / math.pi + s))
    if name == "eight_gaussians":
        v = math.sqrt(0.5 + EIGHT_GAUSSIANS_STD**2)
        return (0.0, 0.0), (v, v)
    if name == "checkerboard":
        v = math.sqrt(4 / 3)
        return (0.0, 0.0), (v, v)
    raise ValueError(f"name must be one of ['swissroll', 'moons', 'eight_gaussians', 'checkerboard']; got {name!r}")


def _standardise(raw: torch.Tensor, name: str) -> torch.Tensor:
    (mx, my), (sx, sy) = raw_moments(name)
    mean = raw.new_tensor([mx, my])
    std = raw.new_tensor([sx, sy])
    return (raw - mean) / std


def swiss_roll(n: int, generator: torch.Generator | None = None, device=None, dtype=None) -> torch.Tensor:
    """Swiss roll ``(n, 2)``: ``t ~ U[3pi/2, 9pi/2]``, ``(t cos t, t sin t) + 0.5 z``, standardised."""
    n = _check_n(n)
    kw = _kw(generator, device, dtype)
    t = 1.5 * math.pi * (1 + 2 * torch.rand(n, generator=generator, **kw))
    raw = torch.stack([t * torch.cos(t), t * torch.sin(t)], dim=1)
    raw = raw + SWISS_ROLL_NOISE * torch.randn(n, 2, generator=generator, **kw)
    return _standardise(raw, "swissroll")


def two_moons(n: int, generator: torch.Generator | None = None, device=None, dtype=None) -> torch.Tensor:
    """Two interleaved half circles ``(n, 2)`` (each point picks a moon with probability 1/2), noise 0.1, standardised."""
    n = _check_n(n)
    kw = _kw(generator, device, dtype)
    theta = math.pi * torch.rand(n, generator=generator, **kw)
    lower = torch.rand(n, generator=generator, **kw) < 0.5
    c, s = torch.cos(theta), torch.sin(theta)
    x = torch.where(lower, 1 - c, c)
    y = torch.where(lower, 0.5 - s, s)
    raw = torch.stack([x, y], dim=1) + MOONS_NOISE * torch.randn(n, 2, generator=generator, **kw)
    return _standardise(raw, "moons")


def eight_gaussians_gmm() -> GaussianMixture:
    """The standardised eight-Gaussians set as a ``GaussianMixture`` (float64): means ``c_k / v``,
    std ``0.1 / v`` with ``c_k = (cos(k pi/4), sin(k pi/4))`` and ``v = sqrt(1/2 + 0.1^2)``."""
    v = math.sqrt(0.5 + EIGHT_GAUSSIANS_STD**2)
    ang = torch.arange(8, dtype=torch.float64) * (math.pi / 4)
    means = torch.stack([torch.cos(ang), torch.sin(ang)], dim=1) / v
    return GaussianMixture(means, torch.full((8,), EIGHT_GAUSSIANS_STD / v, dtype=torch.float64))


def eight_gaussians(n: int, generator: torch.Generator | None = None, device=None, dtype=None) -> torch.Tensor:
    """``n`` samples ``(n, 2)`` of ``eight_gaussians_gmm()`` (8 Gaussians on a circle), standardised."""
    n = _check_n(n)
    kw = _kw(generator, device, dtype)
    if n == 0:  # GaussianMixture.sample(0) fails inside torch.multinomial
        return torch.empty(0, 2, **kw)
    return eight_gaussians_gmm().sample(n, generator=generator, **kw)


def checkerboard(n: int, generator: torch.Generator | None = None, device=None, dtype=None) -> torch.Tensor:
    """Uniform on the 8 squares ``(col, row)``, ``col + row`` even, of a 4x4 board on ``[-2, 2]^2``; ``(n, 2)``, standardised.

    ``x1 ~ U[-2, 2]``, ``col = floor(x1) + 2``; the row is ``col mod 2`` or ``col mod 2 + 2`` with
    probability 1/2; ``x2 = row - 2 + U[0, 1)``. Both coordinates are marginally ``U[-2, 2]``.
    """
    n = _check_n(n)
    kw = _kw(generator, device, dtype)
    x1 = 4 * torch.rand(n, generator=generator, **kw) - 2
    col = torch.floor(x1) + 2
    upper = (torch.rand(n, generator=generator, **kw) < 0.5).to(x1.dtype)
    row = torch.remainder(col, 2) + 2 * upper
    x2 = row - 2 + torch.rand(n, generator=generator, **kw)
    return _standardise(torch.stack([x1, x2], dim=1), "checkerboard")


TOY_GENERATORS = {
    "swissroll": swiss_roll,
    "moons": two_moons,
    "eight_gaussians": eight_gaussians,
    "checkerboard": checkerboard,
}


def default_gmm(dim: int = 2, n_components: int | None = None, seed: int = 0) -> GaussianMixture:
    """The toolkit's default Gaussian mixture (float64 parameters), with exact scores via the oracle.

    ``dim == 2`` (and ``n_components`` None): five components of unequal weight and width at the
    corners and centre of the square ``[-1, 1]^2`` (per-coordinate variance about 0.9); this is
    the distribution of the "gmm" data set.

    Otherwise ``K = n_components`` (default 4) components in ``dim`` dimensions with means
    ``mu_k = a z_k``, ``z_k ~ N(0, I_dim)`` drawn from ``torch.Generator().manual_seed(seed)``,
    then shifted so that the mixture mean ``sum_k w_k mu_k`` is 0; stds ``sigma_k`` evenly spread over
    ``[0.4, 0.6]``, ``a = sqrt(1 - mean sigma_k^2)``, weights proportional to ``K, K-1, ..., 1``.
    The per-coordinate variance is below 1 (about ``1 - a^2 / K`` on average over coordinates) and
    the mean separation about ``a sqrt(2 dim)`` (well separated for ``dim >= 2``). Image-shaped inputs
    ``(B, *dims)`` with ``prod(dims) = dim`` work with the oracle directly.
    """
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        raise ValueError(f"dim must be an integer >= 1; got {dim!r}")
    if n_components is not None and (isinstance(n_components, bool) or not isinstance(n_components, int) or n_components < 1):
        raise ValueError(f"n_components must be None or an integer >= 1; got {n_components!r}")
    f64 = torch.float64
    if dim == 2 and n_components is None:
        means = torch.tensor([[-1.0, -1.0], [1.0, -1.0], [1.0, 1.0], [-1.0, 1.0], [0.0, 0.0]], dtype=f64)
        stds = torch.tensor([0.30, 0.20, 0.35, 0.25, 0.15], dtype=f64)
        weights = torch.tensor([0.25, 0.20, 0.20, 0.20, 0.15], dtype=f64)
        return GaussianMixture(means, stds, weights)
    K = n_components or 4
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(K, dim, generator=g, dtype=f64)
    stds = torch.linspace(0.4, 0.6, K, dtype=f64) if K > 1 else torch.tensor([0.5], dtype=f64)
    a = math.sqrt(1 - float(stds.pow(2).mean()))
    weights = torch.arange(K, 0, -1, dtype=f64)
    means = a * z
    means = means - (weights / weights.sum()) @ means
    return GaussianMixture(means, stds, weights)
