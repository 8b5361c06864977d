"""Shared pieces of the samplers: NFE counting, per-sample noise, time grids, denoising, the result type.

Time grids are computed once in float64 on the CPU and handed to the solvers as Python floats, so the
per-step coefficients are exact to float64 whatever dtype/device the samples use.

Every sampler function of the table ``SAMPLERS`` has the form::

    sample_x(score_fn, sde, x, noise, callback=None, progress=False, /, *, steps, eps, denoise, <its options>)
        -> (x_0, info)

``x`` is ``x_T`` ``(B, *dims)``; ``noise`` a ``Noise`` (unused by deterministic solvers); ``callback(x, t)``, when
given, is called with every state the solver reaches and its (forward) time ``t``, ending with the denoised
``x_0`` at ``t = 0`` when ``denoise``. The keyword-only parameters are the method's options, their defaults the
method's defaults. ``info`` holds what the sampler resolved (``steps``, ``eps``, ...) and solver statistics.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch

from ..sde import SDE, SubVPSDE, VESDE, VPSDE

ScoreFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# ``callback(x, t)``: a state ``x`` (B, *dims) reached by a sampler at forward time ``t``
Callback = Callable[[torch.Tensor, float], None]

SCHEDULES = ("time_uniform", "logSNR", "karras")


@dataclass
class SampleResult:
    """What a sampler returns.

    Attributes:
        x: the samples, shape ``shape``.
        nfe: number of calls of ``score_fn`` actually made (counted by a wrapper).
        trajectory: ``(K, *shape)`` states at ``times`` when ``return_trajectory=True``, else ``None``.
        times: ``(K,)`` float64 times of the trajectory (forward time, from ``T`` down to ``eps``), or ``None``.
        info: method-specific details (the options used, solver statistics).
    """

    x: torch.Tensor
    nfe: int
    trajectory: torch.Tensor | None = None
    times: torch.Tensor | None = None
    info: dict = field(default_factory=dict)


class CountingScore:
    """Wraps ``score_fn(x, t)`` and counts its calls in ``.calls`` (one call = one network evaluation of a batch).

    The one NFE counter of the library: ``sample`` and ``likelihood.log_likelihood`` report ``.calls`` as ``nfe``.
    The first call's output is checked (``check_score_output``: shape and dtype of ``x``)."""

    def __init__(self, score_fn: ScoreFn):
        self.score_fn = score_fn
        self.calls = 0

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        out = self.score_fn(x, t)
        if self.calls == 1:
            check_score_output(out, x)
        return out


def check_score_output(out, x: torch.Tensor) -> None:
    """A score's output must be a tensor of ``x``'s shape ``(B, *dims)`` and dtype: a ``(B, 1)`` or scalar output would
    broadcast silently into finite wrong answers. Raises ``TypeError`` / ``ValueError`` naming what came back."""
    if not torch.is_tensor(out):
        raise TypeError(f"score_fn(x, t) must return a tensor like x; got {type(out).__name__}")
    if tuple(out.shape) != tuple(x.shape):
        raise ValueError(f"score_fn(x, t) must return a tensor of x's shape {tuple(x.shape)}; got {tuple(out.shape)} "
                         "(it would be broadcast silently)")
    if out.dtype != x.dtype:
        raise TypeError(f"score_fn(x, t) must return x's dtype {x.dtype}; got {out.dtype} (cast the model, or sample "
                        f"with dtype={out.dtype})")


class Noise:
    """Standard normal draws for a batch from one ``torch.Generator`` or from one generator per sample.

    With a list of generators, row ``b`` of every draw comes from ``generators[b]`` alone, so a sample's
    noise does not depend on the batch it is drawn in.
    """

    def __init__(self, generator, batch: int, device, dtype):
        self.device, self.dtype, self.batch = device, dtype, batch
        if isinstance(generator, (list, tuple)):
            if len(generator) != batch:
                raise ValueError(f"generator as a list must have one torch.Generator per sample: len {batch}; got {len(generator)}")
            if not all(isinstance(g, torch.Generator) for g in generator):
                raise TypeError("generator must be a torch.Generator, a list of them, or None")
            self.generators = list(generator)
            self.generator = None
        else:
            if generator is not None and not isinstance(generator, torch.Generator):
                raise TypeError(f"generator must be a torch.Generator, a list of them, or None; got {type(generator).__name__}")
            self.generators = None
            self.generator = generator

    def randn(self, shape: Sequence[int]) -> torch.Tensor:
        """``N(0, I)`` tensor of ``shape`` (``shape[0]`` the batch)."""
        shape = tuple(shape)
        if self.generators is None:
            return torch.randn(shape, generator=self.generator, device=self.device, dtype=self.dtype)
        return torch.stack([torch.randn(shape[1:], generator=g, device=self.device, dtype=self.dtype) for g in self.generators])

    def randn_like(self, x: torch.Tensor) -> torch.Tensor:
        return self.randn(x.shape)


def full_t(t: float, x: torch.Tensor) -> torch.Tensor:
    """The time ``t`` as a ``(B,)`` tensor on ``x``'s device and dtype."""
    return torch.full((x.shape[0],), float(t), device=x.device, dtype=x.dtype)


def coef(sde: SDE, t: float) -> tuple[float, float]:
    """``(m(t), s(t))`` as Python floats, computed in float64."""
    m, s = sde.marginal_coef(torch.tensor([float(t)], dtype=torch.float64))
    return float(m), float(s)


def log_snr(sde: SDE, t: float) -> float:
    """``lambda(t) = log m(t) - log s(t)`` in float64."""
    return float(sde.log_snr(torch.tensor([float(t)], dtype=torch.float64)))


