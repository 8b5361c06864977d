"""The one entry point ``sample``: validates every option, then dispatches to a small sampler function."""

from __future__ import annotations

import math

import torch

from ..sde import SDE, VESDE
from ._common import SCHEDULES, CountingScore, Noise, SampleResult, default_eps, time_grid
from .fast import sample_ddim, sample_dpm_solver, sample_heun
from .ode import ADAPTIVE_ODE_METHODS, ERROR_NORMS, FIXED_ODE_METHODS, ODE_METHODS, sample_ode
from .pc import CORRECTORS, PREDICTORS, sample_langevin, sample_pc
from .._validate import check_choice, check_int, check_positive

__all__ = ["sample", "check_method_options", "METHODS", "METHOD_OPTIONS", "DEFAULT_STEPS"]

METHODS = ("pc", "langevin", "ode", "ddim", "dpm_solver", "heun")

# options every method takes, with their defaults
COMMON_OPTIONS = {"eps": None, "denoise": None, "dtype": None, "device": None, "x_T": None, "return_trajectory": False}

# method-specific options and defaults
METHOD_OPTIONS = {
    "pc": {"predictor": "reverse_diffusion", "corrector": "langevin", "snr": 0.16, "n_steps": 1, "probability_flow": False,
           "langevin_norm": None, "schedule": "time_uniform", "rho": 7.0},
    "langevin": {"snr": 0.3, "n_steps": 10, "schedule": "logSNR", "rho": 7.0},
    "ode": {"ode_method": "dopri5", "rtol": 1e-5, "atol": 1e-5, "error_norm": "per_sample", "trajectory_points": 11},
    "ddim": {"eta": 0.0, "schedule": "time_uniform", "rho": 7.0},
    "dpm_solver": {"order": 3, "multistep": True, "schedule": "logSNR", "rho": 7.0, "lower_order_final": True},
    "heun": {"schedule": "karras", "rho": 7.0},
}

# default number of solver steps when ``steps=None`` (``"N"`` = the SDE's own ``N``, the paper's 1000)
DEFAULT_STEPS = {"pc": "N", "langevin": 100, "ode": 100, "ddim": 50, "dpm_solver": 20, "heun": 18}

# final Tweedie denoising on by default for the stochastic samplers (as in the paper), off for the ODE solvers
DEFAULT_DENOISE = {"pc": True, "langevin": True, "ode": False, "ddim": False, "dpm_solver": False, "heun": False}


def _bool(name, value):
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False; got {value!r}")
    return value


def _resolve(method: str, sde: SDE, shape, steps, generator, options: dict) -> dict:
    """Check every argument and fill in defaults; raises ``ValueError``/``TypeError`` before any work."""
    check_choice("method", method, METHODS)
    if not isinstance(sde, SDE):
        raise TypeError(f"sde must be a scoresde SDE (VPSDE, SubVPSDE, VESDE); got {type(sde).__name__}")
    allowed = {**COMMON_OPTIONS, **METHOD_OPTIONS[method]}
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for method={method!r}; allowed options: {sorted(allowed)}")
    o = {**allowed, **options}
    try:
        shape = tuple(int(d) for d in shape)
    except TypeError:
        raise TypeError(f"shape must be a sequence of ints (batch, *dims); got {shape!r}") from None
    if len(shape) < 2 or any(d < 1 for d in shape):
        raise ValueError(f"shape must be (batch, *dims) with at least 2 positive entries; got {shape}")
    o["shape"] = shape

    if method in ("ddim", "dpm_solver") and isinstance(sde, VESDE):
        raise ValueError(f"method={method!r} is implemented for VP and sub-VP SDEs only (allowed sde: VPSDE, SubVPSDE); "
                         "for VE use method='heun', 'ode' or 'pc'")

    # steps
    if method == "ode" and o["ode_method"] in ADAPTIVE_ODE_METHODS:
        if steps is not None:
            raise ValueError(f"steps is set by the adaptive ode_method={o['ode_method']!r} (use rtol/atol); pass steps=None "
                             f"or a fixed-grid ode_method in {FIXED_ODE_METHODS}")
        o["steps"] = None
    else:
        d = DEFAULT_STEPS[method]
        o["steps"] = check_int("steps", (sde.N if d == "N" else d) if steps is None else steps)

    # common options
    eps = default_eps(sde) if o["eps"] is None else o["eps"]
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < sde.T:
        raise ValueError(f"eps must be a number in (0, T) = (0, {sde.T}); got {eps!r}")
    o["eps"] = float(eps)
    o["denoise"] = DEFAULT_DENOISE[method] if o["denoise"] is None else _bool("denoise", o["denoise"])
    _bool("return_trajectory", o["return_trajectory"])
    x_T = o["x_T"]
    if x_T is not None:
        if not torch.is_tensor(x_T):
            raise TypeError(f"x_T must be a tensor of shape {shape}; got {type(x_T).__name__}")
        if tuple(x_T.shape) != shape:
            raise ValueError(f"x_T must have shape {shape}; got {tuple(x_T.shape)}")
    dtype = o["dtype"] or (x_T.dtype if x_T is not None else torch.float32)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating torch.dtype (e.g. torch.float32, torch.float64); got {dtype!r}")
    o["dtype"] = dtype
    gen0 = generator[0] if isinstance(generator, (list, tuple)) and len(generator) else generator
    device = o["device"] or (x_T.device if x_T is not None else (gen0.device if isinstance(gen0, torch.Generator) else "cpu"))
    o["device"] = torch.device(device)
    o["noise"] = noise = Noise(generator, shape[0], o["device"], dtype)  # checks the generator(s)

    # method options
    o.update(check_method_options(method, {k: o[k] for k in METHOD_OPTIONS[method]}))
    if method == "pc" and o["langevin_norm"] is None:  # per-sample norms exactly when per-sample generators ask for batch invariance
        o["langevin_norm"] = "sample" if noise.generators is not None else "batch"
    return o


