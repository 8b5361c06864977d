"""Training losses: continuous denoising score matching, discrete DDPM and SMLD.

Continuous DSM (Song et al. 2021, eq. 7), with ``x_t = m(t) x_0 + s(t) z``::

    J(theta) = E_{t ~ U(eps, T)} E_{x_0, z} [ lambda(t) || score(x_t, t) + z / s(t) ||^2 ]
             = E [ lambda(t) / s(t)^2 || eps_hat(x_t, t) - z ||^2 ],   eps_hat = -s score

* ``weighting="default"``: ``lambda = s^2`` -> ``|| eps_hat - z ||^2`` (the ε-MSE for VP);
* ``weighting="likelihood"``: ``lambda = g^2`` (Song, Durkan, Murray, Ermon 2021) -> ``(g/s)^2 || eps_hat - z ||^2``.

``reduce="mean"`` averages the squared error over the non-batch dimensions (score_sde's
``reduce_mean=True``), ``"sum"`` sums it; the result is then averaged over the batch.
Every loss draws its random numbers from ``generator`` (torch's global state if ``None``) in a
documented order, and has a ``*_per_sample`` twin that takes those numbers explicitly and
returns the per-sample losses ``(B,)``.
"""

from __future__ import annotations

import math
import weakref
from typing import Callable

import torch

from .model import ScoreModel
from .sde import SDE, VESDE, VPSDE, batch_broadcast
from ._validate import check_choice

__all__ = [
    "class_conditional",
    "conditioned_noise_mixture",
    "WEIGHTINGS",
    "REDUCES",
    "dsm_loss",
    "dsm_per_sample",
    "ddpm_loss",
    "ddpm_per_sample",
    "smld_loss",
    "smld_per_sample",
    "likelihood_importance_proposal",
    "sample_importance_t",
    "get_loss_fn",
]

WEIGHTINGS = ("default", "likelihood")
REDUCES = ("mean", "sum")
LossFn = Callable[[ScoreModel, torch.Tensor, "torch.Generator | None"], torch.Tensor]


# --- validation and random numbers ------------------------------------------------------
def _check_model(model, need=None, continuous=None):
    if not isinstance(model, ScoreModel):
        raise TypeError(f"model must be a scoresde.model.ScoreModel; got {type(model).__name__}")
    if need is not None and not isinstance(model.sde, need):
        raise TypeError(f"this loss needs a model on a {need.__name__}; got {type(model.sde).__name__}")
    if continuous is not None and model.continuous != continuous:
        raise ValueError(f"this loss needs a model with continuous={continuous}; got continuous={model.continuous}")


def _check_x0(x0):
    if not torch.is_tensor(x0) or not x0.dtype.is_floating_point or x0.dim() < 1 or x0.shape[0] < 1:
        desc = f"{x0.dtype} {tuple(x0.shape)}" if torch.is_tensor(x0) else type(x0).__name__
        raise ValueError(f"x0 must be a floating tensor of shape (B, ...) with B >= 1; got {desc}")


def _check_eps(eps, T):
    if not (isinstance(eps, (int, float)) and not isinstance(eps, bool) and 0 < eps < T):
        raise ValueError(f"eps must be a number in (0, T) = (0, {T}); got {eps!r}")
    return float(eps)


def _gen_device(generator, like):
    return generator.device if generator is not None else like.device


def _rand(n, generator, like):
    """``U[0, 1)`` of shape ``(n,)`` drawn on the generator's device, returned on ``like``'s device and dtype."""
    return torch.rand(n, generator=generator, device=_gen_device(generator, like), dtype=like.dtype).to(like.device)


def _randn(shape, generator, like):
    return torch.randn(shape, generator=generator, device=_gen_device(generator, like), dtype=like.dtype).to(like.device)


def _randint(high, n, generator, like):
    return torch.randint(0, high, (n,), generator=generator, device=_gen_device(generator, like)).to(like.device)


def _check_z(z, x0):
    if z.shape != x0.shape:
        raise ValueError(f"z must have the shape of x0 {tuple(x0.shape)}; got {tuple(z.shape)}")


