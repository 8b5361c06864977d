"""Exact likelihoods through the probability-flow ODE and bits/dim of discrete data.

Probability-flow ODE (Song et al. 2021, eq. 13 and App. D.2). For a forward SDE
``dx = f(x, t) dt + g(t) dw`` with score ``s(x, t) ~ grad_x log p_t(x)`` the ODE

    dx/dt = f~(x, t) = f(x, t) - 1/2 g(t)^2 s(x, t)

carries ``p_eps`` to ``p_T``, and along one of its trajectories (instantaneous change of variables)

    log p_eps(x(eps)) = log p_T(x(T)) + int_eps^T div_x f~(x(t), t) dt.

``log_likelihood`` integrates the augmented state ``[x, int div f~]`` from ``eps`` to ``T`` with
torchdiffeq on the tensors' own device and adds the prior ``log p_T(z) ~ sde.prior_logp(z)``.
The divergence is either the exact Jacobian trace or the Hutchinson–Skilling estimate
``div f~ ~ v^T (d f~ / dx) v`` with probes ``v`` held fixed during the solve.

Discrete data and bits/dim follow ``scoresde.data.transforms``: levels ``k in {0..L-1}^D``,
``u = (k + U) / L``, model scale ``y = a u + b`` with ``(a, b) = (2, -1)`` (centred) or ``(1, 0)``.

``evaluate_bpd`` evaluates a dataset; its loop and result (``BPDResult``) are shared with the discrete DDPM ELBO,
which lives in ``scoresde.elbo`` (``ddpm_elbo``, ``evaluate_elbo``, ``ELBOResult``,
``discretized_gaussian_log_likelihood``; still importable from here).

All per-sample outputs have shape ``(B,)``; log-densities are in nats, bits/dim in bits.
"""

from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
from torchdiffeq import odeint
from tqdm.auto import tqdm

from .data.transforms import scale_affine, uniform_dequantize
from .sde import SDE
from .samplers._common import CountingScore
from .samplers.ode import ERROR_NORMS, TORCHDIFFEQ_ADAPTIVE, TORCHDIFFEQ_FIXED, odeint_options, probability_flow_drift
from ._validate import check_choice, check_int, check_positive

__all__ = [
    "check_likelihood_options",
    "LikelihoodResult",
    "BPDResult",
    "ELBOResult",
    "log_likelihood",
    "bits_per_dim",
    "dequantized_bits_per_dim",
    "evaluate_bpd",
    "ddpm_elbo",
    "evaluate_elbo",
    "discretized_gaussian_log_likelihood",
]

# ``method``: torchdiffeq's solvers (the sampler's lists, less scipy's RK45, which cannot carry the divergence)
METHODS = TORCHDIFFEQ_ADAPTIVE + TORCHDIFFEQ_FIXED
DIVERGENCES = ("exact", "hutchinson")
NOISES = ("rademacher", "gaussian")
# ``log_likelihood`` options checked by ``check_likelihood_options``
_SOLVER_OPTIONS = ("divergence", "probes", "noise", "method", "rtol", "atol", "eps", "error_norm", "chunk_size")


# --------------------------------------------------------------------------------------------
# results
# --------------------------------------------------------------------------------------------
@dataclass
class LikelihoodResult:
    """Output of ``log_likelihood`` for a batch of ``B`` samples.

    Attributes:
        logp: ``(B,)`` log-density of ``x`` at time ``eps``, in nats:
            ``prior_logp + delta_logp`` (the mean over probes for Hutchinson).
        z: ``(B, *dims)`` latent ``x(T)`` reached by the probability-flow ODE.
        nfe: number of calls of ``score_fn`` made (counted, not computed from a formula).
        stderr: ``(B,)`` per-sample standard error of ``logp`` over the Hutchinson probes
            (``std_p / sqrt(P)`` with ``ddof=1``); ``None`` for the exact divergence or one probe.
        prior_logp: ``(B,)`` ``log p_T(z)`` under the SDE's prior.
        delta_logp: ``(B,)`` ``int_eps^T div f~ dt`` (probe mean).
        probe_logp: ``(B, P)`` ``logp`` of each probe's integral (Hutchinson only), else ``None``.
    """

    logp: torch.Tensor
    z: torch.Tensor
    nfe: int
    stderr: torch.Tensor | None
    prior_logp: torch.Tensor
    delta_logp: torch.Tensor
    probe_logp: torch.Tensor | None = None


