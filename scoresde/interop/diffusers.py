"""diffusers ``UNet2DModel`` checkpoints as scoresde ``ScoreModel`` s (optional extra: ``pip install -e '.[diffusers]'``).

``from_unet(unet, scheduler)`` returns ``(ScoreModel, SDE)`` with the meaning diffusers gives the network:

* **DDPM-style U-Nets** (sinusoidal ``"positional"`` or ``"learned"`` time embedding), trained on the discrete chain
  ``x_i = sqrt(abar_i) x_0 + sqrt(1 - abar_i) eps``, ``abar_i = prod_{j <= i} (1 - beta_j)`` (0-based steps ``i``).
  The network is called with the integer step ``i``: a *discrete* ``ScoreModel`` (``continuous=False``), so at
  ``t = i T / (N - 1)`` it sees step ``i`` and the coefficients ``(sqrt(abar_i), sqrt(1 - abar_i))``. Its output
  (``scheduler.config.prediction_type``) becomes a score by the table of ``scoresde.model``:

  * ``"epsilon"``: the network predicts ``eps``; parameterisation ``"eps"`` (``score = -eps / sqrt(1 - abar_i)``);
  * ``"sample"``: it predicts ``x_0``; parameterisation ``"x0"``;
  * ``"v_prediction"``: it predicts ``v = sqrt(abar_i) eps - sqrt(1 - abar_i) x_0``; ``VPredictionNet`` turns it into
    ``eps = sqrt(abar_i) v + sqrt(1 - abar_i) x`` and the parameterisation is ``"eps"``.

  The SDE follows the scheduler's betas: DDPM's linear ``beta_i = linspace(beta_min / N, beta_max / N, N)`` gives
  ``VPSDE(beta_min, beta_max, N)`` (as score_sde's DDPM checkpoints); ``"squaredcos_cap_v2"`` gives
  ``VPSDE(schedule="cosine")`` (the same betas); any other schedule (``"scaled_linear"``, ``"sigmoid"``, trained
  betas) gives ``DiscreteVPSDE``, the chain itself as a VP SDE. ``DiscreteVPSDE`` is also the SDE to use when a
  sampler must reproduce diffusers' step arithmetic exactly: its ``m(t), s(t)`` equal the chain's at every step
  time, where ``VPSDE``'s continuous ``m(i T / (N - 1))`` differs from ``sqrt(abar_i)`` by up to 3.4 % (linear
  schedule, N = 1000) and ``s(0) = 0`` where the chain has ``sqrt(beta_0)`` (see also ``ScoreModel.ddpm_time``).

* **score-SDE VE U-Nets** (``time_embedding_type="fourier"``, the NCSN++ conversions, used with
  ``ScoreSdeVeScheduler``). diffusers calls them with the noise level ``sigma(t) = sigma_min (sigma_max /
  sigma_min)^t`` (``ScoreSdeVePipeline``); the Fourier features take ``log sigma`` and the U-Net divides its last
  layer by ``sigma`` (``sample / timesteps``), so its output is the score itself: ``ScoreSdeVeScheduler.step_pred``
  steps ``x + g^2 output`` and ``step_correct`` ``x + step output``. That is a *continuous* ``ScoreModel`` with
  ``parameterization="score"`` on ``VESDE(sigma_min, sigma_max, N)`` (a continuous VE net sees ``sigma(t)``).

Class-conditional U-Nets are refused. The model works on the data scale the U-Net was trained on (DDPM:
``[-1, 1]``; the score-SDE VE conversions: ``[0, 1]``).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..model import ScoreModel
from ..sde import SDE, VESDE, VPSDE, batch_broadcast

__all__ = ["from_unet", "sde_from_scheduler", "DiscreteVPSDE", "UNetNet", "VPredictionNet", "PREDICTION_TYPES"]

# diffusers' prediction_type -> scoresde parameterisation (v is converted to eps by VPredictionNet)
PREDICTION_TYPES = {"epsilon": "eps", "sample": "x0", "v_prediction": "eps"}

_INSTALL = "pip install -e '.[diffusers]'"
_BETA_RTOL = 1e-5  # diffusers stores betas in float32
_ABAR_RTOL = 1e-4  # ... and accumulates alphas_cumprod in float32 (1000 factors)


def _require_diffusers():
    """Import diffusers lazily (an optional dependency); ``ImportError`` saying how to install it."""
    try:
        import diffusers
    except ImportError as e:  # pragma: no cover - exercised only without the extra
        raise ImportError(
            f"scoresde.interop.diffusers needs the optional dependency 'diffusers': {_INSTALL} (or pip install diffusers)"
        ) from e
    return diffusers


# --------------------------------------------------------------------------------------------
# the DDPM chain as a VP SDE
# --------------------------------------------------------------------------------------------
class DiscreteVPSDE(VPSDE):
    """The discrete DDPM chain of any betas as a variance-preserving SDE.

    Step ``i`` (0-based, ``i = 0 .. N-1``) sits at ``t_i = i T / (N - 1)`` (scoresde's
    ``discrete_timestep(t) = round(t (N - 1) / T)``), where::

        m(t_i) = sqrt(abar_i),   s(t_i) = sqrt(1 - abar_i),   abar_i = prod_{j <= i} (1 - beta_j)

    and ``log m(t)`` is linear between steps, i.e. ``beta(t)`` is piecewise constant:
    ``beta(t) = -(N - 1) / T * log(abar_i / abar_{i-1})`` on ``(t_{i-1}, t_i)``; ``s(t) = sqrt(1 - m(t)^2)``, so the
    SDE ``dx = -1/2 beta(t) x dt + sqrt(beta(t)) dw`` has exactly these marginals. Like the chain (and like
    ``VESDE``'s ``sigma_min``), the marginal at ``t = 0`` is step 0, ``m(0) = sqrt(1 - beta_0) < 1``.
    ``discretize`` is DDPM's step with ``beta_i`` (inherited); ``t_from_log_snr`` is closed form.

    Args:
        alphas_cumprod: ``(N,)`` ``abar_i``, strictly decreasing in ``(0, 1]`` (e.g. a diffusers scheduler's
            ``alphas_cumprod``); or
        betas: ``(N,)`` ``beta_i`` in ``(0, 1)`` (keyword only; exactly one of the two).

    Tables are float64 (``alphas_cumprod``, ``discrete_betas``, ...), as ``VPSDE``'s.
    """

    def __init__(self, alphas_cumprod=None, *, betas=None):
        if (alphas_cumprod is None) == (betas is None):
            raise ValueError("DiscreteVPSDE needs exactly one of alphas_cumprod or betas")
        name = "betas" if betas is not None else "alphas_cumprod"
        v = torch.as_tensor(betas if betas is not None else alphas_cumprod).detach().to("cpu", torch.float64).flatten()
        if v.numel() < 2 or not bool(torch.isfinite(v).all()):
            raise ValueError(f"{name} must hold at least 2 finite values; got {v.numel()} values")
        if betas is not None:
            if not bool(((v > 0) & (v < 1)).all()):
                raise ValueError(f"betas must lie in (0, 1); got values in [{v.min().item()}, {v.max().item()}]")
            ab = torch.cumprod(1.0 - v, dim=0)
        else:
            ab = v
        if not bool(((ab > 0) & (ab <= 1)).all()):
            raise ValueError(
                f"{name} must give alphas_cumprod in (0, 1]; got values in [{ab.min().item()}, {ab.max().item()}] "
                "(a zero terminal SNR, alphas_cumprod[-1] = 0, has no VP SDE: m(T) = 0)"
            )
        if not bool((ab[1:] < ab[:-1]).all()):
            raise ValueError("alphas_cumprod must be strictly decreasing (every beta_i > 0)")
        SDE.__init__(self, int(ab.numel()))
        self.schedule = "discrete"
        self.alphas_cumprod = ab
        self.discrete_betas = v.clone() if betas is not None else 1.0 - ab / torch.cat([ab.new_ones(1), ab[:-1]])
        self.alphas = 1.0 - self.discrete_betas
        self.sqrt_alphas_cumprod = torch.sqrt(ab)
        self.sqrt_1m_alphas_cumprod = torch.sqrt(1.0 - ab)
        self._lm = 0.5 * torch.log(ab)  # log m(t_i), strictly decreasing
        rates = -2.0 * (self._lm[1:] - self._lm[:-1]) * (self.N - 1) / self.T
        self.beta_0 = self.beta_min = float(rates.min())
        self.beta_1 = self.beta_max = float(rates.max())

    def __repr__(self):
        ab = self.alphas_cumprod
        return f"DiscreteVPSDE(N={self.N}, alphas_cumprod[0]={ab[0].item():.6g}, alphas_cumprod[-1]={ab[-1].item():.6g})"

    def _segment(self, t: torch.Tensor):
        """Segment index ``k`` (``t_k <= t <= t_{k+1}``, clamped to ``[0, N-2]``) and position ``u = t (N-1) / T``."""
        u = t * ((self.N - 1) / self.T)
        k = torch.floor(u).clamp(0, self.N - 2).long()
        return k, u

    def log_mean_coeff(self, t: torch.Tensor) -> torch.Tensor:
        """``log m(t)``: linear interpolation of ``1/2 log abar_i`` at ``t_i = i T / (N - 1)``; shape of ``t``."""
        lm = self._lm.to(device=t.device, dtype=t.dtype)
        k, u = self._segment(t)
        return lm[k] + (u - k.to(t.dtype)) * (lm[k + 1] - lm[k])

    def beta(self, t: torch.Tensor) -> torch.Tensor:
        """Piecewise-constant ``beta(t) = -2 d log m / dt``; shape of ``t``."""
        lm = self._lm.to(device=t.device, dtype=t.dtype)
        k, _ = self._segment(t)
        return -2.0 * (lm[k + 1] - lm[k]) * ((self.N - 1) / self.T)

    def t_from_log_snr(self, lam: torch.Tensor, iters: int = 80) -> torch.Tensor:
        """Closed form: ``log m = -1/2 softplus(-2 lam)`` (``m^2 = sigmoid(2 lam)``), then the inverse of the piecewise-linear
        ``log m(t)``. Values of ``lam`` outside ``[lambda(T), lambda(0)]`` clamp to the ends. Shape of ``lam``."""
        y = (0.5 * torch.nn.functional.softplus(-2.0 * lam.to(torch.float64))).contiguous()  # -log m, increasing in t
        a = (-self._lm).to(y.device)
        k = (torch.searchsorted(a, y) - 1).clamp(0, self.N - 2)
        frac = (y - a[k]) / (a[k + 1] - a[k])
        t = (k.to(torch.float64) + frac) * (self.T / (self.N - 1))
        return t.clamp(0.0, self.T).to(lam.dtype)


def _scheduler_config(scheduler, key, default=None):
    cfg = getattr(scheduler, "config", None)
    if cfg is None:
        return default
    return cfg.get(key, default) if hasattr(cfg, "get") else getattr(cfg, key, default)


def _is_ve_scheduler(scheduler) -> bool:
    diffusers = _require_diffusers()
    return isinstance(scheduler, diffusers.ScoreSdeVeScheduler)


def _vp_from_betas(betas: torch.Tensor, scheduler) -> VPSDE | None:
    """``VPSDE`` (linear, then cosine) whose discrete betas equal ``betas`` to float32 precision, else ``None``."""
    N = betas.numel()
    candidates = []
    bs, be = _scheduler_config(scheduler, "beta_start"), _scheduler_config(scheduler, "beta_end")
    if bs is not None and be is not None:
        candidates.append((float(bs) * N, float(be) * N, "linear"))
    candidates.append((float(betas[0]) * N, float(betas[-1]) * N, "linear"))  # trained betas that happen to be linear
    candidates.append((0.1, 20.0, "cosine"))
    for beta_min, beta_max, schedule in candidates:
        try:
            sde = VPSDE(beta_min, beta_max, N, schedule=schedule)
        except ValueError:
            continue
        if torch.allclose(sde.discrete_betas, betas, rtol=_BETA_RTOL, atol=0.0):
            return sde
    return None


def sde_from_scheduler(scheduler, chain: bool = False) -> SDE:
    """The scoresde SDE of a diffusers scheduler.

    * ``ScoreSdeVeScheduler``: ``VESDE(sigma_min, sigma_max, N = num_train_timesteps)`` (diffusers' continuous
      ``sigma(t) = sigma_min (sigma_max / sigma_min)^t`` and discrete ``sigma_i = exp(linspace(log sigma_min, log
      sigma_max, N))`` are VESDE's ``sigma(t)`` and ``discrete_sigmas``).
    * a scheduler with ``betas`` / ``alphas_cumprod`` (DDPM, DDIM, PNDM, DPM-Solver, Euler, ...): with
      ``chain=True`` always ``DiscreteVPSDE(scheduler.alphas_cumprod)``; otherwise ``VPSDE(beta_min, beta_max, N)``
      if ``beta_i = linspace(beta_min / N, beta_max / N, N)`` (to float32 precision: ``beta_min = N beta_start``),
      ``VPSDE(schedule="cosine")`` if the betas are Nichol & Dhariwal's (``"squaredcos_cap_v2"``), and
      ``DiscreteVPSDE`` for any other betas.

    ``ValueError`` for another scheduler or a zero terminal SNR (``rescale_betas_zero_snr``).
    """
    if _is_ve_scheduler(scheduler):
        smin, smax = _scheduler_config(scheduler, "sigma_min"), _scheduler_config(scheduler, "sigma_max")
        return VESDE(float(smin), float(smax), int(_scheduler_config(scheduler, "num_train_timesteps")))
    ab = getattr(scheduler, "alphas_cumprod", None)
    betas = getattr(scheduler, "betas", None)
    if not torch.is_tensor(ab) or not torch.is_tensor(betas):
        raise ValueError(
            f"scheduler must be a diffusers ScoreSdeVeScheduler or a scheduler with betas and alphas_cumprod "
            f"(DDPMScheduler, DDIMScheduler, ...); got {type(scheduler).__name__}"
        )
    if bool((ab <= 0).any()):
        raise ValueError(
            f"{type(scheduler).__name__} has alphas_cumprod[-1] = {float(ab[-1])!r} (zero terminal SNR, "
            "rescale_betas_zero_snr=True?): m(T) = 0 has no VP SDE; supported: alphas_cumprod in (0, 1]"
        )
    if chain:
        return DiscreteVPSDE(ab)
    betas = betas.detach().to("cpu", torch.float64)
    sde = _vp_from_betas(betas, scheduler)
    return sde if sde is not None else DiscreteVPSDE(ab)


# --------------------------------------------------------------------------------------------
# the network adapters
# --------------------------------------------------------------------------------------------
class UNetNet(nn.Module):
    """scoresde's ``net(x, t_in) -> (B, ...)`` contract for a diffusers ``UNet2DModel``: ``unet(x, t_in).sample``.

    ``x`` ``(B, C, H, W)``, ``t_in`` ``(B,)`` (the DDPM step as a float, or the VE noise level ``sigma``). With
    ``integer_timesteps`` (a ``"learned"`` time embedding, an ``nn.Embedding``) ``t_in`` is rounded to ``long``.
    A U-Net with learned variances (``out_channels = 2 C``) returns its first ``C`` channels (the mean part, as
    diffusers' schedulers split it). Returns ``(B, C, H, W)``.
    """

    def __init__(self, unet: nn.Module, integer_timesteps: bool = False):
        super().__init__()
        self.unet = unet
        self.integer_timesteps = bool(integer_timesteps)

    def forward(self, x: torch.Tensor, t_in: torch.Tensor) -> torch.Tensor:
        t = torch.round(t_in).long() if self.integer_timesteps else t_in
        out = self.unet(x, t).sample
        if out.shape[1] != x.shape[1]:
            out = out[:, : x.shape[1]]
        return out


class VPredictionNet(nn.Module):
    """Turn a v-prediction network into an ε-prediction one at DDPM step ``i = round(t_in)``::

        v = sqrt(abar_i) eps - sqrt(1 - abar_i) x_0,   x = sqrt(abar_i) x_0 + sqrt(1 - abar_i) eps
        =>  eps = sqrt(abar_i) v + sqrt(1 - abar_i) x

    (diffusers' ``get_velocity`` and the ``pred_epsilon`` of its DDIM step). ``alphas_cumprod`` ``(N,)`` must be the
    ``ScoreModel``'s (``sde.alphas_cumprod``) so the conversion uses the same ``abar_i``. Shapes as ``UNetNet``.
    """

    def __init__(self, inner: nn.Module, alphas_cumprod: torch.Tensor):
        super().__init__()
        self.inner = inner
        self.register_buffer("alphas_cumprod", torch.as_tensor(alphas_cumprod, dtype=torch.float64).clone(), persistent=False)

    def forward(self, x: torch.Tensor, t_in: torch.Tensor) -> torch.Tensor:
        v = self.inner(x, t_in)
        i = torch.round(t_in).long().to(self.alphas_cumprod.device)
        ab = self.alphas_cumprod[i].to(device=x.device, dtype=x.dtype)
        return batch_broadcast(torch.sqrt(ab), x) * v + batch_broadcast(torch.sqrt(1.0 - ab), x) * x


# --------------------------------------------------------------------------------------------
# from_unet
# --------------------------------------------------------------------------------------------
def _same(a: float, b: float, rtol: float = 1e-6) -> bool:
    return math.isclose(float(a), float(b), rel_tol=rtol, abs_tol=0.0)


def _ve_model(unet, scheduler, sde, prediction_type):
    if prediction_type not in (None, "score"):
        raise ValueError(
            f"prediction_type={prediction_type!r} does not apply to a Fourier-time (score-SDE VE) UNet2DModel, whose "
            "output is the score; pass prediction_type=None"
        )
    if scheduler is not None and not _is_ve_scheduler(scheduler):
        raise ValueError(
            f"a UNet2DModel with time_embedding_type='fourier' (score-SDE VE) needs a ScoreSdeVeScheduler; got "
            f"{type(scheduler).__name__}"
        )
    if scheduler is None and sde is None:
        raise ValueError(
            "a UNet2DModel with time_embedding_type='fourier' (score-SDE VE) needs scheduler=ScoreSdeVeScheduler(...) "
            "or sde=VESDE(...): its noise range sigma_min, sigma_max is not in the UNet config"
        )
    from_sched = sde_from_scheduler(scheduler) if scheduler is not None else None
    if sde is None:
        sde = from_sched
    elif not isinstance(sde, VESDE):
        raise ValueError(f"sde must be a VESDE for a Fourier-time (score-SDE VE) UNet2DModel; got {sde!r}")
    elif from_sched is not None and not (_same(sde.sigma_min, from_sched.sigma_min) and _same(sde.sigma_max, from_sched.sigma_max)):
        raise ValueError(
            f"sde {sde!r} does not match the scheduler's sigma_min={from_sched.sigma_min}, sigma_max={from_sched.sigma_max}"
        )
    if unet.config.out_channels != unet.config.in_channels:
        raise ValueError(
            f"a score-SDE VE UNet2DModel must have out_channels == in_channels; got {unet.config.out_channels} "
            f"and {unet.config.in_channels}"
        )
    return ScoreModel(UNetNet(unet), sde, "score", continuous=True), sde


def _vp_model(unet, scheduler, sde, prediction_type):
    if scheduler is not None and _is_ve_scheduler(scheduler):
        raise ValueError(
            f"ScoreSdeVeScheduler goes with a Fourier-time UNet2DModel (time_embedding_type='fourier'); this UNet has "
            f"time_embedding_type={unet.config.time_embedding_type!r}"
        )
    sched_type = _scheduler_config(scheduler, "prediction_type") if scheduler is not None else None
    if prediction_type is not None and sched_type is not None and prediction_type != sched_type:
        raise ValueError(f"prediction_type={prediction_type!r} differs from the scheduler's prediction_type={sched_type!r}")
    ptype = prediction_type or sched_type or "epsilon"
    if ptype not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {tuple(PREDICTION_TYPES)}; got {ptype!r}")

    from_sched = sde_from_scheduler(scheduler) if scheduler is not None else None
    if sde is None:
        sde = from_sched if from_sched is not None else VPSDE()  # VPSDE() = DDPMScheduler()'s default betas
    elif not isinstance(sde, VPSDE):
        raise ValueError(
            f"sde must be a VPSDE (or DiscreteVPSDE) for a DDPM-style UNet2DModel: the discrete chain needs VP betas; got {sde!r}"
        )
    elif scheduler is not None:
        ab = scheduler.alphas_cumprod.detach().to("cpu", torch.float64)
        if sde.N != ab.numel() or not torch.allclose(sde.alphas_cumprod, ab, rtol=_ABAR_RTOL, atol=0.0):
            raise ValueError(
                f"sde {sde!r} does not match the scheduler's alphas_cumprod (N = {ab.numel()}, beta_schedule="
                f"{_scheduler_config(scheduler, 'beta_schedule')!r}); pass sde=None or sde_from_scheduler(scheduler, chain=True)"
            )
    C = unet.config.in_channels
    if unet.config.out_channels not in (C, 2 * C):
        raise ValueError(
            f"a DDPM-style UNet2DModel must have out_channels = in_channels ({C}) or 2 in_channels (learned variance); "
            f"got {unet.config.out_channels}"
        )
    net = UNetNet(unet, integer_timesteps=unet.config.time_embedding_type == "learned")
    if ptype == "v_prediction":
        net = VPredictionNet(net, sde.alphas_cumprod)
    return ScoreModel(net, sde, PREDICTION_TYPES[ptype], continuous=False), sde


def from_unet(unet, scheduler=None, sde: SDE | None = None, prediction_type: str | None = None) -> tuple[ScoreModel, SDE]:
    """Wrap a diffusers ``UNet2DModel`` as a scoresde ``ScoreModel`` (see the module docstring for the conventions).

    Args:
        unet: an unconditional ``diffusers.UNet2DModel``.
        scheduler: the diffusers scheduler it was trained with. DDPM-style U-Nets: any scheduler with ``betas`` /
            ``alphas_cumprod`` and ``config.prediction_type`` (``None``: DDPM's default linear betas and
            ``"epsilon"``); Fourier-time (VE) U-Nets: a ``ScoreSdeVeScheduler`` (or give ``sde``).
        sde: the SDE to use instead of ``sde_from_scheduler(scheduler)``; must match the scheduler's betas
            (VP) or ``sigma_min``/``sigma_max`` (VE). E.g. ``sde_from_scheduler(scheduler, chain=True)`` to sample on
            the chain's exact coefficients.
        prediction_type: ``"epsilon"``, ``"sample"`` or ``"v_prediction"`` when there is no scheduler (must agree
            with the scheduler's otherwise).

    Returns:
        ``(model, sde)``: ``model.score_fn(x, t)`` for ``x`` ``(B, C, H, W)``, ``t`` ``(B,)`` in ``[0, T]``.
        DDPM-style: discrete (``continuous=False``), ``model.eps_fn(x, i T / (N - 1))`` is the ε the U-Net predicts at
        step ``i`` (``unet(x, i).sample`` for ``"epsilon"``). VE: continuous, ``model.score_fn(x, t) =
        unet(x, sigma(t)).sample``.

    Raises:
        ImportError without diffusers; TypeError for another model class; ValueError for a class-conditional
        U-Net, an unsupported prediction type or schedule, or an ``sde`` that does not match the scheduler.
    """
    diffusers = _require_diffusers()
    if not isinstance(unet, diffusers.UNet2DModel):
        raise TypeError(f"unet must be a diffusers.UNet2DModel; got {type(unet).__name__}")
    if sde is not None and not isinstance(sde, SDE):
        raise TypeError(f"sde must be a scoresde SDE or None; got {type(sde).__name__}")
    cfg = unet.config
    if cfg.get("num_class_embeds") is not None or cfg.get("class_embed_type") is not None:
        raise ValueError("class-conditional UNet2DModel (num_class_embeds / class_embed_type set) is not supported")
    kind = cfg.time_embedding_type
    if kind == "fourier":
        return _ve_model(unet, scheduler, sde, prediction_type)
    if kind in ("positional", "learned"):
        return _vp_model(unet, scheduler, sde, prediction_type)
    raise ValueError(f"UNet2DModel time_embedding_type must be 'positional', 'learned' or 'fourier'; got {kind!r}")
