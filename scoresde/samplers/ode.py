"""Probability-flow ODE sampling (Song et al. 2021, eq. 13) with torchdiffeq or scipy.

    dx/dt = f(x, t) - 1/2 g(t)^2 score(x, t),   integrated from t = T down to t = eps.
"""

from __future__ import annotations

import numpy as np
import torch

from ..sde import SDE
from ._common import ScoreFn, full_t

__all__ = ["ADAPTIVE_ODE_METHODS", "FIXED_ODE_METHODS", "ODE_METHODS", "ERROR_NORMS", "probability_flow_drift", "sample_ode",
           "per_sample_rms_norm"]

ADAPTIVE_ODE_METHODS = ("dopri5", "dopri8", "bosh3", "adaptive_heun", "scipy_rk45")
FIXED_ODE_METHODS = ("euler", "midpoint", "rk4")
ODE_METHODS = ADAPTIVE_ODE_METHODS + FIXED_ODE_METHODS
# error norm of an adaptive solve of a batch (here and in ``scoresde.likelihood``): ``"per_sample"`` is
# ``per_sample_rms_norm`` (the tolerance holds for every sample), ``"batch"`` torchdiffeq's RMS over the whole state
ERROR_NORMS = ("per_sample", "batch")


def probability_flow_drift(score_fn: ScoreFn, sde: SDE, t_min: float = 0.0):
    """``F(t, x) = f(x, t) - 1/2 g(t)^2 score(x, t)`` with scalar ``t``, ``x (B, *dims)`` -> shape of ``x`` (one score call).

    ``t`` is clamped to ``[t_min, T]`` (a solver's initial-step heuristic may probe beyond the interval)."""
    rsde = sde.reverse(score_fn, probability_flow=True)

    def F(t, x):
        drift, _ = rsde.sde(x, full_t(min(max(float(t), t_min), sde.T), x))
        return drift

    return F


def per_sample_rms_norm(batch: int):
    """Error norm for torchdiffeq: the largest per-sample RMS, so the tolerance holds for every sample
    (torchdiffeq's default RMS over the whole batch only controls the average sample)."""

    def norm(v: torch.Tensor) -> torch.Tensor:
        return v.reshape(batch, -1).pow(2).mean(1).sqrt().max()

    return norm


def sample_ode(score_fn: ScoreFn, sde: SDE, x: torch.Tensor, ts: torch.Tensor, ode_method: str = "dopri5", rtol: float = 1e-5,
               atol: float = 1e-5, error_norm: str = "per_sample", trajectory: list | None = None) -> tuple[torch.Tensor, dict]:
    """Integrate the probability-flow ODE from ``x_T`` (``(B, *dims)``) at ``ts[0] = T`` to ``ts[-1] = eps``.

    * fixed-grid ``euler``/``midpoint``/``rk4`` (torchdiffeq; rk4 is its 3/8-rule 4th-order method) step on the grid ``ts``;
    * adaptive torchdiffeq methods (``dopri5`` ...) use ``rtol``/``atol`` and output at ``ts``; ``error_norm``
      ``"per_sample"`` (default, max over samples of the per-sample RMS) or ``"batch"`` (torchdiffeq's RMS over all);
    * ``scipy_rk45``: ``scipy.integrate.solve_ivp(method="RK45")`` on the flattened batch in float64
      (the paper's setting; its RMS error norm is over the whole batch).

    Returns ``x_eps`` (shape of ``x``) and an info dict. Appends the states at ``ts[1:]`` to ``trajectory``.
    """
    F = probability_flow_drift(score_fn, sde, float(ts[-1]))
    info = {"ode_method": ode_method}
    if ode_method not in FIXED_ODE_METHODS:
        info.update(rtol=rtol, atol=atol, error_norm="batch" if ode_method == "scipy_rk45" else error_norm)
    if ode_method == "scipy_rk45":
        from scipy.integrate import solve_ivp

        shape, dtype, device = x.shape, x.dtype, x.device

        def fun(t, y):
            xt = torch.from_numpy(y).reshape(shape).to(device=device, dtype=dtype)
            with torch.no_grad():
                return F(t, xt).detach().to("cpu", torch.float64).numpy().reshape(-1)

        tl = ts.tolist()
        y0 = x.detach().to("cpu", torch.float64).numpy().reshape(-1)
        sol = solve_ivp(fun, (tl[0], tl[-1]), y0, method="RK45", rtol=rtol, atol=atol, t_eval=np.asarray(tl))
        if not sol.success:
            raise RuntimeError(f"scipy solve_ivp failed: {sol.message}")
        xs = torch.from_numpy(sol.y.T.copy()).reshape((len(tl),) + tuple(shape)).to(device=device, dtype=dtype)
        info["scipy_nfev"] = int(sol.nfev)
    else:
        from torchdiffeq import odeint

        tt = ts.to(device=x.device, dtype=x.dtype if x.dtype == torch.float64 else torch.float32)
        if ode_method in FIXED_ODE_METHODS:
            xs = odeint(F, x, tt, method=ode_method)
        else:
            # step_t: land a step exactly on eps, so no stage is evaluated beyond it (torchdiffeq otherwise steps past and interpolates)
            options = {"step_t": tt[-1:]}
            if error_norm == "per_sample":
                options["norm"] = per_sample_rms_norm(x.shape[0])
            xs = odeint(F, x, tt, rtol=rtol, atol=atol, method=ode_method, options=options)
    if trajectory is not None:
        trajectory.extend(xs[1:])
    return xs[-1], info