@dataclass
class BPDResult:
    """Dataset-level bits/dim: ``mean`` and its standard error ``stderr = std(bpd) / sqrt(n)`` over
    the ``n`` samples, the per-sample values ``bpd`` ``(n,)`` and the total ``nfe`` spent."""

    mean: float
    stderr: float
    bpd: torch.Tensor
    nfe: int


# --------------------------------------------------------------------------------------------
# validation helpers
# --------------------------------------------------------------------------------------------
def _check_float_batch(name: str, x) -> torch.Tensor:
    if not torch.is_tensor(x):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(x).__name__}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point tensor; got {x.dtype}")
    if x.dim() < 2 or x.shape[0] < 1:
        raise ValueError(f"{name} must have shape (B, *dims) with B >= 1 and at least one data dim; got {tuple(x.shape)}")
    return x


def _check_int_batch(name: str, k) -> torch.Tensor:
    if not torch.is_tensor(k):
        raise TypeError(f"{name} must be a torch.Tensor of integer levels; got {type(k).__name__}")
    if k.dtype.is_floating_point or k.dtype.is_complex or k.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer levels (an integer dtype); got {k.dtype}")
    if k.dim() < 2 or k.shape[0] < 1:
        raise ValueError(f"{name} must have shape (B, *dims) with B >= 1; got {tuple(k.shape)}")
    return k


def _check_levels_range(k: torch.Tensor, levels: int) -> None:
    lo, hi = int(k.min()), int(k.max())
    if lo < 0 or hi > levels - 1:
        raise ValueError(f"data values must lie in [0, levels - 1] = [0, {levels - 1}]; got [{lo}, {hi}]")


def _logmeanexp(a: torch.Tensor, dim: int) -> torch.Tensor:
    return torch.logsumexp(a, dim=dim) - math.log(a.shape[dim])


