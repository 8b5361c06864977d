"""Predictor–corrector sampling (Song et al. 2021, Alg. 1–3) and annealed Langevin dynamics (NCSN).

A step goes from ``t`` to ``s < t`` on a decreasing time grid. Predictors move ``x ~ p_t`` to
``x ~ p_s`` along the reverse SDE (or the probability-flow ODE); correctors then run Langevin MCMC
targeting ``p_s``. Every predictor/corrector is a small function; ``sample_pc`` composes them.

Predictor signature: ``predictor(score_fn, sde, x, t, s, noise, probability_flow) -> x``.
Corrector signature: ``corrector(score_fn, sde, x, t, noise, snr, n_steps) -> x``.
The step functions trust their arguments; ``sample`` validates every option once, before any step.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from ..sde import SDE, batch_broadcast
from ._common import (
    Callback, Noise, ScoreFn, coef, end_time, final_denoise, full_t, langevin_alpha, progress_bar, time_grid, transition,
)

__all__ = [
    "PREDICTORS", "PROBABILITY_FLOW_PREDICTORS", "CORRECTORS", "euler_maruyama_step", "reverse_diffusion_step", "ancestral_step",
    "langevin_corrector", "annealed_langevin_corrector", "sample_pc", "sample_langevin",
]


# --- predictors -------------------------------------------------------------------------------
def euler_maruyama_step(score_fn: ScoreFn, sde: SDE, x: torch.Tensor, t: float, s: float, noise: Noise, probability_flow: bool = False) -> torch.Tensor:
    """Euler–Maruyama on the reverse SDE ``dx = [f - g^2 score] dt + g dw_bar`` with ``dt = s - t < 0``::

        x_s = x_t + [f(x_t, t) - c g(t)^2 score(x_t, t)] dt + (1 - c') g(t) sqrt(-dt) z

    ``c = 1`` (SDE) or ``1/2`` with no noise (probability-flow ODE). ``x`` is ``(B, *dims)``; one score call.
    """
    dt = s - t
    drift, g = sde.reverse(score_fn, probability_flow).sde(x, full_t(t, x))
    x_mean = x + drift * dt
    if probability_flow:
        return x_mean
    return x_mean + batch_broadcast(g, x) * math.sqrt(-dt) * noise.randn_like(x)


def reverse_diffusion_step(score_fn: ScoreFn, sde: SDE, x: torch.Tensor, t: float, s: float, noise: Noise, probability_flow: bool = False) -> torch.Tensor:
    """Reverse diffusion (Song et al. 2021, eq. 46) built on the exact forward kernel of this step,
    ``x_t = a x_s + G z`` (``a = m(t)/m(s)``, ``G^2 = s(t)^2 - a^2 s(s)^2``)::

        x_s = x_t - (a - 1) x_t + c G^2 score(x_t, t) + G z     (c = 1; ODE: c = 1/2 and no noise)

    For VP/VE with ``steps = N`` this is score_sde's DDPM/SMLD discretisation; unlike score_sde it uses
    the kernel of the actual step, so ``G^2 <= s(t)^2`` and the step is finite for any number of steps
    (score_sde takes ``beta_i`` from an ``N``-step chain, which exceeds 1 for ``N < 20`` and gives NaN).
    """
    a, G2 = transition(sde, s, t)
    score = score_fn(x, full_t(t, x))
    c = 0.5 if probability_flow else 1.0
    x_mean = (2.0 - a) * x + (c * G2) * score
    if probability_flow:
        return x_mean
    return x_mean + math.sqrt(G2) * noise.randn_like(x)


def ancestral_step(score_fn: ScoreFn, sde: SDE, x: torch.Tensor, t: float, s: float, noise: Noise, probability_flow: bool = False) -> torch.Tensor:
    """Ancestral sampling: draw from the Gaussian posterior ``q(x_s | x_t, x0_hat)`` of the forward kernel
    ``x_t = a x_s + G z``, with ``x0_hat`` Tweedie's estimate. Its mean and variance are::

        x_s = (x_t + G^2 score(x_t, t)) / a + sqrt(G^2 s(s)^2 / s(t)^2) z

    VP: DDPM's step (Ho et al. 2020, Alg. 2, with the posterior variance ``beta_tilde``); VE: SMLD's
    ancestral step (Song et al. 2021, eq. 47); sub-VP: the same construction. It has no probability-flow version
    (not in ``PROBABILITY_FLOW_PREDICTORS``): ``probability_flow`` must be ``False`` (``check_method_options`` says so).
    """
    a, G2 = transition(sde, s, t)
    _, ss = coef(sde, s)
    _, st = coef(sde, t)
    score = score_fn(x, full_t(t, x))
    x_mean = (x + G2 * score) / a
    return x_mean + math.sqrt(G2 * ss * ss / (st * st)) * noise.randn_like(x)


PREDICTORS = {"euler_maruyama": euler_maruyama_step, "reverse_diffusion": reverse_diffusion_step, "ancestral": ancestral_step, "none": None}
# predictors with a probability-flow (ODE) version, ``probability_flow=True``
PROBABILITY_FLOW_PREDICTORS = ("euler_maruyama", "reverse_diffusion")


# --- correctors -------------------------------------------------------------------------------
def _per_sample_norm(v: torch.Tensor) -> torch.Tensor:
    return v.reshape(v.shape[0], -1).norm(dim=1)


def _finite_mean(v: torch.Tensor) -> torch.Tensor:
    """Mean of the finite entries of ``v`` (``(B,)`` -> 0-d): one non-finite sample must not set the step size of
    the whole batch (it made every row NaN). With every entry finite it is ``v.mean()`` exactly."""
    ok = torch.isfinite(v)
    if bool(ok.all()):
        return v.mean()
    return torch.where(ok, v, torch.zeros_like(v)).sum() / ok.sum().clamp_min(1)


def langevin_corrector(score_fn: ScoreFn, sde: SDE, x: torch.Tensor, t: float, noise: Noise, snr: float, n_steps: int,
                       norm: str = "batch") -> torch.Tensor:
    """``n_steps`` Langevin steps targeting ``p_t`` (Song et al. 2021, Alg. 4)::

        e = 2 alpha (snr |z| / |score|)^2,   x <- x + e score(x, t) + sqrt(2 e) z

    with ``alpha`` from ``langevin_alpha`` (``exp(-beta(t) T/N) ~ 1 - beta_i`` for VP and sub-VP, 1 for VE).
    ``norm="batch"``: ``|z|``, ``|score|`` are per-sample norms averaged over the batch's finite ones (score_sde), one step
    size for the batch, so a sample depends (through that scalar) on its batch. ``norm="sample"``: per-sample
    norms and step sizes; each sample is independent of its batch, which per-sample generators need. In high
    dimension the two agree (the norms concentrate); in low dimension (D ~ 2) the per-sample ratio is
    heavy-tailed and biases the samples: use ``annealed_langevin`` there. ``n_steps`` score calls.
    """
    alpha = langevin_alpha(sde, t)
    tt = full_t(t, x)
    tiny = torch.finfo(x.dtype).tiny
    for _ in range(n_steps):
        grad = score_fn(x, tt)
        z = noise.randn_like(x)
        zn, gn = _per_sample_norm(z), _per_sample_norm(grad)
        if norm == "batch":
            zn, gn = _finite_mean(zn).expand_as(zn), _finite_mean(gn).expand_as(gn)
        ratio = zn / gn.clamp_min(tiny)
        e = batch_broadcast(2.0 * alpha * (snr * ratio) ** 2, x)
        x = x + e * grad + torch.sqrt(2.0 * e) * z
    return x


def annealed_langevin_corrector(score_fn: ScoreFn, sde: SDE, x: torch.Tensor, t: float, noise: Noise, snr: float, n_steps: int) -> torch.Tensor:
    """``n_steps`` Langevin steps with the noise-level step size of annealed Langevin dynamics
    (Song & Ermon 2019; score_sde's ``AnnealedLangevinDynamics``)::

        e = 2 alpha (snr s(t))^2,   x <- x + e score(x, t) + sqrt(2 e) z

    ``s(t)`` the marginal std; ``alpha`` as in ``langevin_corrector``. ``n_steps`` score calls.
    """
    alpha = langevin_alpha(sde, t)
    _, st = coef(sde, t)
    e = 2.0 * alpha * (snr * st) ** 2
    tt = full_t(t, x)
    for _ in range(n_steps):
        grad = score_fn(x, tt)
        x = x + e * grad + math.sqrt(2.0 * e) * noise.randn_like(x)
    return x


CORRECTORS = {"langevin": langevin_corrector, "annealed_langevin": annealed_langevin_corrector, "none": None}


# --- samplers ---------------------------------------------------------------------------------
def sample_pc(score_fn: ScoreFn, sde: SDE, x: torch.Tensor, noise: Noise, callback: Optional[Callback] = None, progress: bool = False, /, *,
              steps: Optional[int] = None, eps: Optional[float] = None, denoise: bool = True, schedule: str = "time_uniform",
              rho: float = 7.0, predictor: str = "reverse_diffusion", corrector: str = "langevin", snr: float = 0.16,
              n_steps: int = 1, probability_flow: bool = False, langevin_norm: Optional[str] = None) -> tuple[torch.Tensor, dict]:
    """Predictor–corrector sampler (Song et al. 2021, Alg. 1) from ``x = x_T`` ``(B, *dims)`` at ``T`` to ``eps``.

    On the grid ``T = t_0 > ... > t_steps = eps`` (``time_grid(sde, steps, eps, schedule, rho)``), for each
    ``i``: ``predictor`` ``t_i -> t_{i+1}`` (``PREDICTORS``; with ``probability_flow`` a step of the
    probability-flow ODE), then ``n_steps`` steps of ``corrector`` (``CORRECTORS``) at ``t_{i+1}`` with
    signal-to-noise ratio ``snr``. Finally, with ``denoise``, Tweedie's ``x <- (x + s^2 score) / m`` at ``eps``.

    ``steps=None``: ``sde.N`` (the paper's 1000 for VP); ``eps=None``: ``default_eps(sde)``;
    ``langevin_norm=None``: ``"sample"`` with per-sample generators (batch-independent samples), else
    ``"batch"`` (score_sde's), see ``langevin_corrector``. NFE: ``steps`` (predictor) + ``steps * n_steps``
    (corrector) + 1 (``denoise``). Returns ``x_0`` ``(B, *dims)`` and ``info`` (the resolved ``steps``, ``eps``,
    ``langevin_norm``). Options are not checked here: ``sample`` checks them once (``check_sample_options``).
    """
    steps = sde.N if steps is None else steps
    eps = end_time(sde, eps)
    if langevin_norm is None:
        langevin_norm = "sample" if noise.generators is not None else "batch"
    pred, corr = PREDICTORS[predictor], CORRECTORS[corrector]
    tl = time_grid(sde, steps, eps, schedule, rho).tolist()
    for i in progress_bar(steps, progress, f"pc {predictor}/{corrector}"):
        t, s = tl[i], tl[i + 1]
        if pred is not None:
            x = pred(score_fn, sde, x, t, s, noise, probability_flow)
        if corr is langevin_corrector:
            x = corr(score_fn, sde, x, s, noise, snr, n_steps, langevin_norm)
        elif corr is not None:
            x = corr(score_fn, sde, x, s, noise, snr, n_steps)
        if callback is not None:
            callback(x, s)
    if denoise:
        x = final_denoise(score_fn, sde, x, eps, callback)
    return x, {"steps": steps, "eps": eps, "langevin_norm": langevin_norm}


def sample_langevin(score_fn: ScoreFn, sde: SDE, x: torch.Tensor, noise: Noise, callback: Optional[Callback] = None, progress: bool = False,
                    /, *, steps: int = 100, eps: Optional[float] = None, denoise: bool = True, schedule: str = "logSNR",
                    rho: float = 7.0, snr: float = 0.3, n_steps: int = 10) -> tuple[torch.Tensor, dict]:
    """Annealed Langevin dynamics alone (NCSN; Song & Ermon 2019, Alg. 1) over the noise levels ``t_1 .. t_steps``
    of ``time_grid(sde, steps, eps, schedule, rho)`` (default uniform in log-SNR), from ``x = x_T`` ``(B, *dims)``.

    At each level ``n_steps`` steps ``x <- x + e score + sqrt(2 e) z`` with ``e = 2 alpha (snr s(t))^2``
    (``annealed_langevin_corrector``; NCSN's ``alpha_i = lr sigma_i^2 / sigma_L^2`` step is this with
    ``lr / sigma_L^2 = 4 snr^2``); then, with ``denoise``, Tweedie's denoising at ``eps`` (``None``:
    ``default_eps(sde)``). The default ``snr = 0.3`` is larger than PC's 0.16: with no predictor the chain
    must mix at every level by itself. NFE: ``steps * n_steps`` (+ 1). Returns ``x_0`` ``(B, *dims)`` and
    ``info`` (``steps``, ``eps``).
    """
    eps = end_time(sde, eps)
    tl = time_grid(sde, steps, eps, schedule, rho).tolist()
    for i in progress_bar(steps, progress, "annealed langevin"):
        x = annealed_langevin_corrector(score_fn, sde, x, tl[i + 1], noise, snr, n_steps)
        if callback is not None:
            callback(x, tl[i + 1])
    if denoise:
        x = final_denoise(score_fn, sde, x, eps, callback)
    return x, {"steps": steps, "eps": eps}