def check_method_options(method: str, options: dict) -> dict:
    """Check ``method`` and its own options (keys of ``METHOD_OPTIONS[method]``; none needs the SDE) and
    return them completed with the defaults. ``sample`` calls it; so does the config layer, to validate
    a sampler config. Raises ``ValueError`` naming the option and its allowed values.
    ``langevin_norm=None`` stays ``None`` (``sample`` picks it from the generators).
    """
    check_choice("method", method, METHODS)
    unknown = sorted(set(options) - set(METHOD_OPTIONS[method]))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for method={method!r}; allowed options: {sorted(METHOD_OPTIONS[method])}")
    o = {**METHOD_OPTIONS[method], **options}
    if method == "pc":
        check_choice("predictor", o["predictor"], tuple(PREDICTORS))
        check_choice("corrector", o["corrector"], tuple(CORRECTORS))
        if o["predictor"] == "none" and o["corrector"] == "none":
            raise ValueError("predictor and corrector cannot both be 'none'")
        _bool("probability_flow", o["probability_flow"])
        if o["probability_flow"] and o["predictor"] not in ("euler_maruyama", "reverse_diffusion"):
            raise ValueError(f"probability_flow=True needs predictor in ('euler_maruyama', 'reverse_diffusion'); got {o['predictor']!r}")
        if o["langevin_norm"] is not None:
            check_choice("langevin_norm", o["langevin_norm"], ("batch", "sample"))
    if method in ("pc", "langevin"):
        check_positive("snr", o["snr"])
        check_int("n_steps", o["n_steps"])
    if method == "ode":
        check_choice("ode_method", o["ode_method"], ODE_METHODS)
        check_positive("rtol", o["rtol"])
        check_positive("atol", o["atol"])
        check_choice("error_norm", o["error_norm"], ERROR_NORMS)
        check_int("trajectory_points", o["trajectory_points"])
    if method == "ddim":
        eta = o["eta"]
        if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not (math.isfinite(eta) and 0 <= eta <= 1):
            raise ValueError(f"eta must lie in [0, 1]; got {eta!r}")
    if method in ("pc", "langevin", "ddim", "dpm_solver", "heun"):
        check_choice("schedule", o["schedule"], SCHEDULES)
        check_positive("rho", o["rho"])
    if method == "dpm_solver":
        check_choice("order", o["order"], (1, 2, 3))
        _bool("multistep", o["multistep"])
        _bool("lower_order_final", o["lower_order_final"])
    return o


