"""Stochastic differential equations of score-based generative modelling.

Song et al., "Score-Based Generative Modeling through Stochastic Differential
Equations" (ICLR 2021). Time runs from 0 (data) to T = 1.

Every forward SDE here has an affine drift, ``dx = f(t) x dt + g(t) dw``, so its
perturbation kernel is Gaussian::

    x_t = m(t) x_0 + s(t) z,    z ~ N(0, I)

and ``marginal_coef(t)`` returns ``(m(t), s(t))``. The oracle, the losses and
the fast solvers are written against these two coefficients only.

Shapes: ``x`` is ``(B, *dims)``; ``t`` is ``(B,)`` (a 0-d tensor or a float is
broadcast to the batch). Per-sample scalars (the diffusion ``g(t)``, ``std``)
are returned with shape ``(B,)``.
"""

from __future__ import annotations

import abc
import math
import warnings
from typing import Callable

import torch

from ._validate import check_int, check_positive

ScoreFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# ``SDE.prior_kl_per_dim`` above this (nats per dimension) warns on construction (VE sigma_max below ~2.2 for unit-scale
# data; the paper's VP gives 2e-5, VE sigma_max 7 (a small data set's largest pairwise distance) 0.01)
PRIOR_KL_WARN = 0.1

__all__ = ["SDE", "VPSDE", "SubVPSDE", "VESDE", "ReverseSDE", "batch_broadcast", "as_time", "check_time"]