def _reduce(sq: torch.Tensor, reduce: str) -> torch.Tensor:
    """Mean or sum of ``sq`` ``(B, ...)`` over the non-batch dimensions -> ``(B,)``."""
    flat = sq.reshape(sq.shape[0], -1)
    return flat.mean(dim=1) if reduce == "mean" else flat.sum(dim=1)


# --- continuous DSM -------------------------------------------------------------------------
def dsm_per_sample(
    model: ScoreModel, x0: torch.Tensor, t: torch.Tensor, z: torch.Tensor, weighting: str = "default", reduce: str = "mean"
) -> torch.Tensor:
    """Per-sample DSM loss ``lambda(t)/s(t)^2 * reduce(|| eps_hat(x_t, t) - z ||^2)`` with ``x_t = m(t) x0 + s(t) z``.

    ``lambda = s^2`` (``"default"``) or ``g^2`` (``"likelihood"``). ``x0``, ``z`` ``(B, ...)``, ``t`` ``(B,)`` -> ``(B,)``.
    """
    _check_model(model, continuous=True)
    check_choice("weighting", weighting, WEIGHTINGS)
    check_choice("reduce", reduce, REDUCES)
    _check_z(z, x0)
    return _dsm_per_sample(model, x0, t, z, weighting, reduce)


def _dsm_per_sample(model, x0, t, z, weighting, reduce):
    """``dsm_per_sample`` without the argument checks (its callers have made them)."""
    sde = model.sde
    m, s = sde.marginal_coef(t)
    x_t = batch_broadcast(m, x0) * x0 + batch_broadcast(s, x0) * z
    per = _reduce((model.eps_fn(x_t, t) - z) ** 2, reduce)
    if weighting == "likelihood":
        _, g = sde.sde(x_t.new_zeros(x_t.shape[0], 1), t)  # g(t) only; a 1-d dummy avoids computing the drift of x_t
        per = per * (g / s) ** 2
    return per


def likelihood_importance_proposal(sde: SDE, eps: float = 1e-5, n_grid: int = 2001):
    """Tabulated proposal ``q(t) ∝ g(t)^2 / s(t)^2`` on ``[eps, T]`` for importance sampling the likelihood weighting.

    Under ``q`` the likelihood-weighted integrand ``g^2 ||score + z/s||^2 = (g/s)^2 ||eps_hat - z||^2`` becomes
    ``||eps_hat - z||^2`` times a constant, removing the ``1/t`` blow-up of ``(g/s)^2`` near ``t = 0`` (VP).
    The density in ``u = log t`` (smooth for VP, sub-VP and VE) is integrated by the trapezoid rule on a
    uniform ``u``-grid of ``n_grid`` points (float64); the proposal actually sampled is the piecewise-linear
    CDF through those points, i.e. piecewise-constant density in ``u``.

    Returns ``(u, cdf)``: float64 tensors ``(n_grid,)``, ``cdf[0] = 0``, ``cdf[-1] = 1``.
    """
    eps = _check_eps(eps, sde.T)
    u = torch.linspace(math.log(eps), math.log(sde.T), n_grid, dtype=torch.float64)
    t = torch.exp(u)
    _, g = sde.sde(torch.zeros(n_grid, 1, dtype=torch.float64), t)
    _, s = sde.marginal_coef(t)
    f = (g / s) ** 2 * t  # density in u, up to normalisation
    cdf = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(0.5 * (f[1:] + f[:-1]) * (u[1:] - u[:-1]), 0)])
    return u, cdf / cdf[-1]


