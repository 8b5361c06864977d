"""EDM's stochastic sampler (Karras et al. 2022, Alg. 2) in the variables of ``fast.sample_heun``.

``sigma = s(t)/m(t)``, ``x_hat = x / m(t)``; the PF-ODE is ``d x_hat / d sigma = eps_hat(m x_hat, t)``. Shapes ``x (B, *dims)``.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from .._validate import check_positive
from ..sde import SDE
from ._common import Callback, Noise, ScoreFn, coef, end_time, final_denoise, progress_bar, t_from_log_snr, time_grid
from .fast import heun_step

__all__ = ["sample_edm", "check_edm_options"]


def _gamma(sigma: float, steps: int, S_churn: float, S_tmin: float, S_tmax: float) -> float:
    """``gamma_i = min(S_churn / N, sqrt(2) - 1)`` for ``sigma_i in [S_tmin, S_tmax]``, else 0 (Alg. 2, line 4)."""
    return min(S_churn / steps, math.sqrt(2.0) - 1.0) if S_tmin <= sigma <= S_tmax else 0.0


def sample_edm(score_fn: ScoreFn, sde: SDE, x: torch.Tensor, noise: Optional[Noise] = None, callback: Optional[Callback] = None,
               progress: bool = False, /, *, steps: int = 18, eps: Optional[float] = None, denoise: bool = False,
               schedule: str = "karras", rho: float = 7.0, S_churn: float = 0.0, S_tmin: float = 0.0,
               S_tmax: float = math.inf, S_noise: float = 1.0) -> tuple[torch.Tensor, dict]:
    """EDM's stochastic sampler (Karras et al. 2022, Alg. 2) from ``x = x_T`` ``(B, *dims)`` over
    ``time_grid(sde, steps, eps, schedule, rho)`` (Karras' sigmas by default; ``eps=None``: ``default_eps(sde)``); any SDE.

    Each step first raises the noise level ``sigma_i`` to ``sigma_hat = sigma_i (1 + gamma_i)`` (capped at
    ``sigma(T)``: no time beyond ``T``), then takes the Heun step of ``fast.sample_heun`` from ``sigma_hat``::

        gamma_i = min(S_churn / steps, sqrt(2) - 1) if S_tmin <= sigma_i <= S_tmax else 0
        x_hat <- x_hat + sqrt(sigma_hat^2 - sigma_i^2) S_noise z,   z ~ N(0, I) (from ``noise``)
        d = eps_hat(m_hat x_hat, t_hat);  x' = x_hat + (sigma_{i+1} - sigma_hat) d;  d' = eps_hat(m_{i+1} x', t_{i+1})
        x_hat <- x_hat + (sigma_{i+1} - sigma_hat) (d + d') / 2

    With ``S_churn = 0`` (the default, as in k-diffusion) no noise is drawn and the result equals ``sample_heun``
    bitwise. ``2 steps`` score calls (+ 1 with ``denoise``). Returns ``x_0 = m(eps) x_hat`` and ``info`` (``steps``, ``eps``).
    """
    eps = end_time(sde, eps)
    tl = time_grid(sde, steps, eps, schedule, rho).tolist()
    ms = [coef(sde, t) for t in tl]
    sig = [s / m for m, s in ms]
    xh = x / ms[0][0]
    for i in progress_bar(steps, progress, "edm"):
        gamma = _gamma(sig[i], steps, S_churn, S_tmin, S_tmax)
        t_hat, m_hat, sig_hat = tl[i], ms[i][0], sig[i]
        if gamma > 0:
            sig_hat = min(sig[i] * (1.0 + gamma), sig[0])
            t_hat = t_from_log_snr(sde, -math.log(sig_hat)) if sig_hat < sig[0] else tl[0]
            m_hat = coef(sde, t_hat)[0]
            xh = xh + (math.sqrt(max(sig_hat ** 2 - sig[i] ** 2, 0.0)) * S_noise) * noise.randn_like(xh)
        xh = heun_step(score_fn, sde, xh, (t_hat, m_hat, sig_hat), (tl[i + 1], ms[i + 1][0], sig[i + 1]))
        if callback is not None:
            callback(ms[i + 1][0] * xh, tl[i + 1])
    x = ms[-1][0] * xh
    if denoise:
        x = final_denoise(score_fn, sde, x, eps, callback)
    return x, {"steps": steps, "eps": eps}


def check_edm_options(o: dict) -> None:
    """The rules on ``sample_edm``'s own options; ``ValueError`` naming the option."""
    check_positive("S_churn", o["S_churn"], allow_zero=True)
    check_positive("S_noise", o["S_noise"])
    tmin, tmax = o["S_tmin"], o["S_tmax"]
    check_positive("S_tmin", tmin, allow_zero=True)
    if isinstance(tmax, bool) or not isinstance(tmax, (int, float)) or math.isnan(tmax) or tmax < tmin:
        raise ValueError(f"S_tmax must be a number >= S_tmin = {tmin!r} (inf allowed); got {tmax!r}")
