"""Probability-flow ODE sampling (Song et al. 2021, eq. 13) with torchdiffeq or scipy.

    dx/dt = F(x, t) = f(x, t) - 1/2 g(t)^2 score(x, t),   integrated from t = T down to t = eps.

``probability_flow_drift`` (``F``), the solver names and the adaptive solvers' error control are shared with
``scoresde.likelihood``, which integrates the same ODE forward in time.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from ..sde import SDE
from ._common import Callback, Noise, ScoreFn, end_time, final_denoise, full_t, time_grid

__all__ = ["TORCHDIFFEQ_ADAPTIVE", "TORCHDIFFEQ_FIXED", "ADAPTIVE_ODE_METHODS", "FIXED_ODE_METHODS", "ODE_METHODS", "ERROR_NORMS",
           "FIXED_GRID_STEPS", "probability_flow_drift", "odeint_options", "per_sample_rms_norm", "sample_ode"]

# torchdiffeq's solvers: adaptive (step sizes from rtol/atol) and fixed-grid (steps on the given grid or a step_size)
TORCHDIFFEQ_ADAPTIVE = ("dopri5", "dopri8", "bosh3", "fehlberg2", "adaptive_heun")
TORCHDIFFEQ_FIXED = ("euler", "midpoint", "heun2", "heun3", "rk4", "explicit_adams", "implicit_adams")
# the sampler's ``ode_method``: torchdiffeq's solvers and scipy's RK45 (the likelihood takes torchdiffeq's only)
ADAPTIVE_ODE_METHODS = TORCHDIFFEQ_ADAPTIVE + ("scipy_rk45",)
FIXED_ODE_METHODS = TORCHDIFFEQ_FIXED
ODE_METHODS = ADAPTIVE_ODE_METHODS + FIXED_ODE_METHODS
# error norm of an adaptive solve of a batch (here and in ``scoresde.likelihood``): ``"per_sample"`` is
# ``per_sample_rms_norm`` (the tolerance holds for every sample), ``"batch"`` torchdiffeq's RMS over the whole state
ERROR_NORMS = ("per_sample", "batch")
# steps of a fixed-grid ``ode_method`` when ``steps=None`` (the adaptive methods choose their own)
FIXED_GRID_STEPS = 100


def probability_flow_drift(score_fn: ScoreFn, sde: SDE, t_min: float = 0.0):
    """The probability-flow ODE's drift as a solver's right-hand side::

        F(t, x) = f(x, t) - 1/2 g(t)^2 score(x, t)

    ``t`` a Python float or 0-d tensor, ``x`` ``(B, *dims)`` -> shape of ``x``; one score call. ``t`` is clamped
    to ``[t_min, T]`` (a solver's initial-step heuristic may probe beyond the interval: seen at t = 1.6 under VE).
    The one implementation for the sampler (``sample_ode``) and the likelihood (``log_likelihood``)."""
    rsde = sde.reverse(score_fn, probability_flow=True)

    def F(t, x):
        drift, _ = rsde.sde(x, full_t(min(max(float(t), t_min), sde.T), x))
        return drift

    return F


def per_sample_rms_norm(batch: int):
    """Error norm for torchdiffeq: the largest per-sample RMS, so the tolerance holds for every sample
    (torchdiffeq's default RMS over the whole batch only controls the average sample). The state's
    first dimension must be the batch."""

    def norm(v: torch.Tensor) -> torch.Tensor:
        return v.reshape(batch, -1).pow(2).mean(1).sqrt().max()

    return norm


def odeint_options(batch: int, t_end: torch.Tensor, error_norm: str, options: Optional[dict] = None) -> dict:
    """torchdiffeq ``options`` of an adaptive solve of a batch, on top of ``options``: ``step_t = t_end``
    (``(1,)``: land a step exactly on the end point, so no stage evaluates the score beyond it; torchdiffeq
    otherwise steps past and interpolates) and, for ``error_norm="per_sample"``, ``norm = per_sample_rms_norm``.
    Entries already in ``options`` win."""
    opts = dict(options or {})
    if error_norm == "per_sample":
        opts.setdefault("norm", per_sample_rms_norm(batch))
    opts.setdefault("step_t", t_end)
    return opts


def sample_ode(score_fn: ScoreFn, sde: SDE, x: torch.Tensor, noise: Optional[Noise] = None, callback: Optional[Callback] = None,
               progress: bool = False, /, *, steps: Optional[int] = None, eps: Optional[float] = None, denoise: bool = False,
               ode_method: str = "dopri5", rtol: float = 1e-5, atol: float = 1e-5, error_norm: str = "per_sample",
               trajectory_points: int = 11) -> tuple[torch.Tensor, dict]:
    """Integrate the probability-flow ODE ``dx/dt = F(x, t)`` from ``x = x_T`` ``(B, *dims)`` at ``T`` to ``eps``.

    * fixed-grid ``ode_method`` (``FIXED_ODE_METHODS``; ``rk4`` is torchdiffeq's 3/8-rule 4th-order method): ``steps``
      steps on the uniform grid ``time_grid(sde, steps, eps)`` (``steps=None``: ``FIXED_GRID_STEPS``);
    * adaptive torchdiffeq methods (``dopri5`` ...): ``steps`` must be ``None``; tolerances ``rtol``/``atol`` (1e-5 as
      in the paper) with ``error_norm`` ``"per_sample"`` (max over samples of the per-sample RMS) or ``"batch"``
      (torchdiffeq's RMS over all); with a ``callback`` the states at ``trajectory_points`` times uniform in ``[eps, T]``;
    * ``scipy_rk45``: ``scipy.integrate.solve_ivp(method="RK45")`` on the flattened batch in float64
      (the paper's setting; its RMS error norm is over the whole batch).

    ``eps=None``: ``default_eps(sde)``; ``denoise``: Tweedie's denoising at ``eps`` afterwards (off by default).
    ``noise`` is unused (deterministic); ``progress`` shows a bar of the integrated time ``T - t``. Returns ``x_0`` (shape of ``x``) and
    ``info`` (``steps``, ``eps``, ``ode_method``, the tolerances and ``error_norm`` used, ``scipy_nfev``).
    """
    eps = end_time(sde, eps)
    if ode_method in FIXED_ODE_METHODS:
        steps = FIXED_GRID_STEPS if steps is None else steps
        ts = time_grid(sde, steps, eps)
    else:
        ts = torch.linspace(float(sde.T), eps, trajectory_points if callback is not None else 2, dtype=torch.float64)
    F = probability_flow_drift(score_fn, sde, eps)
    bar = None
    if progress:  # a bar of integrated time (T - t), for the fixed grid and the adaptive solvers alike
        from tqdm.auto import tqdm

        bar = tqdm(total=float(sde.T) - eps, desc=f"ode ({ode_method})", unit="t", leave=False,
                   bar_format="{l_bar}{bar}| {n:.3f}/{total:.3f} [{elapsed}<{remaining}]")
        F = _with_progress(F, bar, float(sde.T))
    try:
        xs, info = _solve(F, x, ts, sde, steps, eps, ode_method, rtol, atol, error_norm)
    finally:
        if bar is not None:
            bar.close()
    if callback is not None:
        for xi, ti in zip(xs[1:], ts.tolist()[1:]):
            callback(xi, ti)
    x = xs[-1]
    if denoise:
        x = final_denoise(score_fn, sde, x, eps, callback)
    return x, info


def _with_progress(F, bar, T: float):
    """``F`` that also moves ``bar`` to the integrated time ``T - t`` of its latest call (values unchanged)."""

    def G(t, x):
        done = T - float(t)
        if done > bar.n:
            bar.update(done - bar.n)
        return F(t, x)

    return G


def _solve(F, x, ts, sde, steps, eps, ode_method, rtol, atol, error_norm):
    """The states ``xs`` ``(len(ts), *x.shape)`` of the PF-ODE at ``ts`` and the solver's ``info``."""
    info = {"steps": steps, "eps": eps, "ode_method": ode_method}
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
            xs = odeint(F, x, tt, rtol=rtol, atol=atol, method=ode_method, options=odeint_options(x.shape[0], tt[-1:], error_norm))
    return xs, info
