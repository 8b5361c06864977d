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

Round 0 (``teacher_per_step = 1``) fits the student to the teacher's own data prediction on the grid of
``start_steps``; each later round halves the steps, the student starting from (and the teacher being) the previous
round's EMA weights. Round 0 may instead fit ``first_round_substeps`` steps of an accurate solver of the teacher's ODE
per student step (``teacher_solve``: DDIM, or the second-order ``midpoint`` DPM-Solver++(2S)), so that the students
imitate the teacher's ODE solution rather than its ``start_steps``-step DDIM; ``start_steps = final_steps`` makes
that the only round. The teacher is any data prediction ``x_hat(z, t)``: a ``ScoreModel``'s ``denoise_fn`` or
Tweedie's formula on any ``score_fn`` (``teacher_from_score``), e.g. the Gaussian-mixture oracle's exact score.
``run_distill`` takes either the oracle or a trained run (``load_teacher_run``): then the student is the teacher's
network class started from the teacher's weights (Salimans & Ho 2022), trained on the run's training split on the
model's scale (``teacher_training_data``) and judged like the run's own samples (Fréchet distance and precision /
recall with their floors on images).

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

from ._validate import check_bool, check_choice, check_int, check_positive
from .model import VP_TIME_SCALE
from .samplers._common import end_time, time_grid
from .sde import SDE, SubVPSDE, VPSDE, batch_broadcast
from .train import train
from .train_options import TrainOptions

__all__ = [
    "Student", "PARAMETERIZATIONS", "GRID_SCHEDULES", "distill_grid", "teacher_from_score", "progressive_loss", "one_step_target",
    "sample_student", "ProgressiveOptions", "progressive_distillation", "DistillOptions", "run_distill", "mixture_2d",
    "ConsistencyModel", "consistency_loss", "ct_schedule", "sample_consistency", "teacher_eps_from_score", "consistency_times",
    "ict_schedule", "lognormal_interval_probs", "improved_ct_loss", "TeacherRun", "load_teacher_run", "teacher_training_data",
    "student_network", "clipped", "quality_scorer", "evaluate_sets", "TEACHERS", "NON_DEFINING", "TEACHER_SOLVERS", "solver_points",
    "teacher_solve",
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


def clipped(x0_fn: X0Fn, clip: Optional[tuple] = None) -> X0Fn:
    """``x_hat(z, t)`` clamped to ``clip = (lo, hi)``, the data range of bounded data (``None``: ``x0_fn`` itself).

    An ``eps``-predicting teacher's ``x_hat = (z - s eps_hat) / m`` multiplies its error by ``s / m`` (about 150 at
    ``t = T`` for the default VP SDE: 72 % of the quickstart model's pixels there lie outside [-1, 1]); clamping to the
    data range, as DDPM / DDIM samplers do for images, keeps those targets on the data's scale."""
    if clip is None:
        return x0_fn
    lo, hi = _check_clip(clip)

    def x0(z, t):
        return x0_fn(z, t).clamp(lo, hi)

    return x0


def _check_clip(clip) -> tuple[float, float]:
    ok = isinstance(clip, (tuple, list)) and len(clip) == 2 and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in clip) and clip[0] < clip[1]
    if not ok:
        raise ValueError(f"clip must be None or (lo, hi) with finite lo < hi; got {clip!r}")
    return float(clip[0]), float(clip[1])


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


# --- the teacher's steps ----------------------------------------------------------------------------------
TEACHER_SOLVERS = ("ddim", "midpoint")


def solver_points(solver: str) -> int:
    """Grid points per teacher step (= NFE per step): ``ddim`` 1, ``midpoint`` 2 (the step and its log-SNR midpoint)."""
    return 2 if check_choice("solver", solver, TEACHER_SOLVERS) == "midpoint" else 1


def _midpoint_weight(m, s, a, b, e):
    """``1 / (2 r)`` with ``r = (lambda_b - lambda_a) / (lambda_e - lambda_a)``, ``lambda = log(m / s)`` (DPM-Solver++(2S));
    1 where ``s_e = 0`` (a last step to ``t = 0``, ``lambda_e`` infinite: the intermediate data prediction alone)."""
    lam = lambda k: torch.log(m[k]) - torch.log(s[k])  # noqa: E731
    la, lb, le = lam(a), lam(b), lam(e)
    return torch.where(s[e] > 0, (le - la) / (2 * (lb - la)), torch.ones_like(la))