def t_from_log_snr(sde: SDE, lam: float) -> float:
    return float(sde.t_from_log_snr(torch.tensor([float(lam)], dtype=torch.float64)))


def default_eps(sde: SDE) -> float:
    """The paper's end time: ``1e-5`` for VE, ``1e-3`` for VP and sub-VP (and other SDEs)."""
    return 1e-5 if isinstance(sde, VESDE) else 1e-3


def end_time(sde: SDE, eps: Optional[float]) -> float:
    """A sampler's end time: ``eps``, or ``default_eps(sde)`` for ``None``; a Python float."""
    return default_eps(sde) if eps is None else float(eps)


def time_grid(sde: SDE, steps: int, eps: float, schedule: str = "time_uniform", rho: float = 7.0) -> torch.Tensor:
    """Decreasing times ``T = t_0 > t_1 > ... > t_steps = eps``, shape ``(steps + 1,)``, float64 on the CPU.

    * ``time_uniform``: ``t_i = T + i (eps - T) / steps``.
    * ``logSNR``: ``lambda(t_i)`` uniform between ``lambda(T)`` and ``lambda(eps)`` (Lu et al. 2022), ``t = t_from_log_snr``.
    * ``karras``: ``sigma_i = (sigma_max^(1/rho) + i/steps (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho`` with
      ``sigma = s/m`` (Karras et al. 2022, eq. 5), ``sigma_max = sigma(T)``, ``sigma_min = sigma(eps)``,
      and ``t_i = t_from_log_snr(-log sigma_i)``.
    """
    T = float(sde.T)
    if schedule == "time_uniform":
        ts = torch.linspace(T, eps, steps + 1, dtype=torch.float64)
    elif schedule == "logSNR":
        lam = torch.linspace(log_snr(sde, T), log_snr(sde, eps), steps + 1, dtype=torch.float64)
        ts = sde.t_from_log_snr(lam)
    elif schedule == "karras":
        smax, smin = math.exp(-log_snr(sde, T)), math.exp(-log_snr(sde, eps))
        i = torch.arange(steps + 1, dtype=torch.float64) / steps
        sig = (smax ** (1 / rho) + i * (smin ** (1 / rho) - smax ** (1 / rho))) ** rho
        ts = sde.t_from_log_snr(-torch.log(sig))
    else:
        raise ValueError(f"schedule must be one of {SCHEDULES}; got {schedule!r}")
    ts = ts.clone()
    ts[0], ts[-1] = T, eps  # exact end points (the inverse of log_snr is only exact to rounding)
    return ts


def transition(sde: SDE, s: float, t: float) -> tuple[float, float]:
    """Exact forward kernel between two times ``s < t``: ``x_t = a x_s + G z`` with
    ``a = m(t)/m(s)`` and ``G^2 = s(t)^2 - a^2 s(s)^2`` (any SDE with affine drift). Returns ``(a, G^2)``."""
    ms, ss = coef(sde, s)
    mt, st = coef(sde, t)
    a = mt / ms
    return a, max(st * st - a * a * ss * ss, 0.0)


def denoise(score_fn: ScoreFn, sde: SDE, x: torch.Tensor, t: float) -> torch.Tensor:
    """Tweedie's formula ``E[x_0 | x_t] = (x_t + s(t)^2 grad log p_t(x_t)) / m(t)``; one score call; shape of ``x``."""
    m, s = coef(sde, t)
    return (x + (s * s) * score_fn(x, full_t(t, x))) / m


def final_denoise(score_fn: ScoreFn, sde: SDE, x: torch.Tensor, eps: float, callback: Optional[Callback]) -> torch.Tensor:
    """A sampler's last step with ``denoise=True``: ``x_0 = denoise(x_eps)`` (Tweedie at ``eps``), reported to
    ``callback`` at ``t = 0``; one score call."""
    x = denoise(score_fn, sde, x, eps)
    if callback is not None:
        callback(x, 0.0)
    return x


def _check_bool(name: str, value) -> bool:
    """``value`` must be ``True`` or ``False`` (not 0/1); returns it. The samplers' one check that
    ``scoresde._validate`` lacks; raises ``ValueError`` naming the option like the checks there."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False; got {value!r}")
    return value


def langevin_alpha(sde: SDE, t: float) -> float:
    """The ``alpha`` of score_sde's Langevin step size ``2 alpha (snr |z| / |s|)^2``.

    score_sde uses DDPM's ``alpha_i = 1 - beta_i`` for VP and 1 otherwise, and crashes for sub-VP (no
    ``alphas``). Here, for VP and sub-VP (same drift ``-1/2 beta(t) x``): ``alpha(t) = exp(-beta(t) T / N)``, the
    per-step decay of the signal variance ``m(t)^2 / m(t - T/N)^2`` of an ``N``-step chain. It equals ``1 - beta_i``
    to first order (within 2e-4 for the paper's VP, N = 1000) and stays in ``(0, 1]`` for any ``N``, where
    ``1 - beta_max / N`` turns negative for ``N < beta_max``. VE and other SDEs: ``1``.
    """
    if isinstance(sde, (VPSDE, SubVPSDE)):
        beta = float(sde.beta(torch.tensor([float(t)], dtype=torch.float64)))
        return math.exp(-beta * sde.T / sde.N)
    return 1.0


def progress_bar(n: int, progress: bool, desc: str):
    from tqdm.auto import tqdm

    return tqdm(range(n), disable=not progress, desc=desc, leave=False)
