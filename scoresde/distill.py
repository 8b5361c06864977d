"""Few-step students: progressive distillation (Salimans & Ho 2022) of any teacher's DDIM sampler.

Notation: ``z_t = m(t) x + s(t) eps`` (``sde.marginal_coef``; VP and sub-VP), ``r = sqrt(m^2 + s^2)``,
``alpha = m/r``, ``sigma = s/r`` (``r = 1`` for VP). The deterministic DDIM step from ``t`` to ``u < t`` with a
data prediction ``x_hat`` is::

    z_u = m_u x_hat + (s_u / s_t) (z_t - m_t x_hat)                                    (DDIM, eta = 0)

A student ``x_hat_theta(z_t, t)`` of ``N`` steps runs DDIM on ``distill_grid(sde, N, eps, schedule)``: the sampler's
grid ``T = t_0 > ... > t_{N-1}`` with the last point moved to ``t_N = 0`` (``s(0) = 0``, so the last step returns
``x_hat`` itself). The grids of ``N`` and ``2N`` steps are nested. One round (Salimans & Ho 2022, Alg. 2) trains the
student of ``N`` steps to match two DDIM steps ``t -> t' -> t''`` of the teacher of ``2N`` steps with one::

    x_tilde = (z_t'' - (s_t''/s_t) z_t) / (m_t'' - (s_t''/s_t) m_t)       (the x_hat whose one step lands on z_t'')
    L = E_{x, i, eps} [ max(SNR(t), 1) |x_hat_theta(z_t, t) - x_tilde|^2 ],  SNR = m^2 / s^2  ("truncated SNR")

Round 0 (``teacher_steps_per_step = 1``) fits the student to the teacher's own data prediction on the grid of
``start_steps``; each later round halves the steps, the student starting from (and the teacher being) the previous
round's EMA weights. The teacher is any data prediction ``x_hat(z, t)``: a ``ScoreModel``'s ``denoise_fn`` or
Tweedie's formula on any ``score_fn`` (``teacher_from_score``), e.g. the Gaussian-mixture oracle's exact score.

Each round is one ``scoresde.train.train`` call in ``workdir/round_<k>``, so a stopped distillation resumes exactly
(bitwise on CPU) from the last checkpoint; finished rounds are reloaded from their ``checkpoint.pt``.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from ._validate import check_choice, check_int, check_positive
from .model import VP_TIME_SCALE
from .samplers._common import end_time, time_grid
from .sde import SDE, SubVPSDE, VPSDE, batch_broadcast
from .train import train
from .train_options import TrainOptions

__all__ = [
    "Student", "PARAMETERIZATIONS", "GRID_SCHEDULES", "distill_grid", "teacher_from_score", "progressive_loss", "one_step_target",
    "sample_student", "ProgressiveOptions", "progressive_distillation", "DistillOptions", "run_distill", "mixture_2d",
    "ConsistencyModel", "consistency_loss", "ct_schedule", "sample_consistency", "teacher_eps_from_score", "consistency_times",
]

PARAMETERIZATIONS = ("v", "x")
GRID_SCHEDULES = ("logSNR", "time_uniform")
X0Fn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _check_sde(sde) -> SDE:
    if not isinstance(sde, (VPSDE, SubVPSDE)):
        raise ValueError(f"sde must be a VPSDE or SubVPSDE (DDIM distillation); got {type(sde).__name__}")
    return sde


# --- the student --------------------------------------------------------------------------------------
class Student(nn.Module):
    """A data prediction ``x_hat(z_t, t)`` from ``f = net(z_t, 999 t)`` (the continuous VP network time).

    ``parameterization``: ``"v"`` (Salimans & Ho 2022): ``x_hat = alpha z_t / r - sigma f`` with ``f ~ v =
    alpha eps - sigma x``; ``"x"``: ``x_hat = f``. Both stay finite at ``t = T`` where ``eps``-prediction fails.
    ``x0(z, t)``: ``z (B, *dims)``, ``t (B,)`` -> shape of ``z``. ``score_fn(z, t) = (m x_hat - z) / s^2`` plugs the
    student into every sampler of ``scoresde.samplers``.
    """

    def __init__(self, net: nn.Module, sde: SDE, parameterization: str = "v"):
        super().__init__()
        if not isinstance(net, nn.Module):
            raise TypeError(f"net must be a torch.nn.Module; got {type(net).__name__}")
        check_choice("parameterization", parameterization, PARAMETERIZATIONS)
        self.net, self.sde, self.parameterization = net, _check_sde(sde), parameterization

    def _coefs(self, z, t):
        m, s = self.sde.marginal_coef(t)
        return batch_broadcast(m, z), batch_broadcast(s, z)

    def x0(self, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        f = self.net(z, VP_TIME_SCALE * t)
        if self.parameterization == "x":
            return f
        m, s = self._coefs(z, t)
        r = torch.sqrt(m * m + s * s)
        return (m / r) * z / r - (s / r) * f

    forward = x0

    def score_fn(self, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        m, s = self._coefs(z, t)
        return (m * self.x0(z, t) - z) / (s * s)


def teacher_from_score(score_fn, sde: SDE) -> X0Fn:
    """Tweedie's data prediction ``x_hat(z, t) = (z + s^2 score(z, t)) / m`` of any ``score_fn(x, t)``."""

    def x0(z, t):
        m, s = sde.marginal_coef(t)
        return (z + batch_broadcast(s * s, z) * score_fn(z, t)) / batch_broadcast(m, z)

    return x0