def teacher_solve(x0_fn: X0Fn, z: torch.Tensor, grid: torch.Tensor, m: torch.Tensor, s: torch.Tensor, i: torch.Tensor,
                  steps: int, solver: str = "ddim") -> torch.Tensor:
    """``steps`` teacher steps from ``z`` at ``grid[i]`` (row-wise: ``i (B,)`` indexes ``grid``, ``m``, ``s``, each ``(K,)``)
    to ``grid[i + steps p]`` (``p = solver_points(solver)``); shape of ``z``. ``ddim``: one DDIM step per grid point.
    ``midpoint``: DPM-Solver++(2S) (Lu et al. 2022, Alg. 1) in data prediction, the points ``a, b, e`` of each step being
    its start, intermediate and end::

        z_b = DDIM(x_hat(z_a, t_a); a -> b),  D = (1 - 1/(2r)) x_hat(z_a, t_a) + (1/(2r)) x_hat(z_b, t_b),  z_e = DDIM(D; a -> e)

    with ``r`` the intermediate point's fraction of the step in log-SNR (``1/2`` on a log-SNR grid: ``D = x_hat(z_b)``);
    second order, against DDIM's first."""
    p = solver_points(solver)
    c = lambda v, k: batch_broadcast(v[i + k], z)  # noqa: E731  coefficient k points after t, broadcast
    for j in range(steps):
        a = p * j
        x_a = x0_fn(z, grid[i + a])
        if p == 1:
            z = _ddim(x_a, z, c(m, a), c(s, a), c(m, a + 1), c(s, a + 1))
            continue
        b, e = a + 1, a + 2
        z_b = _ddim(x_a, z, c(m, a), c(s, a), c(m, b), c(s, b))
        w = batch_broadcast(_midpoint_weight(m, s, i + a, i + b, i + e), z)
        d = (1 - w) * x_a + w * x0_fn(z_b, grid[i + b])
        z = _ddim(d, z, c(m, a), c(s, a), c(m, e), c(s, e))
    return z