def batch_broadcast(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Reshape a per-sample tensor ``v`` of shape ``(B,)`` to ``(B, 1, ..., 1)`` so it broadcasts against ``x``."""
    return v.reshape(v.shape + (1,) * (x.dim() - v.dim()))


def as_time(t, x: torch.Tensor, T: float = 1.0, check: bool = True) -> torch.Tensor:
    """Return ``t`` as a ``(B,)`` tensor on ``x``'s device and dtype.

    A float or a 0-d tensor is expanded to the batch. Raises ``ValueError`` if ``t``
    has another shape or (with ``check``) a value outside ``[0, T]``.
    """
    if not torch.is_tensor(t):
        t = torch.tensor(float(t))
    t = t.to(device=x.device, dtype=x.dtype if x.dtype.is_floating_point else torch.get_default_dtype())
    if t.dim() == 0:
        t = t.expand(x.shape[0])
    if t.shape != (x.shape[0],):
        raise ValueError(f"t must have shape (batch,) = ({x.shape[0]},) or be a scalar; got {tuple(t.shape)}")
    if check:
        check_time(t, T)
    return t


def check_time(t, T: float = 1.0) -> torch.Tensor:
    """``t`` must be a floating tensor (or a real number, returned as a float64 0-d tensor) with every value in
    ``[0, T]``; NaN is rejected. Returns it. ``TypeError`` / ``ValueError`` naming ``t``."""
    if not torch.is_tensor(t):
        if isinstance(t, bool) or not isinstance(t, (int, float)):
            raise TypeError(f"t must be a tensor of times in [0, T]; got {type(t).__name__}")
        t = torch.tensor(float(t), dtype=torch.float64)
    if not t.dtype.is_floating_point:
        raise TypeError(f"t must be a floating-point tensor; got {t.dtype}")
    if t.numel() and not bool(((t >= 0) & (t <= T)).all()):
        bad = t[~((t >= 0) & (t <= T))]
        raise ValueError(f"t must lie in [0, T] = [0, {T}] (not NaN); got {bad.flatten()[:4].tolist()}")
    return t


def _check_beta_range(beta_min, beta_max, linear: bool = True) -> tuple[float, float]:
    """Both betas finite and > 0 and, for a linear schedule, ``beta_min < beta_max``; ValueError names the field."""
    beta_min, beta_max = check_positive("beta_min", beta_min), check_positive("beta_max", beta_max)
    if linear and not beta_min < beta_max:
        raise ValueError(f"beta_min must be < beta_max; got beta_min={beta_min}, beta_max={beta_max}")
    return beta_min, beta_max


def _linear_beta(t: torch.Tensor, beta_0: float, beta_1: float) -> torch.Tensor:
    """``beta(t) = beta_0 + t (beta_1 - beta_0)``, shape of ``t``."""
    return beta_0 + t * (beta_1 - beta_0)


def _linear_log_mean_coeff(t: torch.Tensor, beta_0: float, beta_1: float) -> torch.Tensor:
    """``c(t) = -1/2 int_0^t beta = -t^2 (beta_1 - beta_0) / 4 - t beta_0 / 2``, shape of ``t``."""
    return -0.25 * t**2 * (beta_1 - beta_0) - 0.5 * t * beta_0


class SDE(abc.ABC):
    """Abstract forward SDE ``dx = f(x, t) dt + g(t) dw`` on ``t in [0, T]``.

    Subclasses define ``sde``, ``marginal_coef``, ``prior_std`` and may override
    ``discretize``. Method names follow score_sde's ``sde_lib``.
    """

    T: float = 1.0

    def __init__(self, N: int):
        self.N = check_int("N", N)

    # --- the continuous process -------------------------------------------------
    @abc.abstractmethod
    def sde(self, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Drift ``f(x, t)`` (shape of ``x``) and diffusion ``g(t)`` (shape ``(B,)``)."""

    @abc.abstractmethod
    def marginal_coef(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(m(t), s(t))`` with ``x_t = m(t) x_0 + s(t) z``; both have the shape of ``t``. Implementations check
        ``t`` first (``check_time``: values in ``[0, T]``, no NaN)."""

    @property
    @abc.abstractmethod
    def prior_std(self) -> float:
        """Standard deviation of the isotropic Gaussian prior ``p_T = N(0, prior_std^2 I)``."""

    def marginal_prob(self, x0: torch.Tensor, t) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean ``m(t) x_0`` (shape of ``x0``) and std ``s(t)`` (shape ``(B,)``) of ``p_{0t}(x_t | x_0)``."""
        t = as_time(t, x0, self.T)
        m, s = self.marginal_coef(t)
        return batch_broadcast(m, x0) * x0, s

    def log_snr(self, t: torch.Tensor) -> torch.Tensor:
        """Half log signal-to-noise ratio ``lambda(t) = log m(t) - log s(t)`` (DPM-Solver's lambda), decreasing in t;
        ``t`` in ``[0, T]`` (``check_time``), shape of ``t``."""
        m, s = self.marginal_coef(t)
        return torch.log(m) - torch.log(s)

    def t_from_log_snr(self, lam: torch.Tensor, iters: int = 80) -> torch.Tensor:
        """Inverse of ``log_snr``: the ``t in [0, T]`` with ``lambda(t) = lam``.

        Generic bisection (``lambda`` is strictly decreasing); subclasses with a closed
        form override it. Values of ``lam`` outside ``[lambda(T), lambda(0)]`` clamp to the ends.
        """
        lo = torch.zeros_like(lam)
        hi = torch.full_like(lam, self.T)
        for _ in range(iters):
            mid = 0.5 * (lo + hi)
            above = self.log_snr(mid) > lam  # mid is too early
            lo = torch.where(above, mid, lo)
            hi = torch.where(above, hi, mid)
        return 0.5 * (lo + hi)

    def prior_kl_per_dim(self) -> float:
        """How far the marginal at ``T`` is from the prior, in nats per dimension, for data of unit scale:
        ``KL(N(m(T) x0, s(T)^2) || N(0, sigma_p^2))`` per dimension with ``x0^2 = 1``, i.e.
        ``1/2 (v - 1 - log v) + 1/2 m(T)^2 / sigma_p^2`` with ``v = s(T)^2 / sigma_p^2``. The paper's VP: 2e-5;
        VE (0.01, 50): 2e-4."""
        m, s = (float(v) for v in self.marginal_coef(torch.tensor([float(self.T)], dtype=torch.float64)))
        v = (s / self.prior_std) ** 2
        if v <= 0:
            return math.inf
        return 0.5 * (v - 1.0 - math.log(v)) + 0.5 * (m / self.prior_std) ** 2

    def _warn_if_prior_far(self) -> None:
        kl = self.prior_kl_per_dim()
        if kl > PRIOR_KL_WARN:
            warnings.warn(f"{self!r}: the marginal at T is far from the prior N(0, {self.prior_std:g}^2 I) "
                          f"(KL {kl:.3g} nats per dimension for unit-scale data, above {PRIOR_KL_WARN}); samples drawn "
                          "from the prior will not follow the model", UserWarning, stacklevel=3)

    def prior_sampling(self, shape, generator: torch.Generator | None = None, device=None, dtype=None) -> torch.Tensor:
        """Draw ``x_T ~ N(0, prior_std^2 I)`` of the given shape."""
        if device is None and generator is not None:
            device = generator.device
        z = torch.randn(tuple(shape), generator=generator, device=device, dtype=dtype)
        return self.prior_std * z

    def prior_logp(self, z: torch.Tensor) -> torch.Tensor:
        """Log-density of the prior, per sample: ``-D/2 log(2 pi sigma^2) - |z|^2 / (2 sigma^2)``; shape ``(B,)``."""
        D = z[0].numel()
        var = self.prior_std**2
        sq = z.reshape(z.shape[0], -1).pow(2).sum(dim=1)
        return -0.5 * D * math.log(2 * math.pi * var) - sq / (2 * var)

    # --- discretisation ---------------------------------------------------------
    def discretize(self, x: torch.Tensor, t) -> tuple[torch.Tensor, torch.Tensor]:
        """One step of the discretised forward process ``x_{i+1} = x_i + f_i + G_i z_i``.

        Default: Euler–Maruyama with ``dt = T / N``: ``f_i = f(x, t) dt``, ``G_i = g(t) sqrt(dt)``.
        Returns ``f_i`` (shape of ``x``) and ``G_i`` (shape ``(B,)``).
        """
        dt = self.T / self.N
        drift, diffusion = self.sde(x, t)
        return drift * dt, diffusion * math.sqrt(dt)

    def reverse(self, score_fn: ScoreFn, probability_flow: bool = False) -> "ReverseSDE":
        """The reverse-time SDE ``dx = [f - g^2 s(x,t)] dt + g dw_bar`` or, with
        ``probability_flow``, the ODE ``dx = [f - 1/2 g^2 s(x,t)] dt`` (zero diffusion)."""
        return ReverseSDE(self, score_fn, probability_flow)

    def discrete_timestep(self, t: torch.Tensor) -> torch.Tensor:
        """Index ``i = round(t (N - 1) / T)`` of the discrete noise level for continuous ``t``; shape ``(B,)``, long."""
        return torch.round(t * (self.N - 1) / self.T).long()


class ReverseSDE:
    """Reverse-time SDE or probability-flow ODE of a forward ``SDE`` (same ``sde``/``discretize`` API).

    ``sde(x, t)`` returns drift ``f - c g^2 s`` and diffusion ``g`` (``0`` for the ODE),
    with ``c = 1`` (SDE) or ``1/2`` (ODE). Time is still the forward time; samplers step it backwards.
    """

    def __init__(self, forward: SDE, score_fn: ScoreFn, probability_flow: bool = False):
        self.forward = forward
        self.score_fn = score_fn
        self.probability_flow = bool(probability_flow)
        self.N = forward.N
        self.T = forward.T

    def _coef(self) -> float:
        return 0.5 if self.probability_flow else 1.0

    def sde(self, x: torch.Tensor, t) -> tuple[torch.Tensor, torch.Tensor]:
        t = as_time(t, x, self.T)
        drift, diffusion = self.forward.sde(x, t)
        score = self.score_fn(x, t)
        drift = drift - batch_broadcast(diffusion**2, x) * score * self._coef()
        if self.probability_flow:
            diffusion = torch.zeros_like(diffusion)
        return drift, diffusion

    def discretize(self, x: torch.Tensor, t) -> tuple[torch.Tensor, torch.Tensor]:
        """Reverse of the forward discretisation: ``f_rev = f - c G^2 s``, ``G_rev = G`` (0 for the ODE)."""
        t = as_time(t, x, self.T)
        f, G = self.forward.discretize(x, t)
        score = self.score_fn(x, t)
        rev_f = f - batch_broadcast(G**2, x) * score * self._coef()
        rev_G = torch.zeros_like(G) if self.probability_flow else G
        return rev_f, rev_G


class VPSDE(SDE):
    """Variance-preserving SDE ``dx = -1/2 beta(t) x dt + sqrt(beta(t)) dw`` (continuous DDPM).

    ``schedule="linear"``: ``beta(t) = beta_min + t (beta_max - beta_min)``;
    ``m(t) = exp(c(t))``, ``s(t) = sqrt(1 - exp(2 c(t)))``, ``c(t) = -t^2 (beta_max - beta_min)/4 - t beta_min / 2``.
    Discrete DDPM betas: ``linspace(beta_min / N, beta_max / N, N)``.

    ``schedule="cosine"`` (Nichol & Dhariwal 2021, s = 0.008): ``alpha_bar(t) = f(t) / f(0)`` with
    ``f(t) = cos^2(phi(t))``, ``phi(t) = (t + s) / (1 + s) * pi / 2``; continuous
    ``beta(t) = -d log alpha_bar / dt = pi / (1 + s) * tan(phi(t))``, clipped at
    ``beta_clip = -N log(1 - 0.999)`` (the continuous counterpart of their per-step clip
    ``beta_i <= 0.999``; it only acts for ``t > t_clip ~ 0.9997`` with N = 1000). The marginal is
    ``m(t) = sqrt(alpha_bar(t))``, ``s(t) = sqrt(1 - alpha_bar(t))`` with ``log alpha_bar`` the
    integral of the clipped ``-beta``: exact cosine before ``t_clip`` and linear in ``t`` after it.
    Discrete betas: ``beta_i = min(1 - alpha_bar(i/N) / alpha_bar((i-1)/N), 0.999)``.
    ``beta_min``/``beta_max`` are not used by the cosine schedule.
    """

    COSINE_S = 0.008
    COSINE_MAX_BETA = 0.999

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0, N: int = 1000, schedule: str = "linear"):
        super().__init__(N)
        if schedule not in ("linear", "cosine"):
            raise ValueError(f"schedule must be one of 'linear', 'cosine'; got {schedule!r}")
        self.schedule = schedule
        self.beta_0, self.beta_1 = self.beta_min, self.beta_max = _check_beta_range(beta_min, beta_max, schedule == "linear")
        if schedule == "linear":
            if not beta_max < N:
                raise ValueError(
                    f"N must be > beta_max for the linear VP schedule (DDPM's discrete betas beta_max/N must be < 1); "
                    f"got N={N}, beta_max={beta_max}"
                )
            self.discrete_betas = torch.linspace(beta_min / N, beta_max / N, N, dtype=torch.float64)
        else:
            s = self.COSINE_S
            self._beta_clip = -N * math.log(1.0 - self.COSINE_MAX_BETA)
            # t_clip solves pi/(1+s) tan(phi(t)) = beta_clip
            phi_clip = math.atan(self._beta_clip * (1 + s) / math.pi)
            self._t_clip = min(phi_clip * 2 / math.pi * (1 + s) - s, self.T)
            i = torch.arange(N + 1, dtype=torch.float64) / N
            ab = self._cosine_f(i) / self._cosine_f(torch.zeros(1, dtype=torch.float64))
            self.discrete_betas = torch.clamp(1 - ab[1:] / ab[:-1], max=self.COSINE_MAX_BETA)
        self.alphas = 1.0 - self.discrete_betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        self.sqrt_alphas_cumprod = torch.sqrt(self.alphas_cumprod)
        self.sqrt_1m_alphas_cumprod = torch.sqrt(1.0 - self.alphas_cumprod)
        self._warn_if_prior_far()

    def __repr__(self):
        return f"VPSDE(beta_min={self.beta_min}, beta_max={self.beta_max}, N={self.N}, schedule={self.schedule!r})"

    # cosine helpers
    def _cosine_f(self, t: torch.Tensor) -> torch.Tensor:
        s = self.COSINE_S
        return torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2

    def _cosine_log_alpha_bar_unclipped(self, t: torch.Tensor) -> torch.Tensor:
        s = self.COSINE_S
        return 2 * torch.log(torch.cos((t + s) / (1 + s) * math.pi / 2)) - 2 * math.log(math.cos(s / (1 + s) * math.pi / 2))

    def beta(self, t: torch.Tensor) -> torch.Tensor:
        """Noise rate ``beta(t)``, same shape as ``t``."""
        if self.schedule == "linear":
            return _linear_beta(t, self.beta_0, self.beta_1)
        s = self.COSINE_S
        phi = torch.clamp((t + s) / (1 + s), max=1.0) * math.pi / 2
        return torch.clamp(math.pi / (1 + s) * torch.tan(phi), max=self._beta_clip)

    def log_mean_coeff(self, t: torch.Tensor) -> torch.Tensor:
        """``log m(t) = -1/2 int_0^t beta``, same shape as ``t``."""
        if self.schedule == "linear":
            return _linear_log_mean_coeff(t, self.beta_0, self.beta_1)
        tc = torch.full_like(t, self._t_clip)
        before = self._cosine_log_alpha_bar_unclipped(torch.minimum(t, tc))
        after = -self._beta_clip * torch.clamp(t - tc, min=0.0)
        return torch.clamp(0.5 * (before + after), max=0.0)

    def sde(self, x, t):
        t = as_time(t, x, self.T)
        beta_t = self.beta(t)
        drift = -0.5 * batch_broadcast(beta_t, x) * x
        return drift, torch.sqrt(beta_t)

    def marginal_coef(self, t):
        lm = self.log_mean_coeff(check_time(t, self.T))
        return torch.exp(lm), torch.sqrt(-torch.expm1(2.0 * lm))

    @property
    def prior_std(self) -> float:
        return 1.0

    def t_from_log_snr(self, lam: torch.Tensor, iters: int = 80) -> torch.Tensor:
        """Closed form for the linear schedule (Lu et al. 2022, App.):
        ``t = 2 log(e^{-2 lam} + 1) / (sqrt(b0^2 + 2 (b1 - b0) log(e^{-2 lam} + 1)) + b0)``."""
        if self.schedule != "linear":
            return super().t_from_log_snr(lam, iters)
        tmp = torch.nn.functional.softplus(-2.0 * lam)  # log(e^{-2 lam} + 1)
        b0, b1 = self.beta_0, self.beta_1
        return (2.0 * tmp / (torch.sqrt(b0**2 + 2.0 * (b1 - b0) * tmp) + b0)).clamp(0.0, self.T)

    def discretize(self, x, t):
        """DDPM step: ``x_{i+1} = sqrt(1 - beta_i) x_i + sqrt(beta_i) z`` with ``i = discrete_timestep(t)``."""
        t = as_time(t, x, self.T)
        i = self.discrete_timestep(t)
        beta = self.discrete_betas.to(x.device)[i].to(x.dtype)
        f = batch_broadcast(torch.sqrt(1.0 - beta), x) * x - x
        return f, torch.sqrt(beta)


class SubVPSDE(SDE):
    """Sub-VP SDE ``dx = -1/2 beta(t) x dt + sqrt(beta(t) (1 - exp(-2 int_0^t beta))) dw``.

    Linear ``beta(t)``; ``m(t) = exp(c(t))``, ``s(t) = 1 - exp(2 c(t))`` (no square root), with
    ``c(t)`` as for ``VPSDE``. Its variance is below the VP variance at every ``t``.
    ``discretize`` is Euler–Maruyama (the base class).
    """

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0, N: int = 1000):
        super().__init__(N)
        self.beta_0, self.beta_1 = self.beta_min, self.beta_max = _check_beta_range(beta_min, beta_max)
        self._warn_if_prior_far()

    def __repr__(self):
        return f"SubVPSDE(beta_min={self.beta_min}, beta_max={self.beta_max}, N={self.N})"

    def beta(self, t: torch.Tensor) -> torch.Tensor:
        return _linear_beta(t, self.beta_0, self.beta_1)

    def log_mean_coeff(self, t: torch.Tensor) -> torch.Tensor:
        return _linear_log_mean_coeff(t, self.beta_0, self.beta_1)

    def sde(self, x, t):
        t = as_time(t, x, self.T)
        beta_t = self.beta(t)
        drift = -0.5 * batch_broadcast(beta_t, x) * x
        discount = -torch.expm1(4.0 * self.log_mean_coeff(t))  # 1 - exp(-2 int beta)
        return drift, torch.sqrt(beta_t * discount)

    def marginal_coef(self, t):
        lm = self.log_mean_coeff(check_time(t, self.T))
        return torch.exp(lm), -torch.expm1(2.0 * lm)

    @property
    def prior_std(self) -> float:
        return 1.0