def sample(score_fn, sde: SDE, shape, method: str = "pc", steps: int | None = None, generator=None, progress: bool = False,
           **options) -> SampleResult:
    """Draw samples ``x_0 ~ p_0`` by reversing ``sde`` with ``score_fn(x, t) ~ grad log p_t(x)``.

    Starts from ``x_T ~ N(0, prior_std^2 I)`` (or ``options["x_T"]``) at ``t = T`` and ends at ``t = eps``
    (default 1e-3 for VP/sub-VP, 1e-5 for VE), then optionally applies Tweedie's denoising
    ``x <- (x + s(eps)^2 score(x, eps)) / m(eps)`` (``denoise``; on by default for ``pc``/``langevin``).

    Args:
        score_fn: ``score_fn(x, t)`` with ``x (B, *dims)``, ``t (B,)`` -> shape of ``x``.
        sde: a ``VPSDE``, ``SubVPSDE`` or ``VESDE``.
        shape: ``(B, *dims)`` of the samples.
        method: ``"pc"`` | ``"langevin"`` | ``"ode"`` | ``"ddim"`` | ``"dpm_solver"`` | ``"heun"``.
        steps: number of solver steps (NFE may differ and is reported); ``None`` for the default
            (``DEFAULT_STEPS``: pc ``sde.N``, langevin 100 levels, fixed-grid ode 100, ddim 50, dpm_solver 20,
            heun 18); must be ``None`` for adaptive ODE solvers.
        generator: ``None``, a ``torch.Generator``, or a list of ``B`` generators (one per sample: every random
            number of sample ``b`` comes from ``generator[b]``, so it does not depend on the batch).
        progress: show a tqdm progress bar.
        **options: common: ``eps``, ``denoise``, ``dtype`` (default float32), ``device`` (default the generator's,
            else cpu), ``x_T``, ``return_trajectory``. Per method (defaults in ``METHOD_OPTIONS``):
            pc: ``predictor`` (euler_maruyama | reverse_diffusion | ancestral | none), ``corrector``
            (langevin | annealed_langevin | none), ``snr``, ``n_steps``, ``probability_flow``, ``langevin_norm``
            (batch | sample; default sample with a list of generators, else batch: see ``langevin_corrector``),
            ``schedule``, ``rho``; langevin: ``snr``, ``n_steps`` (per noise level), ``schedule`` (default logSNR), ``rho``;
            ode: ``ode_method`` (dopri5 | dopri8 | bosh3 | adaptive_heun | scipy_rk45 | euler | midpoint | rk4),
            ``rtol``, ``atol`` (1e-5 as in the paper), ``error_norm`` (per_sample | batch), ``trajectory_points``
            (adaptive only); ddim: ``eta`` in [0, 1], ``schedule``, ``rho``; dpm_solver: ``order`` (1, 2, 3),
            ``multistep``, ``schedule`` (time_uniform | logSNR | karras), ``rho``, ``lower_order_final``;
            heun: ``schedule``, ``rho``.

    Returns:
        ``SampleResult`` with ``x`` (``shape``), ``nfe`` (score calls counted), ``trajectory``/``times``
        (``(K, *shape)``, ``(K,)``, from ``x_T`` at ``T`` to ``eps``, plus the denoised ``x`` at ``t = 0``
        when ``denoise``; with ``return_trajectory``) and ``info``.

    Sampling runs under ``torch.no_grad()``; a ``score_fn`` that needs autograd inside must enable it itself.

    Raises:
        ValueError/TypeError for any bad argument, before any score evaluation.
    """
    if not callable(score_fn):
        raise TypeError(f"score_fn must be callable as score_fn(x, t); got {type(score_fn).__name__}")
    o = _resolve(method, sde, shape, steps, generator, options)
    shape, dtype, device, noise = o["shape"], o["dtype"], o["device"], o["noise"]
    counted = CountingScore(score_fn)

    if method == "ode" and o["steps"] is None:
        ts = torch.linspace(float(sde.T), o["eps"], o["trajectory_points"] if o["return_trajectory"] else 2, dtype=torch.float64)
    else:
        schedule = o.get("schedule", "time_uniform")
        ts = time_grid(sde, o["steps"], o["eps"], schedule, o.get("rho", 7.0))

    if o["x_T"] is not None:
        x = o["x_T"].to(device=device, dtype=dtype)
    elif noise.generators is not None:
        x = sde.prior_std * noise.randn(shape)
    else:
        x = sde.prior_sampling(shape, noise.generator, device=device, dtype=dtype)

    traj = [x] if o["return_trajectory"] else None
    info = {"method": method, "steps": o["steps"], "eps": o["eps"], "denoise": o["denoise"]}
    info.update({k: o[k] for k in METHOD_OPTIONS[method]})
    with torch.no_grad():
        if method == "pc":
            x = sample_pc(counted, sde, x, ts, noise, o["predictor"], o["corrector"], o["snr"], o["n_steps"], o["probability_flow"],
                          False, progress, traj, o["langevin_norm"])
        elif method == "langevin":
            x = sample_langevin(counted, sde, x, ts, noise, o["snr"], o["n_steps"], False, progress, traj)
        elif method == "ode":
            x, extra = sample_ode(counted, sde, x, ts, o["ode_method"], o["rtol"], o["atol"], o["error_norm"], traj)
            info.update(extra)
        elif method == "ddim":
            x = sample_ddim(counted, sde, x, ts, noise, o["eta"], progress, traj)
        elif method == "dpm_solver":
            x = sample_dpm_solver(counted, sde, x, ts, o["order"], o["multistep"], o["lower_order_final"], progress, traj)
        elif method == "heun":
            x = sample_heun(counted, sde, x, ts, progress, traj)
        if o["denoise"]:
            from ._common import denoise

            x = denoise(counted, sde, x, o["eps"])
            if traj is not None:
                traj.append(x)
                ts = torch.cat([ts, ts.new_zeros(1)])  # the denoised estimate of x_0 sits at t = 0
    result = SampleResult(x=x, nfe=counted.calls, info=info)
    if traj is not None:
        result.trajectory = torch.stack(traj)
        result.times = ts.clone()
    return result