# --- one round's loss ------------------------------------------------------------------------------------
def progressive_loss(teacher_x0: X0Fn, sde: SDE, student_steps: int, teacher_per_step: int = 2, eps: Optional[float] = None,
                     schedule: str = "logSNR", solver: str = "ddim"):
    """``loss_fn(student, x, generator) -> scalar`` of one round (module docstring) for ``scoresde.train``.

    The student's step ``i ~ U{0..N-1}`` goes from ``t = g_N[i]`` to ``g_N[i+1]``; the teacher takes
    ``teacher_per_step`` steps of ``solver`` (``teacher_solve``) on the nested grid ``g_{N K}``, ``K = teacher_per_step
    solver_points(solver)``; ``x (B, *dims)``. Salimans & Ho's rounds: 1 DDIM step (round 0), 2 (halving)."""
    check_int("teacher_per_step", teacher_per_step)
    K = teacher_per_step * solver_points(solver)
    fine = distill_grid(sde, student_steps * K, eps, schedule)

    def loss_fn(student: nn.Module, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        B = x.shape[0]
        m, s = _table(sde, fine, x)
        grid = fine.to(device=x.device, dtype=x.dtype)
        i = torch.randint(0, student_steps, (B,), generator=generator, device=x.device) * K
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        c = lambda v, k: batch_broadcast(v[i + k], x)  # noqa: E731  coefficient k fine steps after t, broadcast
        z = c(m, 0) * x + c(s, 0) * noise
        t = grid[i]
        with torch.no_grad():
            zz = teacher_solve(teacher_x0, z, grid, m, s, i, teacher_per_step, solver)
            x_tilde = one_step_target(z, zz, c(m, 0), c(s, 0), c(m, K), c(s, K))
            w = torch.clamp(m[i] ** 2 / s[i] ** 2, min=1.0)
        err = (student.x0(z, t) - x_tilde).pow(2).reshape(B, -1).mean(1)
        return (w * err).mean()

    return loss_fn


@torch.no_grad()
def sample_student(x0_fn: X0Fn, sde: SDE, steps: int, shape, generator: Optional[torch.Generator] = None, eps: Optional[float] = None,
                   schedule: str = "logSNR", device=None, dtype=torch.float32, x_T: Optional[torch.Tensor] = None,
                   clip: Optional[tuple] = None, substeps: int = 1, solver: str = "ddim") -> tuple[torch.Tensor, int]:
    """DDIM with the data prediction ``x0_fn`` (a ``Student``'s ``x0`` or a teacher; clamped to ``clip = (lo, hi)`` when
    given, see ``clipped``) on ``distill_grid``: from ``z_T ~ N(0, I)`` (``shape = (B, *dims)``) to
    ``x = x_hat(z_{t_{N-1}}, t_{N-1})`` at ``t = 0``. ``substeps`` steps of ``solver`` per grid step (``teacher_solve``;
    default one DDIM step): the trajectory that a round with ``teacher_per_step = substeps`` fits, step for step.
    Returns the samples and the NFE (``steps substeps solver_points(solver)``, counted)."""
    check_int("steps", steps)
    check_int("substeps", substeps)
    x0_fn = clipped(x0_fn, clip)
    K = substeps * solver_points(solver)
    grid = distill_grid(sde, steps * K, eps, schedule)
    z = x_T if x_T is not None else sde.prior_std * torch.randn(tuple(shape), generator=generator, device=device, dtype=dtype)
    m, s = _table(sde, grid, z)
    g = grid.to(device=z.device, dtype=z.dtype)
    calls = []

    def counted(zz, tt):
        calls.append(1)
        return x0_fn(zz, tt)

    for k in range(steps):
        i = torch.full((z.shape[0],), k * K, device=z.device, dtype=torch.long)
        z = teacher_solve(counted, z, g, m, s, i, substeps, solver)
    return z, len(calls)


# --- the schedule of rounds --------------------------------------------------------------------------------
@dataclass
class ProgressiveOptions:
    """Progressive distillation: ``start_steps`` (a power of 2: round 0 fits the teacher's data prediction there),
    then halve down to ``final_steps``; grid ``distill_grid(sde, ., eps, schedule)``; ``train``: the options of every
    round's ``scoresde.train.train`` call (``n_steps`` per round; ``first_round_steps``: round 0's instead, ``None``: the
    same). ``clip = (lo, hi)``: every teacher's data prediction (the given teacher's, then each round's student's) is
    clamped to the data range before its DDIM steps make the targets (``clipped``; ``None``: not clamped).
    ``first_round_substeps`` steps of ``first_round_solver`` (``teacher_solve``) make round 0's target for each student
    step (default 1 DDIM step: the teacher's own data prediction on the ``start_steps`` grid, as in Salimans & Ho 2022):
    more substeps, or the second-order ``midpoint``, let round 0 fit an accurate solution of the teacher's ODE instead of
    its ``start_steps``-step DDIM (the halving rounds' teachers are students, exact on their own grids only: 2 DDIM steps).
    """

    start_steps: int = 64
    final_steps: int = 1
    eps: Optional[float] = None
    schedule: str = "logSNR"
    clip: Optional[tuple] = None
    first_round_steps: Optional[int] = None
    first_round_substeps: int = 1
    first_round_solver: str = "ddim"
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
        if self.clip is not None:
            self.clip = _check_clip(self.clip)
        if not isinstance(self.train, TrainOptions):
            raise TypeError(f"train must be a TrainOptions; got {type(self.train).__name__}")
        if self.first_round_steps is not None:
            self.first_round_steps = check_int("first_round_steps", self.first_round_steps)
        check_int("first_round_substeps", self.first_round_substeps)
        check_choice("first_round_solver", self.first_round_solver, TEACHER_SOLVERS)

    def round_train(self, k: int) -> TrainOptions:
        """The ``TrainOptions`` of round ``k``: ``train``, with ``n_steps = first_round_steps`` for round 0 when set."""
        if k == 0 and self.first_round_steps is not None:
            return dataclasses.replace(self.train, n_steps=self.first_round_steps)
        return self.train

    def rounds(self) -> list[tuple[int, int, str]]:
        """``[(student_steps, teacher_per_step, solver), ...]``: ``(start, first_round_substeps, first_round_solver)``,
        ``(start/2, 2, "ddim")``, ... ``(final, 2, "ddim")``."""
        out, n = [(self.start_steps, self.first_round_substeps, self.first_round_solver)], self.start_steps
        while n > self.final_steps:
            n //= 2
            out.append((n, 2, "ddim"))
        return out


def _ema_module(result) -> nn.Module:
    m = copy.deepcopy(result.ema.module)
    m.requires_grad_(False)
    return m.eval()


def progressive_distillation(teacher_x0: X0Fn, sde: SDE, student: Student, data: torch.Tensor, options: ProgressiveOptions,
                             workdir, eval_fn: Optional[Callable[[nn.Module, int], dict]] = None, progress: bool = False,
                             resume: bool = True, prepare: Optional[Callable] = None) -> list[dict]:
    """Run every round of ``options.rounds()`` (module docstring); ``student`` is trained in place and ends as the last
    round's EMA student. ``data (N, *dims)``: the examples ``x`` the noisy inputs are made from; ``prepare(batch,
    generator) -> x`` (``scoresde.train``'s): turns a raw batch into such examples, e.g. dequantises integer images
    (``None``: ``data`` are used as they are).
    ``eval_fn(student_ema, steps) -> dict``, when given, is called after each round. Returns one record per round:
    ``{"round", "steps", "teacher_per_step", "teacher_solver", "train_steps", "seconds", **eval}`` (``seconds`` of this call's
    training; 0 for a round reloaded finished); ``workdir/rounds.jsonl`` is rewritten after every round, so a stopped
    distillation leaves the records of its finished rounds."""
    _check_sde(sde)
    if not isinstance(student, Student):
        raise TypeError(f"student must be a scoresde.distill.Student; got {type(student).__name__}")
    if not isinstance(options, ProgressiveOptions):
        raise TypeError(f"options must be a ProgressiveOptions; got {type(options).__name__}")
    workdir = Path(workdir)
    records, teacher = [], clipped(teacher_x0, options.clip)
    for k, (steps, per, solver) in enumerate(options.rounds()):
        loss_fn = progressive_loss(teacher, sde, steps, per, options.eps, options.schedule, solver)
        t0 = time.perf_counter()
        result = train(student, loss_fn, data, options.round_train(k), workdir / f"round_{k:02d}", prepare=prepare,
                       resume=resume, progress=progress)
        seconds = time.perf_counter() - t0
        ema = _ema_module(result)
        student.load_state_dict(ema.state_dict())  # the next round's student starts from this round's EMA weights
        teacher = clipped(ema.x0, options.clip)
        rec = {"round": k, "steps": steps, "teacher_per_step": per, "teacher_solver": solver, "train_steps": result.step, "seconds": round(seconds, 2)}
        if eval_fn is not None:
            rec.update(eval_fn(ema, steps))
        records.append(rec)
        with open(workdir / "rounds.jsonl", "w") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")
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


def ict_schedule(k: int, K: int, s0: int = 10, s1: int = 1280) -> int:
    """Improved consistency training's doubling curriculum (Song & Dhariwal 2023, eq. 8): ``N(k) = min(s0 2^floor(k / K'),
    s1) + 1`` grid points with ``K' = floor(K / (log2 floor(s1 / s0) + 1))``."""
    Kp = max(1, math.floor(K / (math.log2(math.floor(s1 / s0)) + 1)))
    return min(s0 * 2 ** (k // Kp), s1) + 1


def lognormal_interval_probs(sigma: torch.Tensor, p_mean: float = -1.1, p_std: float = 2.0) -> torch.Tensor:
    """``p(n) ∝ erf((log sigma_n - P_mean) / (sqrt 2 P_std)) - erf((log sigma_{n+1} - P_mean) / (sqrt 2 P_std))`` for the
    ``N - 1`` intervals of a decreasing grid ``sigma (N,)``: the lognormal noise distribution of Song & Dhariwal 2023
    (eq. 10) put on the grid; sums to 1."""
    e = torch.erf((torch.log(sigma) - p_mean) / (math.sqrt(2.0) * p_std))
    p = (e[:-1] - e[1:]).clamp_min(0)
    return p / p.sum()


def improved_ct_loss(cm: ConsistencyModel, K: int, s0: int = 10, s1: int = 1280, p_mean: float = -1.1, p_std: float = 2.0):
    """``loss_fn(cm, x, generator)`` of improved consistency training (Song & Dhariwal 2023), no teacher::

        N = N(k) (ict_schedule),  n ~ lognormal_interval_probs(sigma),  x_hi = x + sigma_n z,  x_lo = x + sigma_{n+1} z
        L = mean  (sqrt(|f_theta(x_hi, t_n) - sg[f_theta](x_lo, t_{n+1})|^2 + c^2) - c) / (sigma_n - sigma_{n+1})

    with the pseudo-Huber constant ``c = 0.00054 sqrt(d)`` (``d`` = dimensions per sample) and the target the online
    network itself without gradient (no EMA target: ``theta^- = stopgrad(theta)``); Karras' grid of ``N`` points from
    ``T`` to ``cm.eps`` as in ``consistency_loss``. ``cm.k`` counts the calls (resumable); ``cm.target`` is not used."""
    check_int("K", K)
    cache = {}

    def loss_fn(model: ConsistencyModel, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        n_pts = ict_schedule(int(model.k), K, s0, s1)
        model.k += 1
        if n_pts not in cache:
            g, m, s, sig = _sigma_grid(model.sde, n_pts, model.eps)
            cache[n_pts] = (g, sig, lognormal_interval_probs(sig, p_mean, p_std))
        g, sig, probs = (v.to(device=x.device, dtype=x.dtype) for v in cache[n_pts])
        B = x.shape[0]
        n = torch.multinomial(probs, B, replacement=True, generator=generator)
        z = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        b = lambda v, j: batch_broadcast(v[n + j], x)  # noqa: E731
        with torch.no_grad():
            target = model._f(model.net, x + b(sig, 1) * z, g[n + 1])
        d = x[0].numel()
        c = 0.00054 * math.sqrt(d)
        sq = (model(x + b(sig, 0) * z, g[n]) - target).pow(2).reshape(B, -1).sum(1)
        w = 1.0 / (sig[n] - sig[n + 1])
        return (w * (torch.sqrt(sq + c * c) - c)).mean()

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


# --- a trained run as the teacher ----------------------------------------------------------------------------
@dataclass
class TeacherRun:
    """A trained ``scoresde-train`` run loaded as a distillation teacher (``load_teacher_run``).

    ``model``: the run's ``ScoreModel`` (EMA weights, eval mode, no gradients); its ``denoise_fn`` is the teacher's data
    prediction ``x_hat(z, t)`` and its ``eps_fn`` the teacher's ``eps_hat``. ``data``: the run's ``runs.DataOptions``,
    ``levels``: grey levels of discrete data (``None``: continuous), ``seed``: the run's seed, ``checkpoint``: the file
    loaded, ``step`` / ``run_hash``: what identifies those weights (a distillation workdir records them)."""

    model: nn.Module
    data: object
    levels: Optional[int]
    seed: int
    checkpoint: Path
    step: Optional[int]
    run_hash: Optional[str]

    @property
    def sde(self) -> SDE:
        return self.model.sde

    @property
    def shape(self) -> tuple:
        """Per-sample data shape, e.g. ``(1, 8, 8)``."""
        return tuple(int(s) for s in self.model.spec["data_shape"])

    def identity(self) -> dict:
        return {"step": self.step, "run_hash": self.run_hash}

    def data_range(self) -> Optional[tuple]:
        """``(-1, 1)`` (centred) or ``(0, 1)`` for discrete data (bounded on the model's scale, dequantised included);
        ``None`` for continuous data."""
        if self.levels is None:
            return None
        return (-1.0, 1.0) if self.data.centered else (0.0, 1.0)


def load_teacher_run(path, device=None) -> TeacherRun:
    """Load a trained run (a ``scoresde-train`` run directory or one of its checkpoint files) as a teacher with
    ``scoresde.load`` (the checkpoint that the run's own evaluation uses, EMA weights).

    The student copies the teacher's network and sees its time input ``999 t``, so the teacher must be a continuous-time
    VP or sub-VP model (``ValueError`` naming ``teacher_run`` otherwise, and when the checkpoint carries no data entry)."""
    from .build import find_checkpoint, load
    from .checkpoint import load_checkpoint
    from .runs import DataOptions

    file = find_checkpoint(path)
    model, sde = load(file, device=device)
    if not isinstance(sde, (VPSDE, SubVPSDE)) or not model.continuous:
        raise ValueError(f"teacher_run must be a continuous-time VP or sub-VP model (the student is a DDIM student with network "
                         f"time 999 t); {str(path)!r} holds a {type(sde).__name__}, continuous={model.continuous}")
    entry = (model.spec or {}).get("data") or {}
    if "options" not in entry:
        raise ValueError(f"teacher_run: checkpoint {str(file)!r} names no training data (its spec has no data entry); "
                         "give a run directory written by scoresde-train")
    model.requires_grad_(False)
    state = load_checkpoint(file, map_location="cpu", mmap=True)
    return TeacherRun(model=model, data=DataOptions(**entry["options"]), levels=entry.get("levels"), seed=int(model.spec.get("seed", 0)),
                      checkpoint=file, step=state.get("step"), run_hash=state.get("run_hash"))


def teacher_training_data(teacher: TeacherRun, dtype=torch.float32) -> tuple[torch.Tensor, Callable]:
    """The run's training split (raw, e.g. integer images ``(N, C, H, W)``) and ``prepare(batch, generator)`` that puts a
    batch on the model's scale as the run's training did (``runs.make_prepare``: uniform dequantisation of discrete data,
    flips if the run used them), without the noise-mixture augmentation (students learn the clean data)."""
    from .runs import load_split, make_prepare

    data = dataclasses.replace(teacher.data, noise_mixture_prob=0.0)
    ds = load_split(data, "train", seed=teacher.seed)
    return ds.x, make_prepare(data, ds.levels, dtype)


def student_network(teacher: TeacherRun, init: str = "teacher", seed: int = 0) -> nn.Module:
    """The student's network: the teacher's network class with its build arguments; ``init="teacher"``: a copy of the
    teacher's weights (Salimans & Ho 2022 start every student from its teacher), ``"random"``: fresh weights from
    ``seed``. The copy's output is read as the student's parameterisation, so round 0 (the student fitting the teacher's
    own data prediction) converts an ``eps`` teacher into a ``v`` (or ``x``) student."""
    from .build import build_net

    check_choice("student_init", init, ("teacher", "random"))
    if init == "teacher":
        net = copy.deepcopy(teacher.model.net)
    else:
        spec = teacher.model.spec
        net = build_net(spec["net"]["name"], spec["data_shape"], seed=seed, sde=teacher.sde,
                        centered=spec.get("data", {}).get("centered", True), **spec["net"]["kwargs"])
        p = next(teacher.model.parameters())
        net = net.to(device=p.device, dtype=p.dtype)
    return net.requires_grad_(True).train()


def quality_scorer(teacher: TeacherRun, seed: int):
    """``score(x) -> dict`` of samples ``x (n, *shape)`` on the model's scale against the run's test split: image data of a
    set with a feature classifier get ``evaluate.image_quality`` (Fréchet distance, k-NN precision / recall, each with
    its floor: as many training images against the same test split); other data ``evaluate.sample_quality`` (MMD^2
    with its floor, sliced Wasserstein)."""
    from .evaluate import FEATURE_DATASETS, EvalOptions, image_quality, sample_quality
    from .runs import load_split, reference_samples, stream_seed

    data = teacher.data
    test = load_split(data, "test", seed=teacher.seed)
    images = len(teacher.shape) == 3 and data.name in FEATURE_DATASETS
    ref = None if images else reference_samples(test, data, seed=stream_seed(seed, 4), dtype=torch.float64, device="cpu")

    def score(x):
        if images:
            q = image_quality(x, test, data, EvalOptions(), seed=teacher.seed, device=x.device)
            return {k: v for k, v in q.items() if k != "pr_k"}
        return sample_quality(x, ref, seed=stream_seed(seed, 5))

    return score


# --- the plain entry point -----------------------------------------------------------------------------------
@dataclass
class DistillOptions:
    """``run_distill``'s options (plain values; a config layer builds it from ``configs/distill.yaml``).

    ``teacher``: ``"oracle"``, the exact score of a 2-D Gaussian mixture (its samples are the data): ``mixture``
    ``"benchmark"`` (the 4-component mixture of ``benchmarks/sampler_nfe.py`` and the sampler tests) or ``"gmm"``
    (``data.default_gmm(2)``), ``sde``: ``"vp"`` or ``"subvp"``, student ``MLPScoreNet`` with ``hidden``, ``depth``,
    ``n_data`` training examples; or ``"run"``, a trained ``scoresde-train`` run (``teacher_run``: its directory or a
    checkpoint file; continuous VP / sub-VP), which brings its SDE, its network class (the student's, initialised from the
    teacher's weights with ``student_init="auto"``/``"teacher"``, fresh with ``"random"``) and its training split, put on
    the model's scale as in training (``teacher_training_data``); ``clip_x0``: clamp every data prediction that makes a
    DDIM step (targets and sampling) to the run's data range (discrete data only; ``clipped``).
    ``parameterization``: ``v`` or ``x``. Evaluation:
    ``eval_sets`` sets of ``n_eval`` samples (one batch each), the metrics averaged over the sets (with ``_sd`` / ``_sets``
    of the headline metric when ``eval_sets > 1``); oracle: MMD^2 against fresh data and z = MMD^2 / std of data-vs-data
    MMD^2 (``z < 3`` is at the noise floor); run: on images of a set with a feature classifier the Fréchet distance and
    k-NN precision / recall against the test split with their floors (``evaluate.image_quality``), else MMD^2 with its
    floor. ``n_steps``, ``batch_size``, ``lr``, ``ema_rate``, ``checkpoint_every``: every round's training
    (``scoresde.train``); ``first_round_steps``: round 0's ``n_steps`` instead (progressive only; ``None``: ``n_steps``):
    round 0 converts the teacher's parameterisation into the student's and may need more steps than a halving round.
    ``first_round_substeps`` steps of ``first_round_solver`` (``ddim`` or the second-order ``midpoint``) make round 0's
    target per student step (progressive only; default 1 DDIM step, Salimans & Ho): an accurate solution of the teacher's
    ODE on the ``start_steps`` grid rather than its ``start_steps``-step DDIM (``ProgressiveOptions``).
    ``workdir``: the run directory (resumed when it exists; refused when it holds a distillation with other run-defining
    options or another teacher checkpoint).

    ``method``: ``progressive`` (``start_steps`` -> ``final_steps``), ``consistency_distillation`` (teacher Heun steps on
    Karras' grid of ``cm_N`` points, target EMA ``cm_mu``) or ``consistency_training`` (no teacher; ``N(k)``, ``mu(k)``
    from ``cm_s0``, ``cm_s1``, ``cm_mu0``) or ``improved_consistency_training`` (Song & Dhariwal 2023, ``improved_ct_loss``:
    pseudo-Huber loss, lognormal noise ``ict_p_mean``, ``ict_p_std``, doubling curriculum ``ict_s0`` -> ``ict_s1``, no EMA
    target); consistency models use ``sigma_data`` and are evaluated at the NFEs of ``cm_eval_nfe`` (comma-separated),
    trained for ``n_steps`` in one run."""

    method: str = "progressive"
    teacher: str = "oracle"
    teacher_run: Optional[str] = None
    student_init: str = "auto"
    clip_x0: bool = False
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
    eval_sets: int = 1
    n_steps: int = 2000
    first_round_steps: Optional[int] = None
    first_round_substeps: int = 1
    first_round_solver: str = "ddim"
    batch_size: int = 256
    lr: float = 1e-3
    ema_rate: float = 0.999
    checkpoint_every: int = 0
    cm_N: int = 18
    cm_mu: float = 0.95
    cm_mu0: float = 0.9
    cm_s0: int = 2
    cm_s1: int = 150
    sigma_data: float = 0.5
    cm_eval_nfe: str = "1,2,4"
    ict_s0: int = 10
    ict_s1: int = 1280
    ict_p_mean: float = -1.1
    ict_p_std: float = 2.0
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
        self._check_teacher()
        check_choice("mixture", self.mixture, MIXTURES)
        check_choice("sde", self.sde, ("vp", "subvp"))
        check_choice("parameterization", self.parameterization, PARAMETERIZATIONS)
        for name in ("hidden", "depth", "n_data", "n_eval", "eval_sets", "checkpoint_every", "ict_s0"):
            check_int(name, getattr(self, name), {"depth": 0, "checkpoint_every": 0, "eval_sets": 1, "ict_s0": 1}.get(name, 2))
        check_int("ict_s1", self.ict_s1, self.ict_s0)
        if self.first_round_steps is not None:
            check_int("first_round_steps", self.first_round_steps)
            if self.method != "progressive":
                raise ValueError(f"first_round_steps applies to method='progressive' (its round 0); got method={self.method!r}")
        check_int("first_round_substeps", self.first_round_substeps)
        check_choice("first_round_solver", self.first_round_solver, TEACHER_SOLVERS)
        if self.method != "progressive" and (self.first_round_substeps, self.first_round_solver) != (1, "ddim"):
            raise ValueError(f"first_round_substeps / first_round_solver apply to method='progressive' (its round 0); got "
                             f"method={self.method!r}")
        check_positive("ict_p_std", self.ict_p_std)
        if isinstance(self.ict_p_mean, bool) or not isinstance(self.ict_p_mean, (int, float)) or not math.isfinite(self.ict_p_mean):
            raise ValueError(f"ict_p_mean must be a finite number; got {self.ict_p_mean!r}")

    def _check_teacher(self):
        check_choice("teacher", self.teacher, TEACHERS)
        check_choice("student_init", self.student_init, ("auto", "teacher", "random"))
        if self.teacher == "run":
            if not isinstance(self.teacher_run, str) or not self.teacher_run:
                raise ValueError(f"teacher_run must name a scoresde-train run directory or checkpoint file with teacher='run'; "
                                 f"got {self.teacher_run!r}")
            if not Path(self.teacher_run).expanduser().exists():
                raise ValueError(f"teacher_run: no such run directory or checkpoint file: {self.teacher_run!r}")
        else:
            if self.teacher_run is not None:
                raise ValueError(f"teacher_run is read only with teacher='run'; got teacher={self.teacher!r}, "
                                 f"teacher_run={self.teacher_run!r}")
            if self.student_init == "teacher":
                raise ValueError("student_init='teacher' needs a teacher network (teacher='run'); the oracle has none: "
                                 "use 'auto' or 'random'")
            if self.clip_x0 is not False:
                raise ValueError(f"clip_x0 clamps to a run's bounded data range (teacher='run'); the oracle's data are "
                                 f"unbounded; got clip_x0={self.clip_x0!r}")
        check_bool("clip_x0", self.clip_x0)
        if self.clip_x0 and self.method != "progressive":
            raise ValueError(f"clip_x0 applies to method='progressive' (DDIM steps); got method={self.method!r}")


MIXTURES = ("benchmark", "gmm")
METHODS = ("progressive", "consistency_distillation", "consistency_training", "improved_consistency_training")
TEACHERS = ("oracle", "run")
# options that do not change what a distillation trains (a workdir may be resumed with other values)
NON_DEFINING = ("workdir", "progress", "n_eval", "eval_sets", "cm_eval_nfe", "final_steps", "checkpoint_every", "teacher_run")


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


HEADLINE = ("z", "fd", "mmd2")  # the metrics whose spread over evaluation sets is reported


def _mean_over_sets(recs: list[dict]) -> dict:
    """The mean of every numeric metric over evaluation sets; with several sets also ``<key>_sd`` (sample std) and
    ``<key>_sets`` of the headline metrics (``HEADLINE``)."""
    out = {}
    for k, v in recs[0].items():
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        vals = [float(r[k]) for r in recs]
        out[k] = sum(vals) / len(vals)
        if len(recs) > 1 and k in HEADLINE:
            out[f"{k}_sd"] = float(torch.tensor(vals, dtype=torch.float64).std())
            out[f"{k}_sets"] = vals
    return out


def evaluate_sets(draw: Callable[[torch.Generator], tuple[torch.Tensor, int]], score: Callable[[torch.Tensor], dict],
                  n_sets: int = 1, seed: int = 0) -> dict:
    """``{"nfe", **metrics}``: ``draw(generator) -> (samples, nfe)`` for ``n_sets`` generators seeded ``seed + 7 + j``,
    each set scored by ``score(samples) -> dict`` and averaged by ``_mean_over_sets``."""
    check_int("n_sets", n_sets)
    recs, nfe = [], None
    for j in range(n_sets):
        x, nfe = draw(torch.Generator().manual_seed(seed + 7 + j))
        recs.append(score(x))
    return {"nfe": nfe, **_mean_over_sets(recs)}


def consistency_times(sde: SDE, nfe: int, N: int, eps: Optional[float] = None) -> list[float]:
    """The ``nfe - 1`` intermediate times of multistep consistency sampling, taken from the training grid (Karras'
    ``N`` points from ``T`` to ``eps``, ``rho = 7``; a network trained on those times only need not interpolate between
    them): the points of index ``round(i (N - 1) / nfe)``, ``i = 1..nfe-1``."""
    g = time_grid(sde, N - 1, end_time(sde, eps), "karras")
    return [float(g[round(i * (N - 1) / nfe)]) for i in range(1, nfe)]


@dataclass
class _Setup:
    """What ``run_distill`` distils: the SDE, the teacher's ``x_hat`` and ``eps_hat``, the student's initial network,
    the training data (+ ``prepare``), the per-sample shape, ``score(samples) -> dict`` and the teacher's identity."""

    sde: SDE
    teacher_x0: X0Fn
    teacher_eps: X0Fn
    net: nn.Module
    data: torch.Tensor
    prepare: Optional[Callable]
    shape: tuple
    score: Callable
    identity: dict
    clip: Optional[tuple] = None


def _oracle_setup(o: DistillOptions) -> _Setup:
    from .build import build_net, build_sde

    sde = build_sde(o.sde)
    gm = mixture_2d(o.mixture)
    data = gm.sample(o.n_data, torch.Generator().manual_seed(o.seed), dtype=torch.float32)
    net = build_net("mlp", (data.shape[1],), seed=o.seed, hidden=o.hidden, depth=o.depth)
    score_fn = gm.score_fn(sde)
    return _Setup(sde, teacher_from_score(score_fn, sde), teacher_eps_from_score(score_fn, sde), net, data, None,
                  (gm.D,), _mmd_scorer(gm, o.n_eval, o.seed), {"oracle": o.mixture})


def _run_setup(o: DistillOptions) -> _Setup:
    teacher = load_teacher_run(o.teacher_run)
    clip = teacher.data_range() if o.clip_x0 else None
    if o.clip_x0 and clip is None:
        raise ValueError(f"clip_x0 needs bounded (discrete) data; the run {o.teacher_run!r} was trained on continuous "
                         f"data {teacher.data.name!r}")
    data, prepare = teacher_training_data(teacher)
    init = "teacher" if o.student_init == "auto" else o.student_init
    net = student_network(teacher, init, seed=o.seed)
    m = teacher.model
    return _Setup(teacher.sde, m.denoise_fn, m.eps_fn, net, data, prepare, teacher.shape, quality_scorer(teacher, o.seed),
                  teacher.identity(), clip)


def _claim_workdir(o: DistillOptions, identity: dict) -> None:
    """Write ``workdir/options.json`` (the options and the teacher's identity), after checking that a distillation
    already there has the same run-defining options (all but ``NON_DEFINING``) and teacher: ``ValueError`` naming the
    fields that differ."""
    work = Path(o.workdir)
    path = work / "options.json"
    mine = {"options": dataclasses.asdict(o), "teacher": identity}
    if path.is_file():
        prev = json.loads(path.read_text())
        prev_opts = prev.get("options", prev)  # the first format held the options only
        defaults = {f.name: f.default for f in dataclasses.fields(DistillOptions)}  # a field newer than the record: its default
        diff = sorted(k for k, v in mine["options"].items() if k not in NON_DEFINING and prev_opts.get(k, defaults[k]) != v)
        if "teacher" in prev and prev["teacher"] != identity:
            diff.append(f"teacher checkpoint {prev['teacher']} -> {identity}")
        if diff:
            raise ValueError(f"workdir {str(work)!r} holds a distillation with other run-defining options: {diff}; "
                             "use another workdir (or remove it to start again)")
    work.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(mine, indent=1))
    tmp.replace(path)


def run_distill(options: DistillOptions) -> list[dict]:
    """Distil the teacher of ``options`` (the oracle or a trained run) into a few-step generator: a ``final_steps``
    student (``progressive_distillation``) or a consistency model (``consistency_loss``, distillation or training);
    returns one record per round / per evaluated NFE (steps, NFE, quality metrics, training seconds), also written to
    ``workdir/rounds.jsonl``. Every option and the teacher checkpoint are checked before any training."""
    if not isinstance(options, DistillOptions):
        raise TypeError(f"options must be a DistillOptions; got {type(options).__name__}")
    o = options
    setup = _run_setup(o) if o.teacher == "run" else _oracle_setup(o)
    tr = TrainOptions(n_steps=o.n_steps, batch_size=o.batch_size, lr=o.lr, warmup=0, ema_rate=o.ema_rate, seed=o.seed,
                      log_every=max(1, o.n_steps // 4), checkpoint_every=o.checkpoint_every)
    _claim_workdir(o, setup.identity)
    if o.method == "progressive":
        return _run_progressive(o, setup, tr)
    return _run_consistency(o, setup, tr)


def _run_progressive(o: DistillOptions, st: _Setup, tr: TrainOptions) -> list[dict]:
    student = Student(st.net, st.sde, o.parameterization)
    popts = ProgressiveOptions(start_steps=o.start_steps, final_steps=o.final_steps, eps=o.eps, schedule=o.schedule, clip=st.clip,
                               first_round_steps=o.first_round_steps, first_round_substeps=o.first_round_substeps,
                               first_round_solver=o.first_round_solver, train=tr)
    p = next(st.net.parameters())

    def eval_fn(ema, steps):
        draw = lambda g: sample_student(ema.x0, st.sde, steps, (o.n_eval, *st.shape), g, o.eps, o.schedule,  # noqa: E731
                                        device=p.device, dtype=p.dtype, clip=st.clip)
        return evaluate_sets(draw, st.score, o.eval_sets, o.seed)

    return progressive_distillation(st.teacher_x0, st.sde, student, st.data, popts, o.workdir, eval_fn, o.progress,
                                    prepare=st.prepare)


def _run_consistency(o: DistillOptions, st: _Setup, tr: TrainOptions) -> list[dict]:
    cm = ConsistencyModel(st.net, st.sde, o.eps, o.sigma_data)
    if o.method == "consistency_distillation":
        loss_fn = consistency_loss(cm, st.teacher_eps, N=o.cm_N, mu=o.cm_mu)
    elif o.method == "consistency_training":
        loss_fn = consistency_loss(cm, None, ct=(o.n_steps, o.cm_s0, o.cm_s1, o.cm_mu0))
    else:
        loss_fn = improved_ct_loss(cm, o.n_steps, o.ict_s0, o.ict_s1, o.ict_p_mean, o.ict_p_std)
    t0 = time.perf_counter()
    result = train(cm, loss_fn, st.data, tr, Path(o.workdir) / "train", prepare=st.prepare, progress=o.progress)
    seconds = time.perf_counter() - t0
    ema = copy.deepcopy(result.ema.module).eval()
    p = next(ema.parameters())
    records = []
    N = {"consistency_distillation": lambda: o.cm_N,
         "consistency_training": lambda: ct_schedule(o.n_steps, o.n_steps, o.cm_s0, o.cm_s1, o.cm_mu0)[0],
         "improved_consistency_training": lambda: ict_schedule(o.n_steps, o.n_steps, o.ict_s0, o.ict_s1)}[o.method]()
    for nfe in (int(v) for v in str(o.cm_eval_nfe).split(",")):
        times = consistency_times(st.sde, nfe, N, o.eps)
        draw = lambda g: sample_consistency(ema, (o.n_eval, *st.shape), g, times, device=p.device, dtype=p.dtype)  # noqa: E731
        q = evaluate_sets(draw, st.score, o.eval_sets, o.seed)
        records.append({"method": o.method, "steps": q["nfe"], "train_steps": result.step, "seconds": round(seconds, 2), **q})
    with open(Path(o.workdir) / "rounds.jsonl", "w") as f:
        for rec in records:
            f.write(json.dumps(rec) + "\n")
    return records
