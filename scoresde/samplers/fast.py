"""Fast deterministic (and DDIM's stochastic) solvers written against ``m(t)``, ``s(t)`` only.

Notation: ``x_t = m(t) x_0 + s(t) z``; ``lambda(t) = log(m/s)`` (half log-SNR); the noise prediction
``eps_hat(x, t) = -s(t) score(x, t)`` and the data prediction ``x0_hat = (x - s eps_hat) / m``.
A step goes from ``t`` to ``s < t`` with ``h = lambda(s) - lambda(t) > 0``. Shapes: ``x (B, *dims)``.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from ..sde import SDE
from ._common import (
    Callback, Noise, ScoreFn, coef, end_time, final_denoise, full_t, log_snr, progress_bar, t_from_log_snr, time_grid, transition,
)

__all__ = ["ddim_step", "sample_ddim", "sample_dpm_solver", "sample_heun", "check_schedule", "LOWER_ORDER_FINAL_BELOW", "HEUN_SIGMA_MAX"]

# multistep DPM-Solver drops to lower order in its last steps when it runs fewer steps than this
LOWER_ORDER_FINAL_BELOW = 15
# the largest sigma(T) = s(T)/m(T) Heun is used for (``check_schedule``)
HEUN_SIGMA_MAX = 1e4


def check_schedule(sde: SDE, method: str, dtype: torch.dtype) -> None:
    """Refuse an SDE whose end point is outside what ``method`` computes soundly in ``dtype`` (``ValueError`` with the
    reason), before any score call. With ``m = m(T)`` and ``sigma = s(T)/m(T)``:

    * ``ddim``: ``x0_hat = (x - s eps_hat)/m`` must not overflow: ``-log m <= log(max of dtype) - 10`` (float32: 78.7;
      VP ``beta_max`` up to ~315; float64 ~2800). Measured (2-D mixture, exact score, 2000 samples, 50 steps): sound
      at ``beta_max`` 200 in float32, all-NaN at 999 (the issue's case).
    * ``dpm_solver``: the first step's ``x0_hat`` keeps a digit: ``m >= eps of dtype`` (float32: ``-log m <= 15.9``,
      VP ``beta_max`` up to ~63; float64: 36.0, ~144). Measured (20 steps): std 0.866 for 0.914 at ``beta_max`` 100 in
      float32, 5.5e8 at 200; 1.4e75 at 999 in float64.
    * ``heun``: ``sigma(T) <= HEUN_SIGMA_MAX`` (1e4; EDM's own range is 80, VE configs use up to 1348). Measured (18
      Karras steps): std 0.99 for 0.955 at ``beta_max`` 20 (``sigma`` 152), 1.6 at 50 (2.7e5), 294 at 100.
    """
    m, st = coef(sde, float(sde.T))
    neg_log_m = -math.log(m) if m > 0 else math.inf
    info = torch.finfo(dtype)
    why = None
    if method == "ddim" and neg_log_m > math.log(info.max) - 10:
        why = f"x0 = (x - s eps)/m overflows {dtype} (-log m(T) = {neg_log_m:.4g} > {math.log(info.max) - 10:.4g})"
    elif method == "dpm_solver" and neg_log_m > -math.log(info.eps):
        why = f"m(T) = {m:.3g} is below {dtype}'s resolution {info.eps:.3g}: its data prediction keeps no digit"
    elif method == "heun" and st / m > HEUN_SIGMA_MAX:
        why = f"sigma(T) = s(T)/m(T) = {st / m:.3g} is above {HEUN_SIGMA_MAX:g}, where 18-step Heun loses the samples"
    if why:
        raise ValueError(f"method={method!r} cannot sample {sde!r} soundly: {why}. Use a smaller beta_max / sigma_max, "
                         f"{'dtype=torch.float64, ' if dtype != torch.float64 and method != 'heun' else ''}"
                         "or method='pc' / 'ode'")


def _eps_hat(score_fn: ScoreFn, sde: SDE, x: torch.Tensor, t: float) -> torch.Tensor:
    """``eps_hat = -s(t) score(x, t)``; one score call."""
    return -coef(sde, t)[1] * score_fn(x, full_t(t, x))


# --- DDIM -------------------------------------------------------------------------------------
def ddim_step(score_fn: ScoreFn, sde: SDE, x: torch.Tensor, t: float, s: float, eta: float, noise: Noise) -> torch.Tensor:
    """DDIM (Song, Meng & Ermon 2021, eq. 12) in the ``(m, s)`` form::

        x_s = m(s) x0_hat + sqrt(s(s)^2 - sigma^2) eps_hat + sigma z,
        sigma = eta sqrt(G^2 s(s)^2 / s(t)^2),   G^2 = s(t)^2 - (m(t)/m(s))^2 s(s)^2

    ``eta = 0``: deterministic (= DPM-Solver-1); ``eta = 1``: the ancestral posterior step. One score call.
    """
    mt, st = coef(sde, t)
    ms, ss = coef(sde, s)
    e = _eps_hat(score_fn, sde, x, t)
    x0 = (x - st * e) / mt
    if eta == 0:
        return ms * x0 + ss * e
    _, G2 = transition(sde, s, t)
    sigma2 = eta * eta * G2 * ss * ss / (st * st)
    return ms * x0 + math.sqrt(max(ss * ss - sigma2, 0.0)) * e + math.sqrt(sigma2) * noise.randn_like(x)


def sample_ddim(score_fn: ScoreFn, sde: SDE, x: torch.Tensor, noise: Noise, callback: Optional[Callback] = None, progress: bool = False,
                /, *, steps: int = 50, eps: Optional[float] = None, denoise: bool = False, schedule: str = "time_uniform",
                rho: float = 7.0, eta: float = 0.0) -> tuple[torch.Tensor, dict]:
    """DDIM (Song, Meng & Ermon 2021; ``ddim_step``) from ``x = x_T`` ``(B, *dims)`` over the grid
    ``time_grid(sde, steps, eps, schedule, rho)`` (``eps=None``: ``default_eps(sde)``), ``eta`` in ``[0, 1]``;
    then, with ``denoise``, Tweedie's denoising at ``eps``. VP and sub-VP only. NFE ``steps`` (+ 1).
    Returns ``x_0`` ``(B, *dims)`` and ``info`` (``steps``, ``eps``)."""
    check_schedule(sde, "ddim", x.dtype)
    eps = end_time(sde, eps)
    tl = time_grid(sde, steps, eps, schedule, rho).tolist()
    for i in progress_bar(steps, progress, "ddim"):
        x = ddim_step(score_fn, sde, x, tl[i], tl[i + 1], eta, noise)
        if callback is not None:
            callback(x, tl[i + 1])
    if denoise:
        x = final_denoise(score_fn, sde, x, eps, callback)
    return x, {"steps": steps, "eps": eps}


# --- DPM-Solver (Lu et al. 2022), noise-prediction form -----------------------------------------
# x_s = (m_s/m_t) x_t - m_s int_{lambda_t}^{lambda_s} e^{-lambda} eps_hat(lambda) d lambda, and with the Taylor
# expansion eps_hat = sum_k eps^(k) (lambda - lambda_t)^k / k!:
#   x_s = (m_s/m_t) x_t - s_s [ phi1 eps + phi2 eps' + phi3 eps'' ],
#   phi1 = e^h - 1,  phi2 = e^h - 1 - h,  phi3 = e^h - 1 - h - h^2/2.
def _phis(h: float) -> tuple[float, float, float]:
    p1 = math.expm1(h)
    return p1, p1 - h, p1 - h - 0.5 * h * h


def _dpm_singlestep(score_fn, sde, x, t, s, order, e_t=None):
    """One singlestep DPM-Solver step ``t -> s`` of ``order`` 1, 2 or 3 (Lu et al. 2022, Alg. 1 and 2 with
    ``r1 = 1/2``; ``r1 = 1/3, r2 = 2/3``), with intermediate points at ``lambda_t + r h``. ``order`` score calls."""
    mt, _ = coef(sde, t)
    ms, ss = coef(sde, s)
    lt, ls = log_snr(sde, t), log_snr(sde, s)
    h = ls - lt
    e_t = _eps_hat(score_fn, sde, x, t) if e_t is None else e_t
    p1, p2, _ = _phis(h)
    if order == 1:
        return (ms / mt) * x - ss * p1 * e_t

    def to_r(r, correction=None):
        """State at ``lambda_t + r h`` from the first-order step plus an optional ``phi2`` correction."""
        u = t_from_log_snr(sde, lt + r * h)
        mu, su = coef(sde, u)
        q1, q2, _ = _phis(r * h)
        xu = (mu / mt) * x - su * q1 * e_t
        if correction is not None:
            xu = xu - su * q2 * correction
        return xu, u

    if order == 2:
        r1 = 0.5
        x1, u1 = to_r(r1)
        d1 = (_eps_hat(score_fn, sde, x1, u1) - e_t) / (r1 * h)  # ~ eps'
        return (ms / mt) * x - ss * (p1 * e_t + p2 * d1)
    r1, r2 = 1.0 / 3.0, 2.0 / 3.0
    x1, u1 = to_r(r1)
    d1 = (_eps_hat(score_fn, sde, x1, u1) - e_t) / (r1 * h)
    x2, u2 = to_r(r2, correction=d1)
    d2 = (_eps_hat(score_fn, sde, x2, u2) - e_t) / (r2 * h)
    return (ms / mt) * x - ss * (p1 * e_t + p2 * d2)


def _dpm_multistep(sde, x, t, s, hist_lam, hist_eps, order):
    """One multistep DPM-Solver step ``t -> s`` from the last ``order`` noise predictions (``hist_eps[-1]`` at ``t``);
    ``eps'`` and ``eps''`` at ``lambda_t`` from the interpolating polynomial through them. No score call."""
    mt, _ = coef(sde, t)
    ms, ss = coef(sde, s)
    lt, ls = hist_lam[-1], log_snr(sde, s)
    h = ls - lt
    p1, p2, p3 = _phis(h)
    e0 = hist_eps[-1]
    out = (ms / mt) * x - ss * p1 * e0
    if order >= 2:
        h0 = lt - hist_lam[-2]
        dd0 = (e0 - hist_eps[-2]) / h0
        if order == 2:
            return out - ss * p2 * dd0
        h1 = hist_lam[-2] - hist_lam[-3]
        dd1 = (hist_eps[-2] - hist_eps[-3]) / h1
        ddd = (dd0 - dd1) / (h0 + h1)  # second divided difference: eps'' ~ 2 ddd
        return out - ss * (p2 * (dd0 + h0 * ddd) + p3 * 2.0 * ddd)
    return out


