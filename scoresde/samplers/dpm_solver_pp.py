"""DPM-Solver++ (Lu et al. 2022b, data prediction) and DPM-Solver with adaptive step size (Lu et al. 2022, Sec. 5 / App. C).

Notation as in ``fast.py``: ``x_t = m(t) x_0 + s(t) z``, ``lambda(t) = log(m/s)``; a step goes from ``t`` to ``s < t``
with ``h = lambda(s) - lambda(t) > 0``. Both predictions integrate the probability-flow ODE exactly in its linear
part (an exponential integrator) and Taylor-expand the network's output ``P`` in ``lambda``::

    data  (P = x0_hat):  x_s = (s_s/s_t) x_t + m_s [psi1(h) P + psi2(h) P' + psi3(h) P''],
                         psi1 = 1 - e^{-h},  psi2 = h - psi1,  psi3 = h^2/2 - psi2
    noise (P = eps_hat): x_s = (m_s/m_t) x_t - s_s [phi1(h) P + phi2(h) P' + phi3(h) P''],
                         phi1 = e^h - 1,    phi2 = phi1 - h,  phi3 = phi2 - h^2/2

(``P'`` the derivative in ``lambda`` at ``lambda_t``). Written against ``m(t)``, ``s(t)`` only, so they apply to VP,
sub-VP and VE (``m = 1``) alike. Shapes: ``x (B, *dims)``.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from .._validate import check_choice, check_in_range, check_positive
from ..sde import SDE
from ._common import (
    Callback, Noise, ScoreFn, _check_bool, coef, end_time, final_denoise, full_t, log_snr, progress_bar, t_from_log_snr,
    time_grid,
)
from .fast import LOWER_ORDER_FINAL_BELOW

__all__ = ["sample_dpm_solver_pp", "sample_dpm_solver_adaptive", "dynamic_threshold", "PREDICTIONS",
           "check_dpm_solver_pp_options", "check_dpm_solver_adaptive_options"]

PREDICTIONS = ("data", "noise")


# --- the model's output as data or noise prediction -------------------------------------------------
def dynamic_threshold(x0: torch.Tensor, ratio: float, max_value: float) -> torch.Tensor:
    """Dynamic thresholding (Saharia et al. 2022, Imagen): per sample ``c = quantile(|x0|, ratio)`` clamped to
    ``[1, max_value]``, then ``x0 <- clip(x0, -c, c) / c``; for data scaled to ``[-1, 1]``. Shape of ``x0``."""
    c = torch.quantile(x0.abs().reshape(x0.shape[0], -1), ratio, dim=1).clamp(1.0, max_value)
    c = c.reshape(-1, *([1] * (x0.dim() - 1)))
    return torch.maximum(torch.minimum(x0, c), -c) / c


def _predict(score_fn: ScoreFn, sde: SDE, x: torch.Tensor, t: float, prediction: str, threshold=None) -> torch.Tensor:
    """The model output in ``prediction`` form at ``(x, t)``: ``x0_hat = (x + s^2 score) / m`` (data; thresholded with
    ``threshold = (ratio, max_value)``) or ``eps_hat = -s score`` (noise). One score call; shape of ``x``."""
    m, s = coef(sde, t)
    score = score_fn(x, full_t(t, x))
    if prediction == "noise":
        return -s * score
    x0 = (x + (s * s) * score) / m
    return x0 if threshold is None else dynamic_threshold(x0, *threshold)


def _weights(h: float, prediction: str) -> tuple[float, float, float]:
    """``(psi1, psi2, psi3)`` (data) or ``(phi1, phi2, phi3)`` (noise) of the module docstring, for ``h > 0``."""
    if prediction == "data":
        w1 = -math.expm1(-h)
        w2 = h - w1
        return w1, w2, 0.5 * h * h - w2
    w1 = math.expm1(h)
    w2 = w1 - h
    return w1, w2, w2 - 0.5 * h * h


def _linear(sde: SDE, t: float, s: float, prediction: str) -> tuple[float, float, float]:
    """``(A, C, h)`` with ``x_s = A x_t + C sum_k w_{k+1}(h) P^(k)``: ``A = s_s/s_t, C = m_s`` (data) or
    ``A = m_s/m_t, C = -s_s`` (noise)."""
    mt, st = coef(sde, t)
    ms, ss = coef(sde, s)
    h = log_snr(sde, s) - log_snr(sde, t)
    return (ss / st, ms, h) if prediction == "data" else (ms / mt, -ss, h)


def _taylor_step(sde, x, t, s, prediction, derivs):
    """``x_s = A x_t + C sum_k w_{k+1}(h) derivs[k]`` with ``derivs = [P, P', P'']`` (any prefix)."""
    A, C, h = _linear(sde, t, s, prediction)
    w = _weights(h, prediction)
    out = A * x
    for wk, dk in zip(w, derivs):
        out = out + (C * wk) * dk
    return out


def _singlestep(pred, sde, x, t, s, order, P0, prediction, lower=False):
    """One singlestep exponential-integrator step ``t -> s`` of ``order`` 1, 2 (``r1 = 1/2``) or 3 (``r1 = 1/3``,
    ``r2 = 2/3``), intermediate points at ``lambda_t + r h`` (Lu et al. 2022, Alg. 1 / 2, Taylor form);
    ``P0 = pred(x, t)`` given. ``order - 1`` calls of ``pred(x, t)``. With ``lower``, also returns the
    solution one order lower from the same calls (order 2: DPM-Solver-1; order 3: DPM-Solver-2 with ``r1 = 1/3``)."""
    if order == 1:
        return _taylor_step(sde, x, t, s, prediction, [P0])
    h = log_snr(sde, s) - log_snr(sde, t)
    lt = log_snr(sde, t)
    r1 = 0.5 if order == 2 else 1.0 / 3.0
    u1 = t_from_log_snr(sde, lt + r1 * h)
    d1 = (pred(_taylor_step(sde, x, t, u1, prediction, [P0]), u1) - P0) / (r1 * h)  # ~ P'
    if order == 2:
        x_s = _taylor_step(sde, x, t, s, prediction, [P0, d1])
        return (x_s, _taylor_step(sde, x, t, s, prediction, [P0])) if lower else x_s
    r2 = 2.0 / 3.0
    u2 = t_from_log_snr(sde, lt + r2 * h)
    d2 = (pred(_taylor_step(sde, x, t, u2, prediction, [P0, d1]), u2) - P0) / (r2 * h)
    x_s = _taylor_step(sde, x, t, s, prediction, [P0, d2])
    return (x_s, _taylor_step(sde, x, t, s, prediction, [P0, d1])) if lower else x_s


# --- DPM-Solver++ -------------------------------------------------------------------------------------
def _pp_multistep(sde, x, t, s, hist_lam, hist_D, order):
    """One multistep DPM-Solver++ step ``t -> s`` from the last ``order`` data predictions (``hist_D[-1]`` at ``t``).

    Order 2 is the paper's DPM-Solver++(2M) (Lu et al. 2022b, Alg. 2): ``x_s = (s_s/s_t) x + m_s psi1(h) D``,
    ``D = (1 + 1/(2r)) D_0 - 1/(2r) D_{-1}``, ``r = h_{-1}/h``. Order 3: ``P'``, ``P''`` at ``lambda_t`` from the
    quadratic through the last three predictions. No score call."""
    h = log_snr(sde, s) - hist_lam[-1]
    D0 = hist_D[-1]
    if order == 1:
        return _taylor_step(sde, x, t, s, "data", [D0])
    h0 = hist_lam[-1] - hist_lam[-2]
    if order == 2:
        return _taylor_step(sde, x, t, s, "data", [D0 + (h / (2.0 * h0)) * (D0 - hist_D[-2])])
    h1 = hist_lam[-2] - hist_lam[-3]
    dd0 = (D0 - hist_D[-2]) / h0
    dd1 = (hist_D[-2] - hist_D[-3]) / h1
    ddd = (dd0 - dd1) / (h0 + h1)
    return _taylor_step(sde, x, t, s, "data", [D0, dd0 + h0 * ddd, 2.0 * ddd])


def sample_dpm_solver_pp(score_fn: ScoreFn, sde: SDE, x: torch.Tensor, noise: Optional[Noise] = None, callback: Optional[Callback] = None,
                         progress: bool = False, /, *, steps: int = 20, eps: Optional[float] = None, denoise: bool = False,
                         schedule: str = "logSNR", rho: float = 7.0, order: int = 2, multistep: bool = True,
                         lower_order_final: bool = True, thresholding: bool = False, threshold_ratio: float = 0.995,
                         threshold_max: float = 1.0) -> tuple[torch.Tensor, dict]:
    """DPM-Solver++ (Lu et al. 2022b), data prediction ``x0_hat = (x + s^2 score)/m``, from ``x = x_T`` ``(B, *dims)``
    over ``time_grid(sde, steps, eps, schedule, rho)`` (``eps=None``: ``default_eps(sde)``)::

        x_s = (s_s/s_t) x_t + m_s [psi1(h) x0_hat + psi2(h) x0_hat' + psi3(h) x0_hat''],   h = lambda(s) - lambda(t)

    * multistep (one score call per step): order 2 is the paper's 2M, order 3 the 3M; step ``i`` has order
      ``min(order, i + 1)`` and, with ``lower_order_final`` and fewer than ``LOWER_ORDER_FINAL_BELOW`` steps, at most
      ``steps - i`` (the last step first order);
    * singlestep (``order`` score calls per step): 2S with ``r1 = 1/2``, 3S with ``r1 = 1/3, r2 = 2/3``.

    Order 1 equals DDIM (``eta = 0``). ``thresholding``: dynamic thresholding of every ``x0_hat`` (``dynamic_threshold``
    with ``threshold_ratio``, ``threshold_max``) for data scaled to ``[-1, 1]``; then the final denoising is
    thresholded too. With ``denoise``, ``x_0 = x0_hat(x_eps, eps)`` (one more call). Any SDE with ``m``, ``s``
    (VP, sub-VP, VE); deterministic (``noise`` unused). Returns ``x_0`` ``(B, *dims)`` and ``info`` (``steps``, ``eps``).
    """
    eps = end_time(sde, eps)
    tl = time_grid(sde, steps, eps, schedule, rho).tolist()
    thr = (threshold_ratio, threshold_max) if thresholding else None

    def pred(xx, tt):
        return _predict(score_fn, sde, xx, tt, "data", thr)

    hist_lam, hist_D = [], []
    for i in progress_bar(steps, progress, f"dpm_solver++-{order}{'M' if multistep else 'S'}"):
        t, s = tl[i], tl[i + 1]
        D = pred(x, t)
        if multistep:
            hist_lam, hist_D = (hist_lam + [log_snr(sde, t)])[-3:], (hist_D + [D])[-3:]
            k = min(order, i + 1)
            if lower_order_final and steps < LOWER_ORDER_FINAL_BELOW:
                k = min(k, steps - i)
            x = _pp_multistep(sde, x, t, s, hist_lam, hist_D, k)
        elif order == 2:  # DPM-Solver++(2S), Alg. 1 with r = 1/2: x_s = (s_s/s_t) x + m_s psi1(h) D(u)
            u = t_from_log_snr(sde, 0.5 * (log_snr(sde, t) + log_snr(sde, s)))
            Du = pred(_taylor_step(sde, x, t, u, "data", [D]), u)
            x = _taylor_step(sde, x, t, s, "data", [Du])
        else:
            x = _singlestep(pred, sde, x, t, s, order, D, "data")
        if callback is not None:
            callback(x, s)
    if denoise:
        if thr is None:
            x = final_denoise(score_fn, sde, x, eps, callback)
        else:
            x = pred(x, eps)
            if callback is not None:
                callback(x, 0.0)
    return x, {"steps": steps, "eps": eps}


def check_dpm_solver_pp_options(o: dict) -> None:
    """The rules on ``sample_dpm_solver_pp``'s own options (``o`` completed with the defaults); ``ValueError``."""
    check_choice("order", o["order"], (1, 2, 3))
    _check_bool("multistep", o["multistep"])
    _check_bool("lower_order_final", o["lower_order_final"])
    _check_bool("thresholding", o["thresholding"])
    check_in_range("threshold_ratio", o["threshold_ratio"], 0.0, 1.0, low_closed=False)
    check_in_range("threshold_max", o["threshold_max"], 1.0, math.inf, high_closed=False)


# --- DPM-Solver with adaptive step size -------------------------------------------------------------------
def sample_dpm_solver_adaptive(score_fn: ScoreFn, sde: SDE, x: torch.Tensor, noise: Optional[Noise] = None,
                               callback: Optional[Callback] = None, progress: bool = False, /, *, steps: Optional[int] = None,
                               eps: Optional[float] = None, denoise: bool = False, order: int = 3, rtol: float = 0.05,
                               atol: float = 0.0078, h_init: float = 0.05, theta: float = 0.9,
                               prediction: str = "noise") -> tuple[torch.Tensor, dict]:
    """DPM-Solver with adaptive step size (Lu et al. 2022, Sec. 5, Alg. 4 "DPM-Solver-12 / -23") from ``x = x_T``
    ``(B, *dims)`` at ``T`` down to ``eps`` (``eps=None``: ``default_eps(sde)``); ``steps`` must be ``None``.

    From ``lambda_s`` a step of size ``h`` (in ``lambda``) is tried to ``t = t(lambda_s + h)`` with the singlestep
    solvers of orders ``order - 1`` and ``order`` sharing their score calls (``order`` per try: 1-2 with ``r1 = 1/2``,
    2-3 with ``r1 = 1/3, r2 = 2/3``)::

        delta = max(atol, rtol max(|x_low|, |x_s|)),   E = max over samples of RMS((x_high - x_low) / delta)
        E <= 1: accept x_high;   h <- min(theta h E^{-1/order}, lambda(eps) - lambda_s)

    Every sample's own error is held below 1 (the maximum over the batch, not a batch RMS). ``prediction``: ``noise``
    (DPM-Solver, the paper's) or ``data`` (the DPM-Solver++ formulas). Defaults are the paper's (``rtol 0.05``,
    ``atol 0.0078`` for data in ``[-1, 1]``, ``h_init 0.05``, ``theta 0.9``). With ``denoise``, Tweedie at ``eps``.
    Any SDE with ``m``, ``s``; deterministic. Returns ``x_0`` and ``info`` (``eps``, ``accepted``, ``rejected``).
    """
    eps = end_time(sde, eps)

    def pred(xx, tt):
        return _predict(score_fn, sde, xx, tt, prediction)

    lam_end = log_snr(sde, eps)
    s, lam_s, h = float(sde.T), log_snr(sde, float(sde.T)), h_init
    accepted = rejected = 0
    while lam_end - lam_s > 1e-12 * max(1.0, abs(lam_end)):
        h = min(h, lam_end - lam_s)
        t = eps if h >= lam_end - lam_s else t_from_log_snr(sde, lam_s + h)
        x_high, x_low = _singlestep(pred, sde, x, s, t, order, pred(x, s), prediction, lower=True)
        delta = torch.clamp(rtol * torch.maximum(x_low.abs(), x.abs()), min=atol)
        E = float(((x_high - x_low) / delta).pow(2).reshape(x.shape[0], -1).mean(1).sqrt().max())
        if not math.isfinite(E):
            raise RuntimeError(f"dpm_solver_adaptive: non-finite error estimate at t = {s:.6g} (the score returned inf/nan)")
        if E <= 1.0:
            x, s, lam_s = x_high, t, log_snr(sde, t) if t != eps else lam_end
            accepted += 1
            if callback is not None:
                callback(x, s)
        else:
            rejected += 1
        h = theta * h * max(E, 1e-16) ** (-1.0 / order)
        if h < 1e-10:
            raise RuntimeError(f"dpm_solver_adaptive: step size underflow at t = {s:.6g} (h = {h:.3g} in log-SNR); loosen rtol/atol")
    if denoise:
        x = final_denoise(score_fn, sde, x, eps, callback)
    return x, {"eps": eps, "accepted": accepted, "rejected": rejected}


def check_dpm_solver_adaptive_options(o: dict) -> None:
    """The rules on ``sample_dpm_solver_adaptive``'s own options; ``ValueError`` naming the option."""
    if o["steps"] is not None:
        raise ValueError(f"steps must be None for method='dpm_solver_adaptive' (its steps come from rtol/atol); got {o['steps']!r}")
    check_choice("order", o["order"], (2, 3))
    check_positive("rtol", o["rtol"])
    check_positive("atol", o["atol"])
    check_positive("h_init", o["h_init"])
    check_in_range("theta", o["theta"], 0.0, 1.0, low_closed=False, high_closed=False)
    check_choice("prediction", o["prediction"], PREDICTIONS)
