"""UniPC (Zhao et al. 2023): the unified predictor (UniP-p) and corrector (UniC-p); data (default) or noise prediction.

Notation as in ``dpm_solver_pp.py``: a step ``t_i -> t_{i+1}``, ``h = lambda_{i+1} - lambda_i``, ``D_j = x0_hat(x_j, t_j)``.
With ``z = -h``, ``phi_1(z) = (e^z - 1)/z``, ``phi_{k+1}(z) = (phi_k(z) - 1/k!)/z`` and ``B(h) = h`` (``bh1``) or
``e^h - 1`` (``bh2``) (both signs carried by ``z``: ``B = z`` or ``expm1(z)``)::

    x_{i+1} = (s_{i+1}/s_i) x_i + m_{i+1} psi1(h) D_i - m_{i+1} B [sum_k a_k (D_{i-k} - D_i)/r_k  (+ a_p (D_{i+1} - D_i))]

with ``r_k = (lambda_{i-k} - lambda_i)/h``. UniP-p (predictor, the sum over ``k = 1..p-1``) takes ``a`` from
``sum_k a_k r_k^{j-1} = g_j``, ``j = 1..p-1``; UniC-p (corrector, ``r_p = 1`` and the new prediction ``D_{i+1}``
included) from ``j = 1..p``; ``g_j = z phi_{j+1}(z) j! / B``. UniP-2 and UniC-1 use ``a = 1/2``. The corrector reuses
the prediction ``D_{i+1}`` made at the predicted state for the next step, so it costs no score call and raises the
order by one (UniPC-p is of order ``p + 1``).
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from .._validate import check_choice
from ..sde import SDE
from ._common import Callback, Noise, ScoreFn, _check_bool, coef, end_time, final_denoise, log_snr, progress_bar, time_grid
from .dpm_solver_pp import PREDICTIONS, _predict
from .fast import LOWER_ORDER_FINAL_BELOW

__all__ = ["sample_unipc", "UNIPC_VARIANTS", "check_unipc_options"]

UNIPC_VARIANTS = ("bh1", "bh2")


def _g(z: float, p: int, variant: str) -> tuple[list[float], float]:
    """``[g_1, ..., g_p]`` and ``B`` for ``z = -h`` (data prediction) or ``z = h`` (noise prediction)."""
    B = z if variant == "bh1" else math.expm1(z)
    # phi_{j+1}(z) z by the recursion z phi_{k+1} = phi_k - 1/k!, starting from phi_1 = expm1(z)/z
    phi = math.expm1(z) / z
    g, fact = [], 1.0
    for j in range(1, p + 1):
        phi_next_z = phi - 1.0 / fact  # z phi_{j+1}(z)
        g.append(phi_next_z * fact / B)
        phi = phi_next_z / z
        fact *= j + 1
    return g, B


def _coefficients(rks: list[float], g: list[float], n: int) -> torch.Tensor:
    """Solve ``sum_k a_k r_k^{j-1} = g_j``, ``j = 1..n``, for ``a`` (``n`` unknowns, float64)."""
    R = torch.tensor([[r ** (j - 1) for r in rks[:n]] for j in range(1, n + 1)], dtype=torch.float64)
    return torch.linalg.solve(R, torch.tensor(g[:n], dtype=torch.float64))


def _unipc_update(x, lam, ms, D_hist, lam_hist, h, p, variant, prediction, D_new=None):
    """UniP-p (``D_new is None``) or UniC-p (``D_new = D_{i+1}``) from ``x = x_i``; ``ms = (m, s)`` at ``t_i`` and
    ``t_{i+1}``; ``D_hist[-1] = D_i`` (model outputs in ``prediction`` form). No score call.

    ``x_{i+1} = A x_i - K [expm1(z) D_i + B sum_k a_k D1_k]`` with ``(A, K, z) = (s_{i+1}/s_i, m_{i+1}, -h)`` (data) or
    ``(m_{i+1}/m_i, s_{i+1}, h)`` (noise)."""
    (m0, s0), (m1, s1) = ms
    A, K, z = (s1 / s0, m1, -h) if prediction == "data" else (m1 / m0, s1, h)
    D0 = D_hist[-1]
    rks = [(lam_hist[-1 - k] - lam) / h for k in range(1, p)]
    D1s = [(D_hist[-1 - k] - D0) / r for k, r in zip(range(1, p), rks)]
    g, B = _g(z, p, variant)
    out = A * x - (K * math.expm1(z)) * D0
    if D_new is None:  # predictor: p - 1 differences
        if p == 1:
            return out
        a = [0.5] if p == 2 else _coefficients(rks, g, p - 1).tolist()
        terms = D1s
    else:  # corrector: p - 1 differences and the new prediction at r = 1
        a = [0.5] if p == 1 else _coefficients(rks + [1.0], g, p).tolist()
        terms = D1s + [D_new - D0]
    res = sum(ak * dk for ak, dk in zip(a, terms))
    return out - (K * B) * res


def sample_unipc(score_fn: ScoreFn, sde: SDE, x: torch.Tensor, noise: Optional[Noise] = None, callback: Optional[Callback] = None,
                 progress: bool = False, /, *, steps: int = 20, eps: Optional[float] = None, denoise: bool = False,
                 schedule: str = "logSNR", rho: float = 7.0, order: int = 3, variant: str = "bh1", corrector: bool = True,
                 lower_order_final: bool = True, prediction: str = "data") -> tuple[torch.Tensor, dict]:
    """UniPC (Zhao et al. 2023), multistep, from ``x = x_T`` ``(B, *dims)`` over
    ``time_grid(sde, steps, eps, schedule, rho)`` (``eps=None``: ``default_eps(sde)``); see the module docstring.

    Step ``i`` predicts with UniP-``p``, ``p = min(order, i + 1)`` (and, with ``lower_order_final`` and fewer than
    ``LOWER_ORDER_FINAL_BELOW`` steps, ``p <= steps - i``); with ``corrector``, the state it reaches is corrected by
    UniC-``p`` using the score call made there for the next step (none after the last step). ``variant``: ``bh1``
    (``B(h) = h``, the paper's choice for unconditional sampling) or ``bh2`` (``B(h) = e^h - 1``). One score call per
    step (+ 1 with ``denoise``: Tweedie at ``eps``). ``prediction``: ``data`` (``x0_hat``, the paper's default) or ``noise``
    (``eps_hat``; module docstring with ``(A, K, z)`` of ``_unipc_update``). Any SDE with ``m``, ``s`` (VP, sub-VP, VE); deterministic.
    Returns ``x_0`` ``(B, *dims)`` and ``info`` (``steps``, ``eps``).
    """
    eps = end_time(sde, eps)
    tl = time_grid(sde, steps, eps, schedule, rho).tolist()
    lams = [log_snr(sde, t) for t in tl]
    mss = [coef(sde, t) for t in tl]
    D_hist, lam_hist = [], []
    prev = None  # (x_{i-1}, p of its step) for the corrector
    for i in progress_bar(steps, progress, f"unipc-{order}"):
        D = _predict(score_fn, sde, x, tl[i], prediction)
        if prev is not None and corrector:
            x_prev, p_prev = prev
            x = _unipc_update(x_prev, lams[i - 1], (mss[i - 1], mss[i]), D_hist, lam_hist, lams[i] - lams[i - 1], p_prev,
                              variant, prediction, D_new=D)
            if callback is not None:
                callback(x, tl[i])
        D_hist, lam_hist = (D_hist + [D])[-order:], (lam_hist + [lams[i]])[-order:]
        p = min(order, i + 1)
        if lower_order_final and steps < LOWER_ORDER_FINAL_BELOW:
            p = min(p, steps - i)
        prev = (x, p)
        x = _unipc_update(x, lams[i], (mss[i], mss[i + 1]), D_hist, lam_hist, lams[i + 1] - lams[i], p, variant, prediction)
        if callback is not None and (i == steps - 1 or not corrector):
            callback(x, tl[i + 1])
    if denoise:
        x = final_denoise(score_fn, sde, x, eps, callback)
    return x, {"steps": steps, "eps": eps}


def check_unipc_options(o: dict) -> None:
    """The rules on ``sample_unipc``'s own options; ``ValueError`` naming the option."""
    check_choice("order", o["order"], (1, 2, 3))
    check_choice("variant", o["variant"], UNIPC_VARIANTS)
    _check_bool("corrector", o["corrector"])
    _check_bool("lower_order_final", o["lower_order_final"])
    check_choice("prediction", o["prediction"], PREDICTIONS)