def distill_grid(sde: SDE, steps: int, eps: Optional[float] = None, schedule: str = "logSNR") -> torch.Tensor:
    """``time_grid(sde, steps, eps, schedule)`` with its last point set to ``0``: ``(steps + 1,)`` float64, decreasing."""
    g = time_grid(sde, steps, end_time(sde, eps), schedule)
    g[-1] = 0.0
    return g


def _ddim(x_hat, z, mt, st, mu, su):
    """``z_u = m_u x_hat + (s_u / s_t)(z_t - m_t x_hat)`` (coefficients broadcast to ``z``)."""
    return mu * x_hat + (su / st) * (z - mt * x_hat)


def one_step_target(z_t, z_u, mt, st, mu, su):
    """The data prediction ``x_tilde = (z_u - (s_u/s_t) z_t) / (m_u - (s_u/s_t) m_t)`` whose DDIM step ``t -> u``
    from ``z_t`` lands on ``z_u`` (Salimans & Ho 2022, Alg. 2); shape of ``z_t``."""
    ratio = su / st
    return (z_u - ratio * z_t) / (mu - ratio * mt)


def _table(sde, grid, z):
    """``(m, s)`` of every grid time, ``(K,)`` each, on ``z``'s device and dtype (computed in float64)."""
    m, s = sde.marginal_coef(grid)
    return m.to(device=z.device, dtype=z.dtype), s.to(device=z.device, dtype=z.dtype)