def sample_dpm_solver(score_fn: ScoreFn, sde: SDE, x: torch.Tensor, noise: Optional[Noise] = None, callback: Optional[Callback] = None,
                      progress: bool = False, /, *, steps: int = 20, eps: Optional[float] = None, denoise: bool = False,
                      schedule: str = "logSNR", rho: float = 7.0, order: int = 3, multistep: bool = True,
                      lower_order_final: bool = True) -> tuple[torch.Tensor, dict]:
    """DPM-Solver (Lu et al. 2022), noise-prediction form, from ``x = x_T`` ``(B, *dims)`` over the grid
    ``time_grid(sde, steps, eps, schedule, rho)`` (``eps=None``: ``default_eps(sde)``)::

        x_s = (m_s/m_t) x_t - s_s [phi1(h) eps_hat + phi2(h) eps_hat' + phi3(h) eps_hat''],   h = lambda(s) - lambda(t)

    * singlestep: every step is DPM-Solver-``order`` (``order`` score calls per step);
    * multistep: one score call per step, step ``i`` of order ``min(order, i + 1)`` (warm-up), and, with
      ``lower_order_final`` and fewer than ``LOWER_ORDER_FINAL_BELOW`` steps, at most ``steps - i`` so the
      last step is first order (multistep solvers are unstable at few steps otherwise).
    Order 1 is DDIM with ``eta = 0``. With ``denoise``, Tweedie's denoising at ``eps`` afterwards (one more score call).
    VP and sub-VP only; deterministic (``noise`` unused). Returns ``x_0`` ``(B, *dims)`` and ``info`` (``steps``, ``eps``).
    """
    check_schedule(sde, "dpm_solver", x.dtype)
    eps = end_time(sde, eps)
    tl = time_grid(sde, steps, eps, schedule, rho).tolist()
    n = steps
    hist_lam, hist_eps = [], []
    for i in progress_bar(n, progress, f"dpm_solver-{order}{'M' if multistep else 'S'}"):
        t, s = tl[i], tl[i + 1]
        if multistep:
            hist_lam.append(log_snr(sde, t))
            hist_eps.append(_eps_hat(score_fn, sde, x, t))
            hist_lam, hist_eps = hist_lam[-3:], hist_eps[-3:]
            k = min(order, i + 1)
            if lower_order_final and n < LOWER_ORDER_FINAL_BELOW:
                k = min(k, n - i)
            x = _dpm_multistep(sde, x, t, s, hist_lam, hist_eps, k)
        else:
            x = _dpm_singlestep(score_fn, sde, x, t, s, order)
        if callback is not None:
            callback(x, s)
    if denoise:
        x = final_denoise(score_fn, sde, x, eps, callback)
    return x, {"steps": steps, "eps": eps}


