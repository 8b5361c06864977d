"""The EDM / k-diffusion denoiser convention ``D(x_hat, sigma)`` (Karras et al. 2022) and scoresde's ``score_fn(x, t)``.

EDM writes every affine-drift diffusion in scale-free variables. With scoresde's perturbation
``x_t = m(t) x_0 + s(t) z`` (``sde.marginal_coef``)::

    sigma(t) = s(t) / m(t),        x_hat = x_t / m(t) = x_0 + sigma z

so ``x_hat`` is the data plus Gaussian noise of std ``sigma`` whatever the SDE (VP, sub-VP, VE), and the
denoiser is the posterior mean ``D(x_hat; sigma) = E[x_0 | x_hat]``. Tweedie's formula links the two::

    D(x_hat; sigma) = (x_t + s(t)^2 grad log p_t(x_t)) / m(t),          x_t = m(t) x_hat
    grad log p_t(x_t) = (m(t) D(x_t / m(t); sigma(t)) - x_t) / s(t)^2

``sigma -> t`` inverts ``sigma(t) = exp(-lambda(t))`` with ``sde.t_from_log_snr(-log sigma)`` (closed form for the
linear VP and VE, bisection otherwise); ``sigma`` is strictly increasing in ``t``.

Shapes: ``x`` / ``x_hat`` ``(B, *dims)``; ``t`` ``(B,)`` or a scalar; ``sigma`` a float, a 0-d tensor, or any
tensor with ``B`` elements (``(B,)`` as k-diffusion, ``(B, 1, 1, 1)`` as EDM's networks). Outputs are shaped
like ``x``.
"""

from __future__ import annotations

from typing import Callable

import torch

from ..sde import SDE, as_time, batch_broadcast

__all__ = ["denoiser", "score_fn", "sigma_of_t", "t_of_sigma", "sigma_range"]

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
ScoreFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

# relative slack on the sigma range check (the inverse of sigma(t) is exact only to rounding)
_RANGE_RTOL = 1e-6


def _check_sde(sde) -> SDE:
    if not isinstance(sde, SDE):
        raise TypeError(f"sde must be a scoresde SDE (VPSDE, SubVPSDE, VESDE); got {type(sde).__name__}")
    return sde


def sigma_of_t(sde: SDE, t: torch.Tensor) -> torch.Tensor:
    """EDM's noise level ``sigma(t) = s(t) / m(t) = exp(-lambda(t))``; shape of ``t``."""
    m, s = _check_sde(sde).marginal_coef(t)
    return s / m


def sigma_range(sde: SDE) -> tuple[float, float]:
    """``(sigma(0), sigma(T))`` in float64: the noise levels a model of ``sde`` is defined on.

    VP / sub-VP: ``sigma(0) = 0``; VE: ``sigma(0) = sigma_min``.
    """
    t = torch.tensor([0.0, float(_check_sde(sde).T)], dtype=torch.float64)
    lo, hi = sigma_of_t(sde, t).tolist()
    return lo, hi


def t_of_sigma(sde: SDE, sigma: torch.Tensor) -> torch.Tensor:
    """The time ``t in [0, T]`` with ``sigma(t) = sigma``: ``t = sde.t_from_log_snr(-log sigma)``; shape of ``sigma``.

    Computed in float64 (and returned in ``sigma``'s dtype). ``sigma`` must lie in ``[sigma(0), sigma(T)]``
    (``sigma_range``) up to a relative ``1e-6``; ``ValueError`` otherwise (the SDE defines no model beyond ``T``,
    and a VE model none below ``sigma_min``).
    """
    _check_sde(sde)
    if not torch.is_tensor(sigma):
        sigma = torch.tensor(float(sigma), dtype=torch.float64)
    s64 = sigma.detach().to(torch.float64)
    lo, hi = sigma_range(sde)
    bad = ~((s64 > 0) & (s64 >= lo * (1 - _RANGE_RTOL)) & (s64 <= hi * (1 + _RANGE_RTOL)))
    if bool(bad.any()):
        raise ValueError(
            f"sigma must lie in (0, sigma(T)] and >= sigma(0), i.e. [{max(lo, 0.0)!r}, {hi!r}] for {sde!r}; "
            f"got values in [{s64.min().item()!r}, {s64.max().item()!r}]"
        )
    t = sde.t_from_log_snr(-torch.log(s64)).clamp(0.0, float(sde.T))
    return t.to(sigma.dtype if sigma.dtype.is_floating_point else torch.get_default_dtype())