class VESDE(SDE):
    """Variance-exploding SDE ``dx = sigma(t) sqrt(2 log(sigma_max / sigma_min)) dw`` (continuous SMLD).

    ``sigma(t) = sigma_min (sigma_max / sigma_min)^t``; ``m(t) = 1``, ``s(t) = sigma(t)``. As in the
    paper, the marginal at time ``t`` is the data convolved with ``N(0, sigma(t)^2 I)``: the process
    is taken to start from ``p_0 = p_data * N(0, sigma_min^2 I)``.
    Discrete SMLD levels ``sigma_i = exp(linspace(log sigma_min, log sigma_max, N))``.
    """

    def __init__(self, sigma_min: float = 0.01, sigma_max: float = 50.0, N: int = 1000):
        super().__init__(N)
        self.sigma_min = check_positive("sigma_min", sigma_min)
        self.sigma_max = check_positive("sigma_max", sigma_max)
        if not sigma_min < sigma_max:
            raise ValueError(f"sigma_min must be < sigma_max; got sigma_min={sigma_min}, sigma_max={sigma_max}")
        self.discrete_sigmas = torch.exp(
            torch.linspace(math.log(sigma_min), math.log(sigma_max), N, dtype=torch.float64)
        )
        self._warn_if_prior_far()

    def __repr__(self):
        return f"VESDE(sigma_min={self.sigma_min}, sigma_max={self.sigma_max}, N={self.N})"

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        return self.sigma_min * (self.sigma_max / self.sigma_min) ** t

    def sde(self, x, t):
        t = as_time(t, x, self.T)
        drift = torch.zeros_like(x)
        diffusion = self.sigma(t) * math.sqrt(2 * math.log(self.sigma_max / self.sigma_min))
        return drift, diffusion

    def marginal_coef(self, t):
        t = check_time(t, self.T)
        return torch.ones_like(t), self.sigma(t)

    @property
    def prior_std(self) -> float:
        return self.sigma_max

    def t_from_log_snr(self, lam: torch.Tensor, iters: int = 80) -> torch.Tensor:
        """``lambda = -log sigma(t)``, so ``t = (-lam - log sigma_min) / log(sigma_max / sigma_min)``."""
        t = (-lam - math.log(self.sigma_min)) / math.log(self.sigma_max / self.sigma_min)
        return t.clamp(0.0, self.T)

    def discretize(self, x, t):
        """SMLD step: ``x_{i+1} = x_i + sqrt(sigma_{i+1}^2 - sigma_i^2) z`` (``sigma_{-1} = 0``)."""
        t = as_time(t, x, self.T)
        i = self.discrete_timestep(t)
        sigmas = self.discrete_sigmas.to(x.device)
        sigma = sigmas[i]
        adjacent = torch.where(i == 0, torch.zeros_like(sigma), sigmas[(i - 1).clamp(min=0)])
        f = torch.zeros_like(x)
        return f, torch.sqrt(sigma**2 - adjacent**2).to(x.dtype)