# --------------------------------------------------------------------------------------------
# the probability-flow ODE and its divergence
# --------------------------------------------------------------------------------------------
def _default_chunk(B: int, D: int) -> int:
    """Basis vectors per vectorised VJP batch: keep ``chunk * B * D`` near 2^22 elements."""
    return max(1, min(D, (1 << 22) // max(1, B * D)))


def _drift_and_vjps(drift, x: torch.Tensor, chunks: list, vectorize: bool):
    """``f~(x)`` and the quadratic forms ``v^T (d f~/dx) v`` per sample for every vector ``v`` of every
    chunk; ``chunks`` is a list of zero-argument callables each returning vectors ``(c, B, *dims)``
    (built lazily, so the exact trace never holds the whole basis). Returns ``(f~ like x, (sum c, B))``.

    One forward evaluation of the drift (one ``score_fn`` call) with autograd, then vector-Jacobian
    products ``v^T (d f~/dx)`` by reverse mode: batched over a chunk (``is_grads_batched``, i.e. vmap over
    the backward pass) or, with ``vectorize=False``, one backward pass per vector. The graph is released
    by the last backward pass.
    """
    with torch.enable_grad():
        y = x.detach().requires_grad_(True)
        out = drift(y)
        quad = []
        for ci, make in enumerate(chunks):
            V = make()
            last = ci == len(chunks) - 1
            if vectorize and V.shape[0] > 1:
                (vj,) = torch.autograd.grad(out, y, V, retain_graph=not last, is_grads_batched=True)
            else:
                n = V.shape[0]
                vj = torch.stack([torch.autograd.grad(out, y, V[j], retain_graph=not (last and j == n - 1))[0] for j in range(n)])
            quad.append((vj * V).flatten(2).sum(-1))
    return out.detach(), torch.cat(quad, 0).detach()


def _basis_chunk(x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Standard basis vectors ``e_start .. e_{stop-1}`` (the same for every sample), shape ``(stop - start, B, *dims)``."""
    B, D, c = x.shape[0], x[0].numel(), stop - start
    E = torch.zeros(c, D, device=x.device, dtype=x.dtype)
    E[torch.arange(c, device=x.device), torch.arange(start, stop, device=x.device)] = 1.0
    return E[:, None, :].expand(c, B, D).reshape((c,) + tuple(x.shape))


def _draw_probes(P: int, x: torch.Tensor, noise: str, generator) -> torch.Tensor:
    """``P`` probes per sample ``(P, B, *dims)``: Rademacher (+-1) or standard normal entries."""
    shape = (P,) + tuple(x.shape)
    if noise == "rademacher":
        r = torch.randint(0, 2, shape, generator=generator, device=x.device)
        return r.to(x.dtype) * 2 - 1
    return torch.randn(shape, generator=generator, device=x.device, dtype=x.dtype)


def check_likelihood_options(
    divergence: str = "hutchinson",
    probes: int = 1,
    noise: str = "rademacher",
    method: str = "dopri5",
    rtol: float = 1e-5,
    atol: float = 1e-5,
    eps: float = 1e-5,
    error_norm: str = "per_sample",
    chunk_size: int | None = None,
    T: float = SDE.T,
) -> None:
    """Check ``log_likelihood``'s solver options (the part of its validation that needs no data, model or
    SDE but the end time ``T``): raises ``ValueError`` naming the option and its allowed values.
    ``log_likelihood`` and ``evaluate_bpd`` call it before any work; so does the config layer."""
    check_choice("divergence", divergence, DIVERGENCES)
    check_choice("noise", noise, NOISES)
    check_choice("method", method, METHODS)
    check_choice("error_norm", error_norm, ERROR_NORMS)
    check_int("probes", probes)
    check_positive("rtol", rtol)
    check_positive("atol", atol)
    if not check_positive("eps", eps) < T:
        raise ValueError(f"eps must lie in (0, T) = (0, {T}); got {eps}")
    if chunk_size is not None:
        check_int("chunk_size", chunk_size)
    if divergence == "exact" and probes != 1:
        raise ValueError(f"probes applies to divergence='hutchinson' only; got probes={probes} with 'exact'")


def log_likelihood(
    score_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    sde: SDE,
    x: torch.Tensor,
    divergence: str = "hutchinson",
    probes: int = 1,
    noise: str = "rademacher",
    method: str = "dopri5",
    rtol: float = 1e-5,
    atol: float = 1e-5,
    eps: float = 1e-5,
    generator: torch.Generator | None = None,
    error_norm: str = "per_sample",
    chunk_size: int | None = None,
    vectorize: bool = True,
    options: dict | None = None,
    progress: bool = False,
) -> LikelihoodResult:
    """Log-density of ``x`` under the model's ``p_eps`` via the probability-flow ODE.

    Solves, from ``t = eps`` to ``t = T`` (torchdiffeq ``method`` with ``rtol``/``atol``)::

        dx/dt = f~(x, t),   d delta/dt = div_x f~(x, t),   x(eps) = x,  delta(eps) = 0
        log p_eps(x) = prior_logp(x(T)) + delta(T)

    Divergence:
        ``"exact"``: ``tr(d f~/dx) = sum_d e_d^T J e_d`` from ``D`` vector-Jacobian products per drift
        evaluation, batched (autograd's ``is_grads_batched``) in chunks of ``chunk_size`` basis vectors
        (default: about 2^22 / (B D)); for moderate ``D``.
        ``"hutchinson"``: ``v^T J v`` with ``probes`` independent probes per sample (``noise``:
        Rademacher or standard normal, drawn from ``generator``), each held fixed during the solve.
        All probes share ONE solve: the state carries one integral per probe, so each costs one VJP
        per step, not a new solve. Given the trajectory the ``P`` integrals are i.i.d. unbiased
        estimates of ``int tr J``; ``logp`` is their mean and ``stderr`` their standard error
        ``std / sqrt(P)`` (an honest error bar for the probe noise; the ODE error is set by the tolerances).

    Error control (``error_norm``, the samplers' names): ``"per_sample"`` (default) makes the adaptive solver's
    error norm the max over samples of each sample's RMS error ratio over its own ``[x, delta]``, so the
    tolerance holds for every sample while the batch is still solved as one state (one step size for all);
    ``"batch"`` is torchdiffeq's default RMS over the whole state (as the reference code), which lets
    single samples be far less accurate than the mean (measured: 2-D mixture, VP, rtol = atol = 1e-5,
    200 samples: max error 6e-3 nats/dim with ``"batch"``, 1e-4 with ``"per_sample"`` at ~1.3x the NFE;
    solving samples one by one reaches the same accuracy at ~50x the wall time).
    Fixed-step methods take their ``step_size`` through ``options``.

    Args:
        score_fn: ``score_fn(x, t) -> tensor like x`` with ``t`` of shape ``(B,)``; it must treat the
            samples of a batch independently and be differentiable by autograd (and its backward
            vmappable, unless ``vectorize=False``: then one backward pass per probe / basis vector).
        sde: the forward ``SDE`` (its ``sde`` gives ``f``, ``g``; its prior gives ``prior_logp``).
        x: ``(B, *dims)`` floating data on the model's scale, the state at time ``eps``.
        eps: the lower integration limit, ``0 < eps < sde.T``.
        progress: show a tqdm bar of integrated time.

    Returns:
        ``LikelihoodResult`` (``logp``, ``z``, ``nfe``, ``stderr``, ``prior_logp``, ``delta_logp``, ``probe_logp``).
    """
    if not isinstance(sde, SDE):
        raise TypeError(f"sde must be an SDE instance; got {type(sde).__name__}")
    if not callable(score_fn):
        raise TypeError(f"score_fn must be callable score_fn(x, t); got {type(score_fn).__name__}")
    x = _check_float_batch("x", x)
    check_likelihood_options(divergence, probes, noise, method, rtol, atol, eps, error_norm, chunk_size, T=sde.T)
    rtol, atol, eps = float(rtol), float(atol), float(eps)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None; got {type(generator).__name__}")
    if generator is not None and torch.device(generator.device).type != x.device.type:
        raise ValueError(f"generator must be on x's device {x.device}; got {generator.device}")
    if x.dtype in (torch.float16, torch.bfloat16):
        raise TypeError(f"x has dtype {x.dtype}: the PF-ODE solve needs float32 or float64 (the adaptive step size "
                        "underflows in half precision); pass x.float() and a score_fn that accepts it")

    B, shape, D = x.shape[0], tuple(x.shape), x[0].numel()
    P = probes if divergence == "hutchinson" else 1
    V = _draw_probes(P, x, noise, generator) if divergence == "hutchinson" else None
    chunk = chunk_size or _default_chunk(B, D)

    counted = CountingScore(score_fn)
    # f~(t, x), t clamped to [eps, T]: torchdiffeq's initial-step heuristic may probe beyond T (seen at t = 1.6 under VE)
    drift = probability_flow_drift(counted, sde, eps)
    bar = tqdm(total=float(sde.T - eps), disable=not progress, desc="PF-ODE", unit="t")

    # rows that are or become non-finite are frozen (zero derivative) so they cannot stop the solve of the others
    # ("underflow in dt"); their logp is NaN, with a warning
    bad = ~torch.isfinite(x.detach().reshape(B, D)).all(dim=1)

    def rhs(t, state):
        nonlocal bad
        y = state[:, :D].reshape(shape)
        if progress and bar.n < float(t) - eps:
            bar.update(float(t) - eps - bar.n)
        if V is None:
            chunks = [functools.partial(_basis_chunk, y, i, min(D, i + chunk)) for i in range(0, D, chunk)]
        else:
            chunks = [lambda: V]
        dy, quad = _drift_and_vjps(lambda u: drift(t, u), y, chunks, vectorize)
        ddelta = quad.sum(0, keepdim=True) if V is None else quad  # (P, B)
        out = torch.cat([dy.reshape(B, D), ddelta.T], dim=1)
        bad = bad | ~torch.isfinite(out).all(dim=1)
        return torch.where(bad[:, None], torch.zeros_like(out), out)

    ts = torch.tensor([eps, sde.T], device=x.device, dtype=x.dtype)
    # adaptive: land on T exactly (never evaluate the score beyond T), per-sample error control as the sampler's
    opts = odeint_options(B, ts[1:], error_norm, options) if method in TORCHDIFFEQ_ADAPTIVE else dict(options or {})
    x0 = torch.where(bad[:, None], torch.zeros_like(x.detach().reshape(B, D)), x.detach().reshape(B, D))
    state0 = torch.cat([x0, torch.zeros(B, P, device=x.device, dtype=x.dtype)], dim=1)
    try:
        with torch.no_grad():
            sol = odeint(rhs, state0, ts, rtol=rtol, atol=atol, method=method, options=opts)[-1]
        bar.update(bar.total - bar.n)
    finally:
        bar.close()

    n_bad = int(bad.sum())
    if n_bad:
        warnings.warn(f"log_likelihood: {n_bad} of {B} samples are non-finite or met a non-finite drift/divergence "
                      "(score); their logp is NaN, the other samples are computed", RuntimeWarning, stacklevel=2)
        sol = torch.where(bad[:, None], torch.full_like(sol, float("nan")), sol)
    z = sol[:, :D].reshape(shape)
    deltas = sol[:, D:]  # (B, P)
    prior = sde.prior_logp(z)
    probe_logp = prior[:, None] + deltas
    logp = probe_logp.mean(1)
    stderr = probe_logp.std(1, unbiased=True) / math.sqrt(P) if P > 1 else None
    return LikelihoodResult(
        logp=logp,
        z=z,
        nfe=counted.calls,
        stderr=stderr,
        prior_logp=prior,
        delta_logp=deltas.mean(1),
        probe_logp=probe_logp if divergence == "hutchinson" else None,
    )


# --------------------------------------------------------------------------------------------
# bits/dim of discrete data
# --------------------------------------------------------------------------------------------
def bits_per_dim(logp: torch.Tensor, D: int, levels: int = 256, centered: bool = True) -> torch.Tensor:
    """Bits/dim of discrete data from the log-density of its dequantised, scaled value.

    Derivation. Levels ``k in {0..L-1}^D`` are dequantised to ``v = k + U in [0, L)^D``
    (``U ~ U[0,1)^D``) and the model sees ``y = a v / L + b`` (``(a, b) = (2, -1)`` centred, else
    ``(1, 0)``). The change of variables ``v -> y`` has Jacobian ``(a / L)^D``, so
    ``log p_v(v) = log p_y(y) + D log(a / L)`` and the dequantised bits/dim (the usual definition,
    density on the integer scale ``[0, L)``) is::

        bpd = -log p_v(v) / (D ln 2) = -log p_y(y) / (D ln 2) - log2(a) + log2(L)

    i.e. ``+ 7`` for 8-bit data on ``[-1, 1)`` and ``+ 8`` on ``[0, 1)``. Because
    ``P(k) = int_{[0,1)^D} p_v(k + U) dU >= exp E[log p_v(k + U)]`` (Jensen), the expected value is
    an upper bound on the discrete ``-log2 P(k) / D``.

    Args:
        logp: ``(B,)`` ``log p_y(y)`` in nats (e.g. ``log_likelihood(...).logp``).
        D: number of data dimensions per sample.
        levels: ``L``, the number of discrete levels per dimension (256 for 8-bit, 17 for the digits).
        centered: model scale ``[-1, 1)`` (``a = 2``) or ``[0, 1)`` (``a = 1``).

    Returns:
        ``(B,)`` bits/dim.
    """
    if not torch.is_tensor(logp):
        raise TypeError(f"logp must be a torch.Tensor; got {type(logp).__name__}")
    check_int("D", D)
    check_int("levels", levels, 2)
    a, _ = scale_affine(bool(centered))
    return -logp / (D * math.log(2.0)) - math.log2(a) + math.log2(levels)


def dequantized_bits_per_dim(
    log_density: Callable[[torch.Tensor], torch.Tensor],
    k: torch.Tensor,
    levels: int = 256,
    centered: bool = True,
    draws: int = 1,
    generator: torch.Generator | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Bits/dim of integer data ``k`` from a continuous model density, with ``J = draws`` dequantisations.

    With ``y_j = a (k + U_j) / L + b`` (``uniform_dequantize``) and ``log p_y(y_j) = log_density(y_j)``,
    the importance-weighted estimate of the discrete log-probability is::

        log P(k) ~ log (1/J) sum_j p_v(k + U_j) = logmeanexp_j log p_y(y_j) + D log(a) - D log(L)

    and the result is ``-log P(k) / (D ln 2)``, i.e. ``bits_per_dim(logmeanexp_j log p_y(y_j))``.
    ``J = 1`` is the usual dequantised bound; it is an upper bound in expectation for every ``J``
    and decreases to the exact discrete value as ``J`` grows.

    The ``J`` draws are concatenated into one batch of ``J B`` samples for a single
    ``log_density`` call (draw-major: rows ``j B .. (j+1) B - 1`` hold draw ``j``).

    Args:
        log_density: ``y (N, *dims) -> (N,)`` log-density on the model scale, in nats.
        k: ``(B, *dims)`` integer levels in ``[0, levels - 1]``.
        draws: ``J >= 1``.
        generator: source of the dequantisation noise.
        dtype: floating dtype of ``y`` (default: torch's default dtype).

    Returns:
        ``(B,)`` bits/dim.
    """
    k = _check_int_batch("k", k)
    check_int("levels", levels, 2)
    draws = check_int("draws", draws)
    _check_levels_range(k, levels)
    B, D = k.shape[0], k[0].numel()
    kk = k.repeat((draws,) + (1,) * (k.dim() - 1))
    y = uniform_dequantize(kk, levels, centered, generator=generator, dtype=dtype)
    logp = log_density(y)
    if not torch.is_tensor(logp) or logp.shape != (draws * B,):
        raise ValueError(f"log_density must return a tensor of shape (N,) = ({draws * B},); got {getattr(logp, 'shape', type(logp))}")
    return bits_per_dim(_logmeanexp(logp.reshape(draws, B), 0), D, levels, centered)


def _iter_batches(data, batch_size: int):
    """Yield integer batches from a tensor ``(N, *dims)`` (split by ``batch_size``) or an iterable of
    tensors / ``(tensor, ...)`` tuples (taken as they come)."""
    if torch.is_tensor(data):
        _check_int_batch("data", data)
        yield from torch.split(data, batch_size)
        return
    for item in data:
        yield item[0] if isinstance(item, (tuple, list)) else item


def _evaluate_batches(bpd_of_batch, data, batch_size: int, device, progress: bool, desc: str) -> BPDResult:
    """Dataset bits/dim from a per-batch evaluation: ``bpd_of_batch(k) -> (bpd (B,), nfe)`` on every integer
    batch ``k`` of ``data`` (``_iter_batches``; checked, then moved to ``device`` unless ``None``).
    Returns the mean over all ``n`` samples, its standard error ``std / sqrt(n)`` (nan for ``n = 1``), the
    values and the summed ``nfe``. The shared loop of ``evaluate_bpd`` and ``scoresde.elbo.evaluate_elbo``."""
    values, nfe = [], 0
    for k in tqdm(_iter_batches(data, batch_size), disable=not progress, desc=desc, unit="batch"):
        k = _check_int_batch("data batch", k)
        if device is not None:
            k = k.to(device)
        bpd_k, nfe_k = bpd_of_batch(k)
        values.append(bpd_k.detach())
        nfe += nfe_k
    if not values:
        raise ValueError("data must contain at least one sample")
    bpd = torch.cat(values)
    n = bpd.numel()
    se = float(bpd.std(unbiased=True)) / math.sqrt(n) if n > 1 else float("nan")
    return BPDResult(mean=float(bpd.mean()), stderr=se, bpd=bpd, nfe=nfe)


def evaluate_bpd(
    score_fn,
    sde: SDE,
    data,
    levels: int = 256,
    centered: bool = True,
    batch_size: int = 128,
    draws: int = 1,
    generator: torch.Generator | None = None,
    dtype: torch.dtype | None = None,
    device=None,
    progress: bool = False,
    **likelihood_kwargs,
) -> BPDResult:
    """Dataset bits/dim of integer data under the probability-flow ODE of ``(score_fn, sde)``.

    For every batch: ``dequantized_bits_per_dim`` with ``log_density = log_likelihood(score_fn, sde, .,
    generator=generator, **likelihood_kwargs).logp`` (``draws`` dequantisations per sample, one ODE
    solve per batch). Returns the mean over samples and its standard error ``std / sqrt(n)``.

    Args:
        data: integer tensor ``(N, *dims)`` or an iterable of integer batches (or ``(batch, label)``).
        batch_size: samples per ODE solve when ``data`` is a tensor (``draws * batch_size`` states).
        device: where to compute (default: each batch's device).
        progress: tqdm bar over batches.
        likelihood_kwargs: passed to ``log_likelihood`` (``divergence``, ``probes``, ``rtol``, ``eps`` ...).

    Returns:
        ``BPDResult(mean, stderr, bpd (N,), nfe)``.
    """
    check_int("levels", levels, 2)
    check_int("batch_size", batch_size)
    check_int("draws", draws)
    if "generator" in likelihood_kwargs:
        raise TypeError("pass generator as evaluate_bpd's own argument")
    if not isinstance(sde, SDE):
        raise TypeError(f"sde must be an SDE instance; got {type(sde).__name__}")
    # validate the solver options before any work
    check_likelihood_options(**{k: v for k, v in likelihood_kwargs.items() if k in _SOLVER_OPTIONS}, T=sde.T)

    def bpd_of_batch(k):
        nfe = [0]

        def log_density(y):
            res = log_likelihood(score_fn, sde, y, generator=generator, **likelihood_kwargs)
            nfe[0] += res.nfe
            return res.logp

        bpd = dequantized_bits_per_dim(log_density, k, levels, centered, draws, generator, dtype)
        return bpd, nfe[0]

    return _evaluate_batches(bpd_of_batch, data, batch_size, device, progress, "bpd")


# the DDPM ELBO moved to ``scoresde.elbo``; its names stay importable from here. Imported last: ``scoresde.elbo``
# takes ``BPDResult`` and the batch helpers from this module (``scoresde/__init__`` imports this module first).
from .elbo import ELBOResult, ddpm_elbo, discretized_gaussian_log_likelihood, evaluate_elbo  # noqa: E402
