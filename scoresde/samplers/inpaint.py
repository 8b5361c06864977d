"""Imputation (inpainting) and colourisation with an unconditional score model (Song et al. 2021, §5 and App. I.2).

Notation: ``x_t = m(t) x_0 + s(t) z``; ``mask`` is ``True`` on the observed coordinates ``o`` and ``False`` on the
unobserved ones ``u``; ``y`` the observed values (``known``). The paper's replacement method runs a reverse-time sampler
on the whole vector and, after every update, overwrites the observed coordinates by a draw of their forward marginal::

    x_t[o] <- m(t) y + s(t) z,   z ~ N(0, I)

so the unobserved coordinates follow ``grad_u log p_t(x_u, x_t[o])``. This is an approximation: the target is
``p_0(x_u | x_o = y)``, and ``grad_u log p_t(x_u, m y + s z)`` is the score of ``p_t(x_u | x_t[o])``, not of the noisy
version of ``p_0(x_u | y)``. It is exact when ``x_o`` and ``x_u`` are independent under ``p_0`` (then the
``u``-part of the score does not depend on ``x_t[o]``); it is biased when ``x_o`` carries information on ``x_u`` that
the noisy ``x_t[o]`` hides at the times when ``x_u`` commits to a mode (tests/test_inpaint.py measures it).

* ``method="pc"``: predictor–corrector (``pc.PREDICTORS`` / ``pc.CORRECTORS``), a fresh ``z`` after the predictor and
  after every corrector step (App. I.2).
* ``method="ode"``: the probability-flow ODE on a fixed grid, with ONE ``z`` drawn at the start: the observed
  coordinates follow the path ``m(t) y + s(t) z`` and every score evaluation (also a Heun step's intermediate one)
  sees them on that path, so the map from the noise ``(x_T[u], z)`` to the sample is deterministic.

At the end (after the optional Tweedie denoising) the observed coordinates are set to ``y`` exactly.

Colourisation (``colorize``) is imputation in decoupled coordinates ``u = M x`` (per pixel, over the 3 channels) with
``COLORIZATION_MATRIX`` ``M`` orthogonal and ``M[0] = (1, 1, 1)/sqrt(3)``: ``u_0 = sqrt(3) gray`` is observed,
``u_1, u_2`` are imputed, and ``x = M^T u``.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from .._validate import check_choice, check_int, check_positive
from ..sde import SDE, SubVPSDE, VESDE, VPSDE
from ._common import (
    SCHEDULES, CountingScore, Noise, SampleResult, ScoreFn, _check_bool, coef, end_time, final_denoise, progress_bar,
    time_grid,
)
from .fast import heun_step
from .pc import CORRECTORS, PREDICTORS, euler_maruyama_step, langevin_corrector, reverse_diffusion_step

__all__ = ["inpaint", "colorize", "colorization_matrix", "INPAINT_METHODS", "ODE_STEPS", "COLORIZATION_MATRIX"]

INPAINT_METHODS = ("pc", "ode")
# the probability-flow step of ``method="ode"``: Heun in EDM's variables (``fast.heun_step``, 2 NFE), Euler
# (``pc.euler_maruyama_step`` without noise) or the probability-flow reverse-diffusion step (1 NFE each)
ODE_STEPS = ("heun", "euler", "reverse_diffusion")
# default number of grid steps of ``method="ode"`` (``method="pc"`` defaults to ``sde.N``)
ODE_DEFAULT_STEPS = 100

_S2, _S3, _S6 = math.sqrt(2.0), math.sqrt(3.0), math.sqrt(6.0)
# rows: grey (the channel mean times sqrt 3), red minus green, (red + green)/2 minus blue (each of unit norm)
COLORIZATION_MATRIX = (
    (1.0 / _S3, 1.0 / _S3, 1.0 / _S3),
    (1.0 / _S2, -1.0 / _S2, 0.0),
    (1.0 / _S6, 1.0 / _S6, -2.0 / _S6),
)


def colorization_matrix(dtype=None, device=None) -> torch.Tensor:
    """The orthogonal ``3 x 3`` matrix ``M`` of colourisation (``M M^T = I``), as a tensor::

        M = [[1/sqrt3,  1/sqrt3,  1/sqrt3],     u_0 = (r + g + b)/sqrt3 = sqrt3 * grey
             [1/sqrt2, -1/sqrt2,  0      ],     u_1 = (r - g)/sqrt2
             [1/sqrt6,  1/sqrt6, -2/sqrt6]]     u_2 = (r + g - 2b)/sqrt6

    ``u = M x`` per pixel over the channel dimension. Rows 1 and 2 are orthogonal to ``(1, 1, 1)``, so the channel
    mean of ``x = M^T u`` is ``u_0 / sqrt3`` whatever ``u_1, u_2`` are. (Any completion of the first row to an
    orthogonal matrix works; score_sde takes one from a QR decomposition.)"""
    return torch.tensor(COLORIZATION_MATRIX, dtype=dtype or torch.get_default_dtype(), device=device)


# --- the replacement ------------------------------------------------------------------------------
def _forward_marginal(sde: SDE, known: torch.Tensor, t: float, z: torch.Tensor) -> torch.Tensor:
    """``m(t) y + s(t) z``: a draw of the forward marginal of the observed values; shape of ``known``."""
    m, s = coef(sde, t)
    return m * known + s * z


def _replace(x: torch.Tensor, mask: torch.Tensor, sde: SDE, known: torch.Tensor, t: float, noise: Noise) -> torch.Tensor:
    """``x_t[o] <- m(t) y + s(t) z`` with a fresh ``z`` (App. I.2); ``x (B, *dims)``."""
    return torch.where(mask, _forward_marginal(sde, known, t, noise.randn_like(x)), x)


def _on_path_score(score_fn: ScoreFn, sde: SDE, known: torch.Tensor, mask: torch.Tensor, z: torch.Tensor) -> ScoreFn:
    """``score(x, t)`` evaluated with the observed coordinates on the path ``m(t) y + s(t) z`` (``z`` fixed)::

        score_path(x, t) = score(x with x[o] = m(t) y + s(t) z, t)

    ``t (B,)`` holds one time (the samplers' ``full_t``); its ``m``, ``s`` are computed in float64."""

    def score_path(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return score_fn(torch.where(mask, _forward_marginal(sde, known, float(t[0]), z), x), t)

    return score_path


# --- the two loops ----------------------------------------------------------------------------------
def _inpaint_pc(score_fn, sde, known, mask, noise, steps, eps, progress, predictor, corrector, snr, n_steps, schedule,
                langevin_norm):
    """Reverse diffusion / PC with the replacement after the predictor and after every corrector step."""
    pred, corr = PREDICTORS[predictor], CORRECTORS[corrector]
    tl = time_grid(sde, steps, eps, schedule).tolist()
    x = sde.prior_std * noise.randn(known.shape)
    x = _replace(x, mask, sde, known, tl[0], noise)
    for i in progress_bar(steps, progress, f"inpaint pc {predictor}/{corrector}"):
        t, s = tl[i], tl[i + 1]
        if pred is not None:
            x = _replace(pred(score_fn, sde, x, t, s, noise, False), mask, sde, known, s, noise)
        for _ in range(n_steps if corr is not None else 0):
            if corr is langevin_corrector:
                x = corr(score_fn, sde, x, s, noise, snr, 1, langevin_norm)
            else:
                x = corr(score_fn, sde, x, s, noise, snr, 1)
            x = _replace(x, mask, sde, known, s, noise)
    return x


def _inpaint_ode(score_fn, sde, known, mask, noise, steps, eps, progress, ode_step, schedule):
    """Probability-flow ODE on a fixed grid with the observed coordinates on one path ``m(t) y + s(t) z``."""
    tl = time_grid(sde, steps, eps, schedule).tolist()
    x = sde.prior_std * noise.randn(known.shape)
    z = noise.randn(known.shape)
    path = _on_path_score(score_fn, sde, known, mask, z)
    x = torch.where(mask, _forward_marginal(sde, known, tl[0], z), x)
    for i in progress_bar(steps, progress, f"inpaint ode {ode_step}"):
        t, s = tl[i], tl[i + 1]
        if ode_step == "heun":
            (mt, st), (ms, ss) = coef(sde, t), coef(sde, s)
            x = ms * heun_step(path, sde, x / mt, (t, mt, st / mt), (s, ms, ss / ms))
        elif ode_step == "euler":
            x = euler_maruyama_step(path, sde, x, t, s, noise, True)
        else:
            x = reverse_diffusion_step(path, sde, x, t, s, noise, True)
        x = torch.where(mask, _forward_marginal(sde, known, s, z), x)
    return x


# --- validation -------------------------------------------------------------------------------------
def _check_data(known, mask) -> torch.Tensor:
    """``known`` a floating ``(B, *dims)`` tensor, ``mask`` a bool tensor broadcastable to it; returns the mask on
    ``known``'s device. Raises ``TypeError`` / ``ValueError`` naming the argument."""
    if not torch.is_tensor(known):
        raise TypeError(f"known must be a tensor (B, *dims); got {type(known).__name__}")
    if not known.dtype.is_floating_point:
        raise TypeError(f"known must be a floating tensor; got {known.dtype}")
    if known.dim() < 2 or known.shape[0] < 1 or known.numel() == 0:
        raise ValueError(f"known must have shape (B, *dims) with B >= 1 and at least one coordinate; got {tuple(known.shape)}")
    if not torch.is_tensor(mask):
        raise TypeError(f"mask must be a bool tensor (True = observed) broadcastable to known; got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor (True = observed); got dtype {mask.dtype} (use mask.bool() or mask > 0)")
    try:
        shape = torch.broadcast_shapes(mask.shape, known.shape)
    except RuntimeError:
        shape = None
    if shape != known.shape:
        raise ValueError(f"mask must be broadcastable to known's shape {tuple(known.shape)}; got {tuple(mask.shape)}")
    return mask.to(known.device)


def _check_sde(sde) -> None:
    if not isinstance(sde, (VPSDE, SubVPSDE, VESDE)):
        raise TypeError(f"sde must be a VPSDE, SubVPSDE or VESDE; got {type(sde).__name__}")


def _check_options(sde, method, steps, eps, denoise, progress, predictor, corrector, snr, n_steps, schedule, ode_step,
                   langevin_norm) -> None:
    """Every option of ``inpaint``, checked before any score call (``ValueError`` naming the option)."""
    check_choice("method", method, INPAINT_METHODS)
    if steps is not None:
        check_int("steps", steps)
    if eps is not None:
        check_positive("eps", eps)
        if not eps < sde.T:
            raise ValueError(f"eps must lie in (0, T) = (0, {sde.T}); got {eps!r}")
    _check_bool("denoise", denoise)
    _check_bool("progress", progress)
    check_choice("schedule", schedule, SCHEDULES)
    # every option is checked whatever the method (a typo in an option the method ignores is still a typo)
    check_choice("predictor", predictor, tuple(PREDICTORS))
    check_choice("corrector", corrector, tuple(CORRECTORS))
    if method == "pc" and predictor == "none" and corrector == "none":
        raise ValueError("predictor and corrector cannot both be 'none'")
    check_positive("snr", snr)
    check_int("n_steps", n_steps)
    if langevin_norm is not None:
        check_choice("langevin_norm", langevin_norm, ("batch", "sample"))
    check_choice("ode_step", ode_step, ODE_STEPS)


# --- public API -------------------------------------------------------------------------------------
def inpaint(score_fn: ScoreFn, sde: SDE, known: torch.Tensor, mask: torch.Tensor, method: str = "pc", steps: Optional[int] = None,
            generator=None, progress: bool = False, *, predictor: str = "reverse_diffusion", corrector: str = "langevin",
            snr: float = 0.16, n_steps: int = 1, eps: Optional[float] = None, denoise: bool = True,
            schedule: str = "time_uniform", ode_step: str = "heun", langevin_norm: Optional[str] = None) -> SampleResult:
    """Impute the unobserved coordinates of ``known`` by the replacement method (Song et al. 2021, App. I.2).

    With ``y = known``, ``o = mask`` (observed), on the grid ``T = t_0 > ... > t_steps = eps``
    (``time_grid(sde, steps, eps, schedule)``), starting from ``x_T[u] ~ N(0, prior_std^2 I)``,
    ``x_T[o] = m(T) y + s(T) z``:

    * ``method="pc"``: each step ``t -> s``: ``predictor`` (``pc.PREDICTORS``), ``x_s[o] <- m(s) y + s(s) z``; then
      ``n_steps`` times: one ``corrector`` step at ``s`` (``pc.CORRECTORS``, signal-to-noise ``snr``),
      ``x_s[o] <- m(s) y + s(s) z`` — a fresh ``z`` each time. NFE ``steps (1 + n_steps)`` (+1 with ``denoise``)
      for a predictor and a corrector.
    * ``method="ode"``: one ``z`` drawn at the start; each step ``t -> s`` integrates the probability-flow ODE
      ``dx/dt = f(x, t) - 1/2 g(t)^2 score(x, t)`` for the unobserved coordinates, every score evaluation taken with
      ``x[o] = m(t') y + s(t') z`` at its own time ``t'``, then sets ``x_s[o] = m(s) y + s(s) z``. ``ode_step``:
      ``"heun"`` (default; ``fast.heun_step``, Heun in ``x/m`` against ``sigma = s/m``, second order, 2 NFE per step),
      ``"euler"`` or ``"reverse_diffusion"`` (``pc`` steps with ``probability_flow=True``, first order, 1 NFE).
      Deterministic given the generator's draws of ``x_T`` and ``z``.

    Then, with ``denoise``, Tweedie's ``x <- (x + s(eps)^2 score(x, eps)) / m(eps)`` (one call), and finally
    ``x[o] = y`` exactly (bitwise). The method is exact in distribution (as the sampler is) when ``x_o`` and ``x_u``
    are independent under ``p_0``; otherwise it only approximates ``p_0(x_u | x_o = y)`` (see the module docstring).

    Args:
        score_fn: ``score_fn(x, t)``, ``x (B, *dims)``, ``t (B,)`` -> shape of ``x``; an unconditional score.
        sde: ``VPSDE``, ``SubVPSDE`` or ``VESDE``.
        known: ``(B, *dims)`` floating; the observed values where ``mask`` is True (other entries are ignored, may be
            NaN). The samples take its dtype and device.
        mask: bool, broadcastable to ``known`` (e.g. ``dims``, ``(1, *dims)``, ``(B, 1, H, W)``), True = observed.
        method: ``"pc"`` or ``"ode"``.
        steps: grid steps; ``None``: ``sde.N`` for pc, ``ODE_DEFAULT_STEPS`` (100) for ode.
        generator: ``None``, a ``torch.Generator``, or a list of ``B`` generators (one per sample: sample ``b`` does not
            depend on the batch it is drawn in; the Langevin step size is then per sample, see ``langevin_norm``).
        progress: tqdm bar over the steps.
        predictor, corrector, snr, n_steps, langevin_norm: pc only, as in ``pc.sample_pc`` (``langevin_norm=None``:
            ``"sample"`` with a list of generators, else ``"batch"``).
        eps: end time, ``None``: 1e-3 (VP, sub-VP) / 1e-5 (VE). denoise: Tweedie at ``eps`` (both methods).
        schedule: the grid (``time_uniform`` | ``logSNR`` | ``karras``). ode_step: ode only, one of ``ODE_STEPS``.

    Returns:
        ``SampleResult`` with ``x`` ``(B, *dims)`` (``x[mask] == known[mask]`` exactly), ``nfe`` (score calls counted)
        and ``info`` (the options used, ``steps`` and ``eps`` resolved).

    Raises:
        TypeError / ValueError naming the argument, before any score call. Runs under ``torch.no_grad()``.
    """
    if not callable(score_fn):
        raise TypeError(f"score_fn must be callable as score_fn(x, t); got {type(score_fn).__name__}")
    _check_sde(sde)
    _check_options(sde, method, steps, eps, denoise, progress, predictor, corrector, snr, n_steps, schedule, ode_step,
                   langevin_norm)
    mask = _check_data(known, mask)
    noise = Noise(generator, known.shape[0], known.device, known.dtype)
    y = torch.where(mask, known, torch.zeros((), dtype=known.dtype, device=known.device))
    if not bool(torch.isfinite(y).all()):
        raise ValueError("known must be finite where mask is True")

    steps = (sde.N if method == "pc" else ODE_DEFAULT_STEPS) if steps is None else int(steps)
    eps = end_time(sde, eps)
    counted = CountingScore(score_fn)
    info = {"method": method, "steps": steps, "eps": eps, "denoise": denoise, "schedule": schedule}
    with torch.no_grad():
        if method == "pc":
            if langevin_norm is None:
                langevin_norm = "sample" if noise.generators is not None else "batch"
            x = _inpaint_pc(counted, sde, y, mask, noise, steps, eps, progress, predictor, corrector, snr, n_steps,
                            schedule, langevin_norm)
            info.update(predictor=predictor, corrector=corrector, snr=snr, n_steps=n_steps, langevin_norm=langevin_norm)
        else:
            x = _inpaint_ode(counted, sde, y, mask, noise, steps, eps, progress, ode_step, schedule)
            info.update(ode_step=ode_step)
        if denoise:
            x = final_denoise(counted, sde, x, eps, None)
        x = torch.where(mask, known, x)
    return SampleResult(x=x, nfe=counted.calls, info=info)


def _to_decoupled(x: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
    """``u = M x`` over the channel dimension 1: ``(B, 3, *spatial)`` -> same shape."""
    return torch.einsum("ij,bj...->bi...", M, x)


def _from_decoupled(u: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
    """``x = M^T u`` over the channel dimension 1: ``(B, 3, *spatial)`` -> same shape."""
    return torch.einsum("ji,bj...->bi...", M, u)


def _decoupled_score(score_fn: ScoreFn, M: torch.Tensor) -> ScoreFn:
    """The score of ``u = M x`` for orthogonal ``M``: ``grad_u log p_t(u) = M score(M^T u, t)`` (the forward SDE is
    isotropic, so ``u_t = M x_t`` and ``p^u_t(u) = p_t(M^T u)``). One call of ``score_fn`` per call."""

    def score_u(u: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return _to_decoupled(score_fn(_from_decoupled(u, M), t), M)

    return score_u


def colorize(score_fn: ScoreFn, sde: SDE, gray: torch.Tensor, method: str = "pc", steps: Optional[int] = None,
             generator=None, progress: bool = False, **options) -> SampleResult:
    """Colourise grey images by imputation in decoupled colour coordinates (Song et al. 2021, §5, App. I.3).

    With ``M = colorization_matrix()`` (orthogonal, first row ``(1, 1, 1)/sqrt3``), per pixel ``u = M x``: the
    observed coordinate is ``u_0 = sqrt3 * gray`` (channel 0 of ``u``), ``u_1, u_2`` are imputed by ``inpaint`` with the
    score of ``u``, ``M score(M^T u, t)``; the result is ``x = M^T u``, whose channel mean ``(r + g + b)/3 = u_0/sqrt3``
    equals ``gray`` (to float rounding).

    Args:
        score_fn: ``score_fn(x, t)`` of 3-channel data ``x (B, 3, *spatial)``.
        sde, method, steps, generator, progress, **options: as in ``inpaint`` (``predictor``, ``corrector``, ``snr``,
            ``n_steps``, ``eps``, ``denoise``, ``schedule``, ``ode_step``, ``langevin_norm``).
        gray: ``(B, 1, *spatial)`` floating, in the model's scale (the channel mean of the colour image wanted).

    Returns:
        ``SampleResult`` with ``x`` ``(B, 3, *spatial)``, ``nfe`` (calls of ``score_fn``), ``info`` (as ``inpaint``).
    """
    if not torch.is_tensor(gray):
        raise TypeError(f"gray must be a tensor (B, 1, *spatial); got {type(gray).__name__}")
    if not gray.dtype.is_floating_point:
        raise TypeError(f"gray must be a floating tensor; got {gray.dtype}")
    if gray.dim() < 3 or gray.shape[1] != 1 or gray.numel() == 0:
        raise ValueError(f"gray must have shape (B, 1, *spatial) (one grey channel); got {tuple(gray.shape)}")
    if not bool(torch.isfinite(gray).all()):
        raise ValueError("gray must be finite")
    if not callable(score_fn):
        raise TypeError(f"score_fn must be callable as score_fn(x, t); got {type(score_fn).__name__}")
    M = colorization_matrix(gray.dtype, gray.device)
    shape = (gray.shape[0], 3) + tuple(gray.shape[2:])
    known = torch.zeros(shape, dtype=gray.dtype, device=gray.device)
    known[:, :1] = _S3 * gray
    mask = torch.zeros((1, 3) + (1,) * (gray.dim() - 2), dtype=torch.bool, device=gray.device)
    mask[:, 0] = True
    res = inpaint(_decoupled_score(score_fn, M), sde, known, mask, method, steps, generator, progress, **options)
    res.x = _from_decoupled(res.x, M)
    return res