def sample_importance_t(
    sde: SDE, n: int, generator: torch.Generator | None = None, eps: float = 1e-5, like: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw ``t ~ q`` (``likelihood_importance_proposal``) by inverse CDF; returns ``(t, q(t))``, each ``(n,)``.

    One ``U[0, 1)`` per sample from ``generator``; ``U`` falls in grid cell ``k`` and
    ``u = u_k + (U - C_k) / (C_{k+1} - C_k) (u_{k+1} - u_k)``, ``t = e^u``; the density actually sampled is
    ``q(t) = (C_{k+1} - C_k) / ((u_{k+1} - u_k) t)``, so ``E_q[h(t) / q(t)] = int_eps^T h(t) dt`` exactly.
    Results are on ``like``'s device and dtype (float64 CPU if ``like`` is None).
    """
    return _draw_importance_t(likelihood_importance_proposal(sde, eps), sde.T, n, generator, eps, like)


def _draw_importance_t(proposal, T, n, generator, eps, like):
    """``sample_importance_t`` from a tabulated ``proposal = (u_grid, cdf)`` (no checks)."""
    like = torch.zeros((), dtype=torch.float64) if like is None else like
    u_grid, cdf = proposal
    U = _rand(n, generator, like).to(device="cpu", dtype=torch.float64)
    k = torch.searchsorted(cdf, U, right=True).clamp(1, len(cdf) - 1) - 1
    dC = cdf[k + 1] - cdf[k]
    du = u_grid[k + 1] - u_grid[k]
    u = u_grid[k] + (U - cdf[k]) / dC * du
    t = torch.exp(u).clamp(eps, T)
    q = dC / du / t
    return t.to(device=like.device, dtype=like.dtype), q.to(device=like.device, dtype=like.dtype)


def _check_dsm_options(weighting: str, reduce: str, importance_sampling: bool) -> None:
    """Shared checks of ``dsm_loss`` and ``get_loss_fn``: raises ``ValueError``/``TypeError`` naming the option."""
    check_choice("weighting", weighting, WEIGHTINGS)
    check_choice("reduce", reduce, REDUCES)
    if not isinstance(importance_sampling, bool):
        raise TypeError(f"importance_sampling must be a bool; got {importance_sampling!r}")
    if importance_sampling and weighting != "likelihood":
        raise ValueError("importance_sampling=True needs weighting='likelihood' (it samples t ∝ g^2/s^2)")


def dsm_loss(
    model: ScoreModel,
    x0: torch.Tensor,
    generator: torch.Generator | None = None,
    eps: float = 1e-5,
    weighting: str = "default",
    importance_sampling: bool = False,
    reduce: str = "mean",
) -> torch.Tensor:
    """Continuous denoising score matching (module docstring), a scalar: the batch mean of ``dsm_per_sample``.

    Draws, in order: ``t`` ``(B,)`` then ``z ~ N(0, I)`` shaped like ``x0``. Without importance sampling
    ``t ~ U(eps, T)``. With ``importance_sampling`` (only for ``weighting="likelihood"``) ``t ~ q(t) ∝ g^2/s^2``
    (``sample_importance_t``) and each per-sample loss is multiplied by ``1 / ((T - eps) q(t))``, so the
    estimator has the same expectation as the uniform-``t`` likelihood-weighted loss and lower variance.
    ``x0`` ``(B, ...)`` -> scalar.
    """
    _check_model(model, continuous=True)
    _check_x0(x0)
    _check_dsm_options(weighting, reduce, importance_sampling)
    eps = _check_eps(eps, model.sde.T)
    return _dsm_loss(model, x0, generator, eps, weighting, importance_sampling, reduce)


def _dsm_loss(model, x0, generator, eps, weighting, importance_sampling, reduce, proposal=None):
    """``dsm_loss`` without the option checks: the per-step body of ``get_loss_fn``'s continuous loss, which passes
    the importance-sampling ``proposal`` table it computed once (otherwise it is tabulated here, per call)."""
    sde = model.sde
    B = x0.shape[0]
    if importance_sampling:
        proposal = likelihood_importance_proposal(sde, eps) if proposal is None else proposal
        t, q = _draw_importance_t(proposal, sde.T, B, generator, eps, x0)
    else:
        t = eps + (sde.T - eps) * _rand(B, generator, x0)
    z = _randn(x0.shape, generator, x0)
    per = _dsm_per_sample(model, x0, t, z, weighting, reduce)
    if importance_sampling:
        per = per / ((sde.T - eps) * q)
    return per.mean()


# --- discrete losses ---------------------------------------------------------------------------
def ddpm_per_sample(model: ScoreModel, x0: torch.Tensor, i: torch.Tensor, z: torch.Tensor, reduce: str = "mean") -> torch.Tensor:
    """Per-sample DDPM loss ``reduce(|| eps_hat(x_i, i) - z ||^2)``, ``x_i = sqrt(abar_i) x0 + sqrt(1 - abar_i) z``.

    ``eps_hat = model.ddpm_eps_fn()`` (a continuous VP model is evaluated at ``model.ddpm_time(i)``).
    ``x0``, ``z`` ``(B, ...)``, ``i`` ``(B,)`` long -> ``(B,)``.
    """
    _check_model(model, need=VPSDE)
    check_choice("reduce", reduce, REDUCES)
    _check_z(z, x0)
    return _ddpm_per_sample(model, x0, i, z, reduce)


def _ddpm_per_sample(model, x0, i, z, reduce):
    """``ddpm_per_sample`` without the argument checks."""
    ab = model.sde.alphas_cumprod.to(x0.device)[i].to(x0.dtype)
    x_i = batch_broadcast(torch.sqrt(ab), x0) * x0 + batch_broadcast(torch.sqrt(1.0 - ab), x0) * z
    return _reduce((model.ddpm_eps_fn()(x_i, i) - z) ** 2, reduce)


def _check_discrete(need, model, x0, reduce) -> None:
    """The checks of ``ddpm_loss`` / ``smld_loss``."""
    _check_model(model, need=need)
    _check_x0(x0)
    check_choice("reduce", reduce, REDUCES)


def _discrete_loss(per_sample, model, x0, generator, reduce) -> torch.Tensor:
    """Batch mean of ``per_sample(model, x0, i, z, reduce)`` with ``i ~ U{0..N-1}`` ``(B,)`` drawn first, then
    ``z ~ N(0, I)`` like ``x0``: the shared body of ``ddpm_loss`` and ``smld_loss`` (no checks: callers make them)."""
    i = _randint(model.sde.N, x0.shape[0], generator, x0)
    z = _randn(x0.shape, generator, x0)
    return per_sample(model, x0, i, z, reduce).mean()


def ddpm_loss(model: ScoreModel, x0: torch.Tensor, generator: torch.Generator | None = None, reduce: str = "mean") -> torch.Tensor:
    """Discrete DDPM loss (Ho et al. 2020, L_simple): batch mean of ``ddpm_per_sample``; scalar.

    Draws, in order: ``i ~ U{0, ..., N-1}`` ``(B,)`` then ``z ~ N(0, I)`` shaped like ``x0`` ``(B, ...)``.
    """
    _check_discrete(VPSDE, model, x0, reduce)
    return _discrete_loss(_ddpm_per_sample, model, x0, generator, reduce)


def smld_per_sample(model: ScoreModel, x0: torch.Tensor, i: torch.Tensor, z: torch.Tensor, reduce: str = "mean") -> torch.Tensor:
    """Per-sample SMLD loss ``sigma_i^2 reduce(|| score(x, t_i) + z / sigma_i ||^2)``, ``x = x0 + sigma_i z``.

    ``sigma_i = sde.discrete_sigmas[i]`` (increasing in ``i``) and ``t_i = i T / (N - 1)``, at which
    ``sigma(t_i) = sigma_i`` and ``discrete_timestep(t_i) = i`` (so discrete and continuous VE models agree).
    ``x0``, ``z`` ``(B, ...)``, ``i`` ``(B,)`` long -> ``(B,)``.
    """
    _check_model(model, need=VESDE)
    check_choice("reduce", reduce, REDUCES)
    _check_z(z, x0)
    return _smld_per_sample(model, x0, i, z, reduce)


def _smld_per_sample(model, x0, i, z, reduce):
    """``smld_per_sample`` without the argument checks."""
    sde = model.sde
    sigma = sde.discrete_sigmas.to(x0.device)[i].to(x0.dtype)
    x = x0 + batch_broadcast(sigma, x0) * z
    t = i.to(x0.dtype) * (sde.T / max(sde.N - 1, 1))
    score = model.score_fn(x, t)
    return sigma**2 * _reduce((score + z / batch_broadcast(sigma, x0)) ** 2, reduce)


def smld_loss(model: ScoreModel, x0: torch.Tensor, generator: torch.Generator | None = None, reduce: str = "mean") -> torch.Tensor:
    """Discrete SMLD / NCSN loss (Song & Ermon 2019) with ``sigma_i^2`` weighting: batch mean of ``smld_per_sample``.

    Draws, in order: ``i ~ U{0, ..., N-1}`` ``(B,)`` then ``z ~ N(0, I)`` shaped like ``x0``. Scalar.
    """
    _check_discrete(VESDE, model, x0, reduce)
    return _discrete_loss(_smld_per_sample, model, x0, generator, reduce)


# --- factory -----------------------------------------------------------------------------------
def get_loss_fn(
    sde: SDE,
    continuous: bool = True,
    weighting: str = "default",
    importance_sampling: bool = False,
    reduce: str = "mean",
    eps: float = 1e-5,
) -> LossFn:
    """``loss_fn(model, x0, generator=None) -> scalar``: ``dsm_loss`` if ``continuous``, else ``ddpm_loss``
    (VPSDE) or ``smld_loss`` (VESDE). All options are validated here, once, before any training starts; each
    call of the returned function checks ``x0`` and, the first time it sees a model, that the model fits (a
    ``ScoreModel`` whose ``sde`` is (a copy of) ``sde``) and then runs the loss's body without re-checking the
    options (same numbers as ``dsm_loss`` / ``ddpm_loss`` / ``smld_loss`` with these options).
    """
    if not isinstance(sde, SDE):
        raise TypeError(f"sde must be a scoresde.sde.SDE; got {type(sde).__name__}")
    if not isinstance(continuous, bool):
        raise TypeError(f"continuous must be a bool; got {continuous!r}")
    _check_dsm_options(weighting, reduce, importance_sampling)
    eps = _check_eps(eps, sde.T)
    if not continuous:
        if not isinstance(sde, (VPSDE, VESDE)):
            raise ValueError(f"continuous=False needs a VPSDE (DDPM loss) or VESDE (SMLD loss); got {type(sde).__name__}")
        if weighting != "default" or importance_sampling:
            raise ValueError("weighting and importance_sampling apply to the continuous loss only (continuous=True)")

    checked = weakref.WeakSet()  # models already found to fit: the per-step cost is one set lookup

    def check(model, x0):
        if model not in checked:
            _check_model(model, need=None if continuous else (VPSDE if isinstance(sde, VPSDE) else VESDE),
                         continuous=True if continuous else None)
            if model.sde is not sde and repr(model.sde) != repr(sde):
                raise ValueError(f"model.sde {model.sde!r} differs from the loss's sde {sde!r}")
            checked.add(model)
        _check_x0(x0)

    if continuous:
        # the tabulated proposal of t depends only on (sde, eps): computed once, not per step (same numbers)
        proposal = likelihood_importance_proposal(sde, eps) if importance_sampling else None

        def loss_fn(model: ScoreModel, x0: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
            check(model, x0)
            return _dsm_loss(model, x0, generator, eps, weighting, importance_sampling, reduce, proposal)

    else:
        per_sample = _ddpm_per_sample if isinstance(sde, VPSDE) else _smld_per_sample

        def loss_fn(model: ScoreModel, x0: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
            check(model, x0)
            return _discrete_loss(per_sample, model, x0, generator, reduce)

    return loss_fn


def _takes_aug_level(net) -> bool:
    net = getattr(net, "module", net)  # a DistributedDataParallel wrapper
    return bool(getattr(net, "aug_cond", False))


def conditioned_noise_mixture(loss_fn: LossFn, prob: float, std_min: float, std_max: float) -> LossFn:
    """The noise-mixture augmentation made non-leaking by conditioning the network on it (EDM's augmentation
    conditioning, Karras et al. 2022).

    Each call draws ``(y, a) = noise_mixture(x0, prob, std_min, std_max, generator, return_level=True)``: with
    probability ``prob`` a sample gets ``y = x0 + a z`` (``a`` log-uniform in ``[std_min, std_max]``), else ``y = x0``
    and ``a = 0``; then it returns ``loss_fn(model, y, generator)`` with the network told each sample's ``a``
    (``model.conditioned(aug_level=a)``). The model thus learns the family of scores of ``p_a = p_data * N(0, a^2 I)``
    indexed by ``a``; sampling and likelihoods call the network without ``aug_level``, i.e. at ``a = 0``: the
    data distribution itself, with no noisy component in the samples (plain ``noise_mixture`` in ``prepare``
    instead teaches ``q = (1 - prob) p_data + prob E_a[p_a]``, whose samples are noisy one time in ``1 / prob``).

    The network must accept ``aug_level (B,)`` (built with ``aug_cond=True``, e.g. ``ConvScoreNet``); this is
    checked on the first call (``ValueError``). The augmentation draws come from ``generator`` before the loss's own.
    """
    from .data.transforms import noise_mixture

    noise_mixture(torch.zeros(1, 1), prob, std_min, std_max)  # the option checks, before any training
    if prob == 0:
        raise ValueError("conditioned_noise_mixture needs prob > 0 (an augmentation to condition on); got prob=0")
    checked = weakref.WeakSet()

    def aug_loss_fn(model: ScoreModel, x0: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        if model not in checked:
            _check_model(model)
            if not _takes_aug_level(model.net):
                raise ValueError(f"the conditioned noise mixture needs a network that takes aug_level (built with "
                                 f"aug_cond=True, e.g. ConvScoreNet); got {type(model.net).__name__}")
            checked.add(model)
        y, level = noise_mixture(x0, prob, std_min, std_max, generator, return_level=True)
        with model.conditioned(aug_level=level):
            return loss_fn(model, y, generator)

    return aug_loss_fn


def class_conditional(loss_fn: LossFn, num_classes: int, p_uncond: float = 0.1):
    """A class-conditional version of ``loss_fn`` with label dropout (classifier-free guidance, Ho & Salimans 2021).

    Returns ``loss_y(model, x0, generator, y)``: each label of ``y`` ``(B,)`` (integers in ``[0, num_classes)``) is
    replaced by the null label ``num_classes`` with probability ``p_uncond`` (one uniform draw per sample from
    ``generator``, before the loss's own draws), then ``loss_fn(model, x0, generator)`` runs with the network told the
    labels (``model.conditioned(class_labels=y')``). One network thus learns ``s(x, t, y)`` and, on the null label,
    the unconditional ``s(x, t, null)`` that guidance needs. ``p_uncond = 0`` draws nothing and never shows the null
    label (a purely conditional model); ``p_uncond = 1`` would train an unconditional model and is refused.

    ``train(..., labels=...)`` calls it with the batch's labels. The network must be built with
    ``num_classes`` equal to ``num_classes`` (checked on the first call, ``ValueError``).
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be an integer >= 1; got {num_classes!r}")
    if isinstance(p_uncond, bool) or not isinstance(p_uncond, (int, float)) or not 0 <= p_uncond < 1:
        raise ValueError(f"p_uncond (label dropout) must lie in [0, 1); got {p_uncond!r}")
    checked = weakref.WeakSet()

    def loss_y(model: ScoreModel, x0: torch.Tensor, generator: torch.Generator | None = None, y: torch.Tensor | None = None):
        if y is None:
            raise ValueError("a class-conditional loss needs the batch's labels y: train(..., labels=...)")
        if model not in checked:
            _check_model(model)
            k = model.num_classes
            if k != num_classes:
                raise ValueError(f"the class-conditional loss has num_classes={num_classes} but the network was built "
                                 f"with num_classes={k}")
            checked.add(model)
        if y.shape != (x0.shape[0],) or y.dtype.is_floating_point:
            raise ValueError(f"y must be an integer tensor of shape (B,) = ({x0.shape[0]},); got {y.dtype} {tuple(y.shape)}")
        if bool(((y < 0) | (y >= num_classes)).any()):
            raise ValueError(f"labels must lie in [0, num_classes - 1] = [0, {num_classes - 1}]; got values in "
                             f"[{int(y.min())}, {int(y.max())}]")
        y = y.long()
        if p_uncond > 0:
            drop = _rand(y.shape[0], generator, x0) < p_uncond
            y = torch.where(drop, torch.full_like(y, num_classes), y)
        with model.conditioned(class_labels=y):
            return loss_fn(model, x0, generator)

    return loss_y