def _batch_sigma(sigma, x: torch.Tensor) -> torch.Tensor:
    """``sigma`` as a ``(B,)`` tensor in ``x``'s dtype and device (from a float, a 0-d tensor or ``B`` elements)."""
    if not torch.is_tensor(sigma):
        sigma = torch.tensor(float(sigma), dtype=torch.float64)  # not the float32 default: keep a float's precision
    sigma = sigma.to(device=x.device, dtype=x.dtype)
    if sigma.numel() == 1:
        return sigma.reshape(()).expand(x.shape[0])
    if sigma.numel() != x.shape[0]:
        raise ValueError(
            f"sigma must be a scalar or hold one value per sample (batch {x.shape[0]}); got shape {tuple(sigma.shape)}"
        )
    return sigma.reshape(x.shape[0])


def denoiser(score_fn: ScoreFn, sde: SDE) -> Denoiser:
    """EDM denoiser ``D(x_hat, sigma) = E[x_0 | x_hat]`` from a scoresde ``score_fn(x, t)`` of ``sde``.

    ``t = t_of_sigma(sde, sigma)``, ``(m, s) = sde.marginal_coef(t)``, ``x_t = m x_hat`` and::

        D(x_hat; sigma) = (x_t + s^2 score_fn(x_t, t)) / m

    One ``score_fn`` call per ``D`` call. ``x_hat`` ``(B, *dims)``; ``sigma`` a scalar or ``B`` values in
    ``[sigma(0), sigma(T)]`` (``ValueError`` otherwise); returns a tensor like ``x_hat``.
    (``m`` and ``s`` are recomputed from ``t`` so that ``D`` is exact Tweedie at the time the score is
    evaluated; ``s / m`` equals ``sigma`` up to rounding.)
    """
    _check_sde(sde)
    if not callable(score_fn):
        raise TypeError(f"score_fn must be callable as score_fn(x, t); got {type(score_fn).__name__}")

    def D(x_hat: torch.Tensor, sigma) -> torch.Tensor:
        sig = _batch_sigma(sigma, x_hat)
        t = t_of_sigma(sde, sig.to(torch.float64))
        m, s = sde.marginal_coef(t)
        m, s, t = (v.to(x_hat.dtype) for v in (m, s, t))
        mb, sb = batch_broadcast(m, x_hat), batch_broadcast(s, x_hat)
        x = mb * x_hat
        return (x + sb * sb * score_fn(x, t)) / mb

    return D


def score_fn(D: Denoiser, sde: SDE) -> ScoreFn:
    """scoresde ``score_fn(x, t) = grad log p_t(x)`` of ``sde`` from an EDM denoiser ``D(x_hat, sigma)``.

    ``(m, s) = sde.marginal_coef(t)``, ``sigma = s / m``, ``x_hat = x / m`` and::

        score(x, t) = (m D(x_hat; sigma) - x) / s^2

    ``D`` is called with ``x_hat`` ``(B, *dims)`` and ``sigma`` ``(B,)``. ``t`` ``(B,)`` or a scalar in ``[0, T]``;
    ``s(t)`` must be > 0 (a VP / sub-VP score is undefined at ``t = 0``). Returns a tensor like ``x``.
    One ``D`` call per call.
    """
    _check_sde(sde)
    if not callable(D):
        raise TypeError(f"D must be callable as D(x_hat, sigma); got {type(D).__name__}")

    def score(x: torch.Tensor, t) -> torch.Tensor:
        t = as_time(t, x, sde.T)
        m, s = sde.marginal_coef(t)
        mb, sb = batch_broadcast(m, x), batch_broadcast(s, x)
        return (mb * D(x / mb, s / m) - x) / (sb * sb)

    return score