# --- one round's loss ------------------------------------------------------------------------------------
def progressive_loss(teacher_x0: X0Fn, sde: SDE, student_steps: int, teacher_per_step: int = 2, eps: Optional[float] = None,
                     schedule: str = "logSNR"):
    """``loss_fn(student, x, generator) -> scalar`` of one round (module docstring) for ``scoresde.train``.

    The student's step ``i ~ U{0..N-1}`` goes from ``t = g_N[i]`` to ``g_N[i+1]``; the teacher takes
    ``teacher_per_step`` (1 or 2) DDIM steps on the nested grid ``g_{N teacher_per_step}``; ``x (B, *dims)``."""
    check_choice("teacher_per_step", teacher_per_step, (1, 2))
    fine = distill_grid(sde, student_steps * teacher_per_step, eps, schedule)

    def loss_fn(student: nn.Module, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        B = x.shape[0]
        m, s = _table(sde, fine, x)
        grid = fine.to(device=x.device, dtype=x.dtype)
        i = torch.randint(0, student_steps, (B,), generator=generator, device=x.device) * teacher_per_step
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        c = lambda v, k: batch_broadcast(v[i + k], x)  # noqa: E731  coefficient k fine steps after t, broadcast
        z = c(m, 0) * x + c(s, 0) * noise
        t = grid[i]
        with torch.no_grad():
            zz = z
            for k in range(teacher_per_step):
                zz = _ddim(teacher_x0(zz, grid[i + k]), zz, c(m, k), c(s, k), c(m, k + 1), c(s, k + 1))
            K = teacher_per_step
            x_tilde = one_step_target(z, zz, c(m, 0), c(s, 0), c(m, K), c(s, K))
            w = torch.clamp(m[i] ** 2 / s[i] ** 2, min=1.0)
        err = (student.x0(z, t) - x_tilde).pow(2).reshape(B, -1).mean(1)
        return (w * err).mean()

    return loss_fn


@torch.no_grad()
def sample_student(x0_fn: X0Fn, sde: SDE, steps: int, shape, generator: Optional[torch.Generator] = None, eps: Optional[float] = None,
                   schedule: str = "logSNR", device=None, dtype=torch.float32, x_T: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, int]:
    """DDIM with the data prediction ``x0_fn`` (a ``Student``'s ``x0`` or a teacher) on ``distill_grid``: from
    ``z_T ~ N(0, I)`` (``shape = (B, *dims)``) to ``x = x_hat(z_{t_{N-1}}, t_{N-1})`` at ``t = 0``. Returns the samples
    and the NFE (``steps``, counted)."""
    check_int("steps", steps)
    grid = distill_grid(sde, steps, eps, schedule)
    z = x_T if x_T is not None else sde.prior_std * torch.randn(tuple(shape), generator=generator, device=device, dtype=dtype)
    m, s = _table(sde, grid, z)
    nfe = 0
    for k in range(steps):
        t = torch.full((z.shape[0],), float(grid[k]), device=z.device, dtype=z.dtype)
        x_hat = x0_fn(z, t)
        nfe += 1
        z = _ddim(x_hat, z, m[k], s[k], m[k + 1], s[k + 1])
    return z, nfe


# --- the schedule of rounds --------------------------------------------------------------------------------
@dataclass
class ProgressiveOptions:
    """Progressive distillation: ``start_steps`` (a power of 2: round 0 fits the teacher's data prediction there),
    then halve down to ``final_steps``; grid ``distill_grid(sde, ., eps, schedule)``; ``train``: the options of every
    round's ``scoresde.train.train`` call (``n_steps`` per round)."""

    start_steps: int = 64
    final_steps: int = 1
    eps: Optional[float] = None
    schedule: str = "logSNR"
    train: TrainOptions = field(default_factory=lambda: TrainOptions(n_steps=2000, batch_size=256, lr=1e-3, warmup=0,
                                                                     ema_rate=0.999, log_every=500))

    def __post_init__(self):
        check_int("start_steps", self.start_steps)
        check_int("final_steps", self.final_steps)
        for name in ("start_steps", "final_steps"):
            v = getattr(self, name)
            if v & (v - 1):
                raise ValueError(f"{name} must be a power of 2; got {v!r}")
        if self.final_steps > self.start_steps:
            raise ValueError(f"final_steps must be <= start_steps = {self.start_steps}; got {self.final_steps!r}")
        check_positive("eps", self.eps, optional=True)
        check_choice("schedule", self.schedule, GRID_SCHEDULES)
        if not isinstance(self.train, TrainOptions):
            raise TypeError(f"train must be a TrainOptions; got {type(self.train).__name__}")

    def rounds(self) -> list[tuple[int, int]]:
        """``[(student_steps, teacher_per_step), ...]``: ``(start, 1)``, ``(start/2, 2)``, ... ``(final, 2)``."""
        out, n = [(self.start_steps, 1)], self.start_steps
        while n > self.final_steps:
            n //= 2
            out.append((n, 2))
        return out


def _ema_module(result) -> nn.Module:
    m = copy.deepcopy(result.ema.module)
    m.requires_grad_(False)
    return m.eval()


def progressive_distillation(teacher_x0: X0Fn, sde: SDE, student: Student, data: torch.Tensor, options: ProgressiveOptions,
                             workdir, eval_fn: Optional[Callable[[nn.Module, int], dict]] = None, progress: bool = False,
                             resume: bool = True) -> list[dict]:
    """Run every round of ``options.rounds()`` (module docstring); ``student`` is trained in place and ends as the last
    round's EMA student. ``data (N, *dims)``: the examples ``x`` the noisy inputs are made from.
    ``eval_fn(student_ema, steps) -> dict``, when given, is called after each round. Returns one record per round:
    ``{"round", "steps", "teacher_per_step", "train_steps", "seconds", **eval}`` (``seconds`` of this call's
    training; 0 for a round reloaded finished)."""
    _check_sde(sde)
    if not isinstance(student, Student):
        raise TypeError(f"student must be a scoresde.distill.Student; got {type(student).__name__}")
    if not isinstance(options, ProgressiveOptions):
        raise TypeError(f"options must be a ProgressiveOptions; got {type(options).__name__}")
    workdir = Path(workdir)
    records, teacher = [], teacher_x0
    for k, (steps, per) in enumerate(options.rounds()):
        loss_fn = progressive_loss(teacher, sde, steps, per, options.eps, options.schedule)
        t0 = time.perf_counter()
        result = train(student, loss_fn, data, options.train, workdir / f"round_{k:02d}", resume=resume, progress=progress)
        seconds = time.perf_counter() - t0
        ema = _ema_module(result)
        student.load_state_dict(ema.state_dict())  # the next round's student starts from this round's EMA weights
        teacher = ema.x0
        rec = {"round": k, "steps": steps, "teacher_per_step": per, "train_steps": result.step, "seconds": round(seconds, 2)}
        if eval_fn is not None:
            rec.update(eval_fn(ema, steps))
        records.append(rec)
    with open(workdir / "rounds.jsonl", "w") as f:
        for rec in records:
            f.write(json.dumps(rec) + "\n")
    return records


# --- consistency models (Song et al. 2023) -----------------------------------------------------------------
# In EDM's variables of the SDE: x_hat = x / m(t), sigma = s(t) / m(t), so x_hat = x_0 + sigma z and the PF-ODE is
# d x_hat / d sigma = eps_hat(m x_hat, t) (as in ``samplers.fast.sample_heun``); sigma_min = sigma(eps).
class ConsistencyModel(nn.Module):
    """``f(x_hat, t) = c_skip(sigma) x_hat + c_out(sigma) F(c_in(sigma) x_hat, 999 t)`` (Song et al. 2023, eq. 5 with
    EDM's ``c_in``)::

        c_skip = sigma_d^2 / ((sigma - sigma_min)^2 + sigma_d^2),  c_out = sigma_d (sigma - sigma_min) / sqrt(sigma_d^2 + sigma^2),
        c_in = 1 / sqrt(sigma^2 + sigma_d^2)

    so ``f(x_hat, eps) = x_hat`` exactly (the boundary condition). ``target`` is the EMA copy ``theta^-`` of the
    network (``mu`` per step; updated by the loss, see ``consistency_loss``); ``k`` counts the loss calls; both are
    part of the state dict, so a checkpoint resumes the run exactly. ``x_hat (B, *dims)``, ``t (B,)``.
    """

    def __init__(self, net: nn.Module, sde: SDE, eps: Optional[float] = None, sigma_data: float = 0.5):
        super().__init__()
        if not isinstance(net, nn.Module):
            raise TypeError(f"net must be a torch.nn.Module; got {type(net).__name__}")
        self.net, self.sde = net, _check_sde(sde)
        self.eps = end_time(sde, eps)
        self.sigma_data = check_positive("sigma_data", sigma_data)
        m, s = sde.marginal_coef(torch.tensor([self.eps], dtype=torch.float64))
        self.sigma_min = float(s / m)
        self.target = copy.deepcopy(net).requires_grad_(False)
        self.register_buffer("k", torch.zeros((), dtype=torch.int64))

    def _f(self, net, x_hat, t):
        m, s = self.sde.marginal_coef(t)
        sig = batch_broadcast(s / m, x_hat)
        sd2, dsig = self.sigma_data ** 2, sig - self.sigma_min
        c_skip = sd2 / (dsig * dsig + sd2)
        c_out = self.sigma_data * dsig / torch.sqrt(sd2 + sig * sig)
        return c_skip * x_hat + c_out * net(x_hat / torch.sqrt(sig * sig + sd2), VP_TIME_SCALE * t)

    def forward(self, x_hat: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``f_theta(x_hat, t)``, the online network."""
        return self._f(self.net, x_hat, t)

    def target_f(self, x_hat: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``f_{theta^-}(x_hat, t)``, the target network (no gradient)."""
        with torch.no_grad():
            return self._f(self.target, x_hat, t)

    @torch.no_grad()
    def update_target(self, mu: float) -> None:
        """``theta^- <- mu theta^- + (1 - mu) theta``."""
        for pt, p in zip(self.target.parameters(), self.net.parameters()):
            pt.mul_(mu).add_(p.detach(), alpha=1.0 - mu)


def ct_schedule(k: int, K: int, s0: int = 2, s1: int = 150, mu0: float = 0.9) -> tuple[int, float]:
    """Consistency training's ``N(k) = ceil(sqrt(k/K ((s1 + 1)^2 - s0^2) + s0^2) - 1) + 1`` and
    ``mu(k) = exp(s0 log(mu0) / N(k))`` (Song et al. 2023, App. C)."""
    N = math.ceil(math.sqrt(k / max(K, 1) * ((s1 + 1) ** 2 - s0 ** 2) + s0 ** 2) - 1) + 1
    return N, math.exp(s0 * math.log(mu0) / N)


def _sigma_grid(sde, N, eps):
    """``N`` Karras times (``rho = 7``) from ``T`` down to ``eps``, with ``m``, ``s``, ``sigma`` (float64, CPU)."""
    g = time_grid(sde, N - 1, eps, "karras")
    m, s = sde.marginal_coef(g)
    return g, m, s, s / m


def consistency_loss(cm: ConsistencyModel, teacher_eps: Optional[X0Fn], N: int = 18, mu: float = 0.95,
                     ct: Optional[tuple] = None):
    """``loss_fn(cm, x, generator)`` of consistency distillation (``teacher_eps`` given; Alg. 2 with the teacher's
    Heun step in ``sigma``) or consistency training (``teacher_eps=None``, Alg. 3: both points share ``z``)::

        n ~ U{0..N-2},  x_hi = x + sigma_n z  (sigma_n > sigma_{n+1} on Karras' grid of N points)
        x_lo = Heun_teacher(x_hi, sigma_n -> sigma_{n+1})  (CD)   or   x + sigma_{n+1} z  (CT)
        L = mean |f_theta(x_hi, t_n) - f_{theta^-}(x_lo, t_{n+1})|^2

    Before each loss (from the second on) the target takes the EMA step of the optimiser step just made. CD: fixed
    ``N``, ``mu``; CT: ``ct = (K, s0, s1, mu0)`` gives ``N(k)``, ``mu(k)`` of ``ct_schedule`` at loss call ``k``.
    ``teacher_eps(x, t)``: the teacher's ``eps_hat = -s score``."""
    cache = {}

    def loss_fn(model: ConsistencyModel, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        k = int(model.k)
        n_pts, m_u = (N, mu) if ct is None else ct_schedule(k, *ct)
        if k > 0:
            prev_mu = m_u if ct is None else ct_schedule(k - 1, *ct)[1]
            model.update_target(prev_mu)
        model.k += 1
        if n_pts not in cache:
            cache[n_pts] = _sigma_grid(model.sde, n_pts, model.eps)
        g, m, s, sig = (v.to(device=x.device, dtype=x.dtype) for v in cache[n_pts])
        B = x.shape[0]
        n = torch.randint(0, n_pts - 1, (B,), generator=generator, device=x.device)
        z = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        b = lambda v, j: batch_broadcast(v[n + j], x)  # noqa: E731
        x_hi = x + b(sig, 0) * z
        if teacher_eps is None:
            x_lo = x + b(sig, 1) * z
        else:
            with torch.no_grad():
                dsig = b(sig, 1) - b(sig, 0)
                d = teacher_eps(b(m, 0) * x_hi, g[n])
                xp = x_hi + dsig * d
                x_lo = x_hi + dsig * 0.5 * (d + teacher_eps(b(m, 1) * xp, g[n + 1]))
        err = model(x_hi, g[n]) - model.target_f(x_lo, g[n + 1])
        return err.pow(2).reshape(B, -1).mean(1).mean()

    return loss_fn


@torch.no_grad()
def sample_consistency(cm: ConsistencyModel, shape, generator: Optional[torch.Generator] = None, times=(), device=None,
                       dtype=torch.float32) -> tuple[torch.Tensor, int]:
    """Consistency sampling (Song et al. 2023, Alg. 1): ``x = f(x_T / m(T), T)`` from ``x_T ~ N(0, prior_std^2 I)``,
    then for each ``t`` of ``times`` (decreasing, in ``(eps, T)``): ``x <- f(x + sqrt(sigma(t)^2 - sigma_min^2) z, t)``.
    Returns the samples ``shape`` and the NFE ``1 + len(times)``."""
    sde = cm.sde
    T = float(sde.T)
    xT = cm.sde.prior_std * torch.randn(tuple(shape), generator=generator, device=device, dtype=dtype)
    mT, _ = sde.marginal_coef(torch.tensor([T], dtype=torch.float64))
    full = lambda t: torch.full((xT.shape[0],), float(t), device=xT.device, dtype=xT.dtype)  # noqa: E731
    x = cm(xT / float(mT), full(T))
    for t in times:
        if not cm.eps < float(t) < T:
            raise ValueError(f"times must lie in (eps, T) = ({cm.eps}, {T}); got {t!r}")
        m, s = sde.marginal_coef(torch.tensor([float(t)], dtype=torch.float64))
        sig = float(s / m)
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        x = cm(x + math.sqrt(max(sig * sig - cm.sigma_min ** 2, 0.0)) * noise, full(t))
    return x, 1 + len(times)


def teacher_eps_from_score(score_fn, sde: SDE) -> X0Fn:
    """``eps_hat(x, t) = -s(t) score(x, t)`` of any ``score_fn(x, t)``."""

    def eps(x, t):
        return -batch_broadcast(sde.marginal_coef(t)[1], x) * score_fn(x, t)

    return eps


# --- the plain entry point -----------------------------------------------------------------------------------
@dataclass
class DistillOptions:
    """``run_distill``'s options (plain values; a config layer builds it from ``configs/distill.yaml``).

    ``teacher``: ``"oracle"``, the exact score of a 2-D Gaussian mixture (its samples are the data): ``mixture``
    ``"benchmark"`` (the 4-component mixture of ``benchmarks/sampler_nfe.py`` and the sampler tests) or ``"gmm"``
    (``data.default_gmm(2)``). ``sde``: ``"vp"`` or ``"subvp"``. ``parameterization``: ``v`` or ``x``. Student: ``MLPScoreNet`` with
    ``hidden``, ``depth``. ``n_data`` training examples; ``n_eval`` samples for the MMD^2 check against fresh data
    (z = MMD^2 / std of data-vs-data MMD^2; ``z < 3`` is at the noise floor). ``n_steps``, ``batch_size``, ``lr``,
    ``ema_rate``: every round's training. ``workdir``: the run directory (resumed when it exists).

    ``method``: ``progressive`` (``start_steps`` -> ``final_steps``), ``consistency_distillation`` (teacher Heun steps on
    Karras' grid of ``cm_N`` points, target EMA ``cm_mu``) or ``consistency_training`` (no teacher; ``N(k)``, ``mu(k)``
    from ``cm_s0``, ``cm_s1``, ``cm_mu0``); consistency models use ``sigma_data`` and are evaluated at the NFEs of
    ``cm_eval_nfe`` (comma-separated), trained for ``n_steps`` in one run."""

    method: str = "progressive"
    teacher: str = "oracle"
    mixture: str = "benchmark"
    sde: str = "vp"
    start_steps: int = 64
    final_steps: int = 1
    parameterization: str = "v"
    schedule: str = "logSNR"
    eps: Optional[float] = None
    hidden: int = 256
    depth: int = 3
    n_data: int = 50_000
    n_eval: int = 1000
    n_steps: int = 2000
    batch_size: int = 256
    lr: float = 1e-3
    ema_rate: float = 0.999
    cm_N: int = 18
    cm_mu: float = 0.95
    cm_mu0: float = 0.9
    cm_s0: int = 2
    cm_s1: int = 150
    sigma_data: float = 0.5
    cm_eval_nfe: str = "1,2,4"
    seed: int = 0
    workdir: str = "outputs/distill"
    progress: bool = True

    def __post_init__(self):
        check_choice("method", self.method, METHODS)
        check_int("cm_N", self.cm_N, 2)
        check_positive("sigma_data", self.sigma_data)
        for name in ("cm_mu", "cm_mu0"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < 1:
                raise ValueError(f"{name} must lie in [0, 1); got {v!r}")
        for name in ("start_steps", "final_steps"):  # the progressive rounds' rule, checked before any work
            v = getattr(self, name)
            check_int(name, v)
            if v & (v - 1):
                raise ValueError(f"{name} must be a power of 2; got {v!r}")
        if self.final_steps > self.start_steps:
            raise ValueError(f"final_steps must be <= start_steps = {self.start_steps}; got {self.final_steps!r}")
        check_choice("teacher", self.teacher, ("oracle",))
        check_choice("mixture", self.mixture, MIXTURES)
        check_choice("sde", self.sde, ("vp", "subvp"))
        check_choice("parameterization", self.parameterization, PARAMETERIZATIONS)
        for name in ("hidden", "depth", "n_data", "n_eval"):
            check_int(name, getattr(self, name), 0 if name == "depth" else 2)


MIXTURES = ("benchmark", "gmm")
METHODS = ("progressive", "consistency_distillation", "consistency_training")


def mixture_2d(name: str = "benchmark"):
    """The 2-D oracle mixtures of ``DistillOptions.mixture`` (float64 ``GaussianMixture``)."""
    from .data import default_gmm
    from .oracle import GaussianMixture

    check_choice("mixture", name, MIXTURES)
    if name == "gmm":
        return default_gmm(2)
    means = torch.randn(4, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 2.0
    f64 = torch.float64
    return GaussianMixture(means, torch.tensor([0.15, 0.3, 0.2, 0.25], dtype=f64), torch.tensor([0.4, 0.3, 0.2, 0.1], dtype=f64))


def _mmd_scorer(gm, n_eval: int, seed: int):
    """``score(x) -> {"mmd2", "z"}``: samples ``x (n_eval, D)`` against fresh mixture data; ``z = MMD^2 / std`` of
    the data-vs-data statistic (``z < 3``: at the noise floor)."""
    from .metrics import median_bandwidth, mmd2_unbiased

    data = [gm.sample(n_eval, torch.Generator().manual_seed(10_000 + seed + i), dtype=torch.float64) for i in range(11)]
    bw = [median_bandwidth(data[0], data[1]) * c for c in (0.25, 0.5, 1.0, 2.0, 4.0)]
    sd = float(torch.stack([mmd2_unbiased(data[0], data[i], bw) for i in range(1, 11)]).std())

    def score(x):
        mmd = float(mmd2_unbiased(x.double(), data[0], bw)) if torch.isfinite(x).all() else float("nan")
        return {"mmd2": mmd, "z": mmd / sd}

    return score


def _mmd_eval(gm, sde, n_eval: int, seed: int):
    """``eval_fn(student, steps) -> {"nfe", "mmd2", "z"}`` of a progressive-distillation student."""
    score = _mmd_scorer(gm, n_eval, seed)

    def eval_fn(student, steps):
        x, nfe = sample_student(student.x0, sde, steps, (n_eval, 2), torch.Generator().manual_seed(seed + 7))
        return {"nfe": nfe, **score(x)}

    return eval_fn


def consistency_times(sde: SDE, nfe: int, N: int, eps: Optional[float] = None) -> list[float]:
    """The ``nfe - 1`` intermediate times of multistep consistency sampling, taken from the training grid (Karras'
    ``N`` points from ``T`` to ``eps``, ``rho = 7``; a network trained on those times only need not interpolate between
    them): the points of index ``round(i (N - 1) / nfe)``, ``i = 1..nfe-1``."""
    g = time_grid(sde, N - 1, end_time(sde, eps), "karras")
    return [float(g[round(i * (N - 1) / nfe)]) for i in range(1, nfe)]


def run_distill(options: DistillOptions) -> list[dict]:
    """Distil the teacher of ``options`` into a few-step generator: a ``final_steps`` student
    (``progressive_distillation``) or a consistency model (``consistency_loss``, distillation or training); returns
    one record per round / per evaluated NFE (steps, NFE, MMD^2 z-score, training seconds), also written to
    ``workdir/rounds.jsonl``."""
    from .build import build_net, build_sde

    if not isinstance(options, DistillOptions):
        raise TypeError(f"options must be a DistillOptions; got {type(options).__name__}")
    o = options
    sde = build_sde(o.sde)
    gm = mixture_2d(o.mixture)
    data = gm.sample(o.n_data, torch.Generator().manual_seed(o.seed), dtype=torch.float32)
    net = build_net("mlp", (data.shape[1],), seed=o.seed, hidden=o.hidden, depth=o.depth)
    teacher = teacher_from_score(gm.score_fn(sde), sde)
    tr = TrainOptions(n_steps=o.n_steps, batch_size=o.batch_size, lr=o.lr, warmup=0, ema_rate=o.ema_rate, seed=o.seed,
                      log_every=max(1, o.n_steps // 4))
    Path(o.workdir).mkdir(parents=True, exist_ok=True)
    (Path(o.workdir) / "options.json").write_text(json.dumps(dataclasses.asdict(o), indent=1))
    if o.method == "progressive":
        student = Student(net, sde, o.parameterization)
        popts = ProgressiveOptions(start_steps=o.start_steps, final_steps=o.final_steps, eps=o.eps, schedule=o.schedule, train=tr)
        return progressive_distillation(teacher, sde, student, data, popts, o.workdir, _mmd_eval(gm, sde, o.n_eval, o.seed), o.progress)
    return _run_consistency(o, sde, gm, net, data, tr)


def _run_consistency(o: DistillOptions, sde, gm, net, data, tr) -> list[dict]:
    cm = ConsistencyModel(net, sde, o.eps, o.sigma_data)
    if o.method == "consistency_distillation":
        loss_fn = consistency_loss(cm, teacher_eps_from_score(gm.score_fn(sde), sde), N=o.cm_N, mu=o.cm_mu)
    else:
        loss_fn = consistency_loss(cm, None, ct=(o.n_steps, o.cm_s0, o.cm_s1, o.cm_mu0))
    t0 = time.perf_counter()
    result = train(cm, loss_fn, data, tr, Path(o.workdir) / "train", progress=o.progress)
    seconds = time.perf_counter() - t0
    score = _mmd_scorer(gm, o.n_eval, o.seed)
    ema = copy.deepcopy(result.ema.module).eval()
    records = []
    N = o.cm_N if o.method == "consistency_distillation" else ct_schedule(o.n_steps, o.n_steps, o.cm_s0, o.cm_s1, o.cm_mu0)[0]
    for nfe in (int(v) for v in str(o.cm_eval_nfe).split(",")):
        times = consistency_times(sde, nfe, N, o.eps)
        x, n = sample_consistency(ema, (o.n_eval, 2), torch.Generator().manual_seed(o.seed + 7), times)
        records.append({"method": o.method, "steps": n, "nfe": n, "train_steps": result.step, "seconds": round(seconds, 2), **score(x)})
    with open(Path(o.workdir) / "rounds.jsonl", "w") as f:
        for rec in records:
            f.write(json.dumps(rec) + "\n")
    return records