# --- Heun in the EDM parameterisation ---------------------------------------------------------
def heun_step(score_fn, sde, xh: torch.Tensor, here: tuple, there: tuple) -> torch.Tensor:
    """One EDM Heun step of ``dx̂/dσ = ε̂(m x̂, t)`` in ``x̂ = x / m`` from ``here = (t, m, σ)`` to ``there`` (2 NFE):
    ``d = ε̂(m x̂, t)``, ``x' = x̂ + (σ' − σ) d``, ``x̂ ← x̂ + (σ' − σ) (d + ε̂(m' x', t')) / 2``. Shapes: ``xh (B, ...)``."""
    (t, m, sig), (t_next, m_next, sig_next) = here, there
    dsig = sig_next - sig
    d = _eps_hat(score_fn, sde, m * xh, t)
    xp = xh + dsig * d
    d2 = _eps_hat(score_fn, sde, m_next * xp, t_next)
    return xh + dsig * 0.5 * (d + d2)


def sample_heun(score_fn: ScoreFn, sde: SDE, x: torch.Tensor, noise: Optional[Noise] = None, callback: Optional[Callback] = None,
                progress: bool = False, /, *, steps: int = 18, eps: Optional[float] = None, denoise: bool = False,
                schedule: str = "karras", rho: float = 7.0) -> tuple[torch.Tensor, dict]:
    """Heun's 2nd-order method on the probability-flow ODE in EDM's variables (Karras et al. 2022, Alg. 1, no churn),
    from ``x = x_T`` ``(B, *dims)`` over the grid ``time_grid(sde, steps, eps, schedule, rho)`` (default Karras' sigmas
    with ``rho = 7``; ``eps=None``: ``default_eps(sde)``); any SDE.

    ``sigma = s(t)/m(t)``, ``x_hat = x / m(t)``: ``d x_hat / d sigma = (x_hat - D(x_hat; sigma)) / sigma = eps_hat(m x_hat, t)``,
    ``t = t_from_log_snr(-log sigma)`` (the grid already holds these times). Each step::

        d = eps_hat(x_i, t_i);  x' = x_hat + (sigma_{i+1} - sigma_i) d;  d' = eps_hat(m_{i+1} x', t_{i+1})
        x_hat <- x_hat + (sigma_{i+1} - sigma_i) (d + d') / 2

    Ends at ``sigma(eps) > 0``, so every step is a Heun step: ``2 steps`` score calls (+ 1 with ``denoise``: Tweedie at
    ``eps``). Deterministic (``noise`` unused). Returns ``x_0 = m(eps) x_hat`` ``(B, *dims)`` and ``info`` (``steps``, ``eps``).
    """
    check_schedule(sde, "heun", x.dtype)
    eps = end_time(sde, eps)
    tl = time_grid(sde, steps, eps, schedule, rho).tolist()
    ms = [coef(sde, t) for t in tl]
    sig = [s / m for m, s in ms]
    xh = x / ms[0][0]
    for i in progress_bar(steps, progress, "heun"):
        xh = heun_step(score_fn, sde, xh, (tl[i], ms[i][0], sig[i]), (tl[i + 1], ms[i + 1][0], sig[i + 1]))
        if callback is not None:
            callback(ms[i + 1][0] * xh, tl[i + 1])
    x = ms[-1][0] * xh
    if denoise:
        x = final_denoise(score_fn, sde, x, eps, callback)
    return x, {"steps": steps, "eps": eps}
