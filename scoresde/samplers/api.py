"""The one entry point ``sample`` and the one table ``SAMPLERS`` it dispatches through.

A method's options are the keyword-only parameters of its sampler function, and their defaults are the
method's defaults; ``METHOD_OPTIONS``, ``DEFAULT_STEPS``, ``DEFAULT_DENOISE`` and ``option_types`` are read off
the signatures (nothing is copied). ``check_method_options`` (no SDE needed) and ``check_sample_options``
(given the SDE) hold every rule on them; ``sample`` validates once, through ``check_sample_options``, then calls
``SAMPLERS[method](score_fn, sde, x_T, noise, callback, progress, **options)``.
"""

from __future__ import annotations

import inspect
import logging
import math
import numbers
import typing

import torch

from ..sde import SDE, VESDE
from .._validate import check_choice, check_int, check_positive
from ._common import SCHEDULES, CountingScore, Noise, SampleResult, _check_bool
from .dpm_solver_pp import check_dpm_solver_adaptive_options, check_dpm_solver_pp_options, sample_dpm_solver_adaptive, sample_dpm_solver_pp
from .edm import check_edm_options, sample_edm

log = logging.getLogger("scoresde")
from .fast import sample_ddim, sample_dpm_solver, sample_heun
from .ode import ADAPTIVE_ODE_METHODS, ERROR_NORMS, FIXED_ODE_METHODS, ODE_METHODS, sample_ode
from .unipc import check_unipc_options, sample_unipc
from .pc import CORRECTORS, PREDICTORS, PROBABILITY_FLOW_PREDICTORS, sample_langevin, sample_pc

__all__ = [
    "sample", "SAMPLERS", "METHODS", "METHOD_OPTIONS", "DEFAULT_STEPS", "DEFAULT_DENOISE", "VP_ONLY_METHODS",
    "option_types", "check_method_options", "check_sample_options",
]

# method name -> sampler function ``fn(score_fn, sde, x_T, noise, callback, progress, /, *, <options>) -> (x_0, info)``
SAMPLERS = {
    "pc": sample_pc,
    "langevin": sample_langevin,
    "ode": sample_ode,
    "ddim": sample_ddim,
    "dpm_solver": sample_dpm_solver,
    "heun": sample_heun,
    "dpm_solver_pp": sample_dpm_solver_pp,
    "dpm_solver_adaptive": sample_dpm_solver_adaptive,
    "unipc": sample_unipc,
    "edm": sample_edm,
}
# the rules on the options of the few-step samplers, each beside its sampler: ``check(options completed with defaults)``
_OPTION_CHECKS = {
    "dpm_solver_pp": check_dpm_solver_pp_options,
    "dpm_solver_adaptive": check_dpm_solver_adaptive_options,
    "unipc": check_unipc_options,
    "edm": check_edm_options,
}
METHODS = tuple(SAMPLERS)
# methods written for VP-type SDEs only (DDIM, DPM-Solver); VE is rejected
VP_ONLY_METHODS = ("ddim", "dpm_solver")


def _options(fn) -> dict:
    """``name -> default`` of ``fn``'s keyword-only parameters: a method's options and their defaults."""
    return {p.name: p.default for p in inspect.signature(fn).parameters.values() if p.kind is inspect.Parameter.KEYWORD_ONLY}


# method -> {option: default}: every user-settable option of the method (incl. ``steps``, ``eps``, ``denoise``),
# read off ``SAMPLERS[method]``'s signature
METHOD_OPTIONS = {m: _options(fn) for m, fn in SAMPLERS.items()}
# default ``steps`` of each method (``None``: pc ``sde.N``; ode adaptive, or ``FIXED_GRID_STEPS`` for a fixed grid)
DEFAULT_STEPS = {m: o["steps"] for m, o in METHOD_OPTIONS.items()}
# final Tweedie denoising on by default for the stochastic samplers (as in the paper), off for the ODE solvers
DEFAULT_DENOISE = {m: o["denoise"] for m, o in METHOD_OPTIONS.items()}


_OPTION_TYPES = {m: {k: typing.get_type_hints(fn)[k] for k in METHOD_OPTIONS[m]} for m, fn in SAMPLERS.items()}


def option_types(method: str) -> dict:
    """``name -> type`` of ``method``'s options (the keys of ``METHOD_OPTIONS[method]``), from the annotations of
    ``SAMPLERS[method]`` (``typing.get_type_hints``): ``int``, ``float``, ``bool``, ``str`` or ``typing.Optional[...]``
    of one of them (``None`` meaning the method's documented default). A config layer builds its schema from these."""
    check_choice("method", method, METHODS)
    return dict(_OPTION_TYPES[method])


def _allows_none(method: str, name: str) -> bool:
    return type(None) in typing.get_args(_OPTION_TYPES[method][name])


def check_method_options(method: str, options: dict) -> dict:
    """Check ``method`` and its own options (keys of ``METHOD_OPTIONS[method]``, incl. ``steps``, ``eps``, ``denoise``)
    without the SDE, and return them completed with the defaults of ``SAMPLERS[method]``'s signature.

    An option given as ``None`` whose type is not ``Optional`` (e.g. ``steps`` of ``ddim``, ``denoise``) means
    "the default" and is replaced by it; ``Optional`` ones keep ``None`` (the sampler resolves it: ``steps`` of pc
    to ``sde.N``, ``eps`` to ``default_eps(sde)``, ``langevin_norm`` from the generators). ``sample`` calls it
    (through ``check_sample_options``); so does the config layer, to validate a sampler config.
    Raises ``ValueError`` naming the option and its allowed values.
    """
    check_choice("method", method, METHODS)
    defaults = METHOD_OPTIONS[method]
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for method={method!r}; allowed options: {sorted(defaults)}")
    o = dict(defaults)
    o.update({k: v for k, v in options.items() if v is not None or _allows_none(method, k)})

    # common to every method
    if o["steps"] is not None:
        check_int("steps", o["steps"])
    if o["eps"] is not None:
        check_positive("eps", o["eps"])
    _check_bool("denoise", o["denoise"])
    if "schedule" in o:
        check_choice("schedule", o["schedule"], SCHEDULES)
        check_positive("rho", o["rho"])

    if method == "pc":
        check_choice("predictor", o["predictor"], tuple(PREDICTORS))
        check_choice("corrector", o["corrector"], tuple(CORRECTORS))
        if o["predictor"] == "none" and o["corrector"] == "none":
            raise ValueError("predictor and corrector cannot both be 'none'")
        _check_bool("probability_flow", o["probability_flow"])
        if o["probability_flow"] and o["predictor"] not in PROBABILITY_FLOW_PREDICTORS:
            raise ValueError(f"probability_flow=True needs predictor in {PROBABILITY_FLOW_PREDICTORS}; got {o['predictor']!r}")
        if o["langevin_norm"] is not None:
            check_choice("langevin_norm", o["langevin_norm"], ("batch", "sample"))
    if method in ("pc", "langevin"):
        check_positive("snr", o["snr"])
        check_int("n_steps", o["n_steps"])
    if method == "ode":
        check_choice("ode_method", o["ode_method"], ODE_METHODS)
        if o["ode_method"] in ADAPTIVE_ODE_METHODS and o["steps"] is not None:
            raise ValueError(f"steps must be None for the adaptive ode_method={o['ode_method']!r} (its steps come from "
                             f"rtol/atol); got {o['steps']!r}; or pick a fixed-grid ode_method in {FIXED_ODE_METHODS}")
        check_positive("rtol", o["rtol"])
        check_positive("atol", o["atol"])
        check_choice("error_norm", o["error_norm"], ERROR_NORMS)
        check_int("trajectory_points", o["trajectory_points"], 2)
    if method == "ddim":
        eta = o["eta"]
        if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not (math.isfinite(eta) and 0 <= eta <= 1):
            raise ValueError(f"eta must lie in [0, 1]; got {eta!r}")
    if method == "dpm_solver":
        check_choice("order", o["order"], (1, 2, 3))
        _check_bool("multistep", o["multistep"])
        _check_bool("lower_order_final", o["lower_order_final"])
    if method in _OPTION_CHECKS:
        _OPTION_CHECKS[method](o)
    return o


def check_sample_options(sde: SDE, method: str, **options) -> dict:
    """Every check ``sample`` makes on ``method`` and its options given the SDE (no score function, no data):
    ``check_method_options``, then the rules that need ``sde``: ``ddim``/``dpm_solver`` need a VP or sub-VP SDE
    (``VP_ONLY_METHODS``), ``eps`` must lie in ``(0, sde.T)``. Returns the completed options (as
    ``check_method_options``). Raises ``TypeError`` for a non-SDE, ``ValueError`` naming the option otherwise.
    A config layer calls it to validate a sampler against the run's SDE before any work."""
    check_choice("method", method, METHODS)
    if not isinstance(sde, SDE):
        raise TypeError(f"sde must be a scoresde SDE (VPSDE, SubVPSDE, VESDE); got {type(sde).__name__}")
    o = check_method_options(method, options)
    if method in VP_ONLY_METHODS and isinstance(sde, VESDE):
        raise ValueError(f"method={method!r} is implemented for VP and sub-VP SDEs only (allowed sde: VPSDE, SubVPSDE); "
                         "for VE use method='heun', 'ode' or 'pc'")
    if o["eps"] is not None and not o["eps"] < sde.T:
        raise ValueError(f"eps must lie in (0, T) = (0, {sde.T}); got {o['eps']!r}")
    return o


def _check_run(shape, dtype, device, x_T, return_trajectory, generator):
    """The run's own arguments (not a method's options): returns ``(shape, dtype, device, noise)``."""
    try:
        entries = tuple(shape)
    except TypeError:
        raise TypeError(f"shape must be a sequence of ints (batch, *dims); got {shape!r}") from None
    if not all(isinstance(d, numbers.Integral) and not isinstance(d, bool) for d in entries):
        raise TypeError(f"shape must be a sequence of ints (batch, *dims); got {shape!r}")  # 4.5 is not truncated to 4
    shape = tuple(int(d) for d in entries)
    if len(shape) < 2 or any(d < 1 for d in shape):
        raise ValueError(f"shape must be (batch, *dims) with at least 2 positive entries; got {shape}")
    _check_bool("return_trajectory", return_trajectory)
    if x_T is not None:
        if not torch.is_tensor(x_T):
            raise TypeError(f"x_T must be a tensor of shape {shape}; got {type(x_T).__name__}")
        if tuple(x_T.shape) != shape:
            raise ValueError(f"x_T must have shape {shape}; got {tuple(x_T.shape)}")
    dtype = dtype or (x_T.dtype if x_T is not None else torch.float32)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating torch.dtype (e.g. torch.float32, torch.float64); got {dtype!r}")
    gen0 = generator[0] if isinstance(generator, (list, tuple)) and len(generator) else generator
    device = torch.device(device or (x_T.device if x_T is not None else (gen0.device if isinstance(gen0, torch.Generator) else "cpu")))
    return shape, dtype, device, Noise(generator, shape[0], device, dtype)  # Noise checks the generator(s)


def sample(score_fn, sde: SDE, shape, method: str = "pc", steps: int | None = None, generator=None, progress: bool = False, *,
           dtype: torch.dtype | None = None, device=None, x_T: torch.Tensor | None = None, return_trajectory: bool = False,
           **options) -> SampleResult:
    """Draw samples ``x_0 ~ p_0`` by reversing ``sde`` with ``score_fn(x, t) ~ grad log p_t(x)``.

    Starts from ``x_T ~ N(0, prior_std^2 I)`` (or the given ``x_T``) at ``t = T`` and runs
    ``SAMPLERS[method]`` down to ``t = eps`` (``eps=None``: 1e-3 for VP/sub-VP, 1e-5 for VE), then optionally
    Tweedie's denoising ``x <- (x + s(eps)^2 score(x, eps)) / m(eps)`` (``denoise``; on by default for
    ``pc``/``langevin``, see ``DEFAULT_DENOISE``).

    Args:
        score_fn: ``score_fn(x, t)`` with ``x (B, *dims)``, ``t (B,)`` -> shape of ``x``.
        sde: a ``VPSDE``, ``SubVPSDE`` or ``VESDE``.
        shape: ``(B, *dims)`` of the samples.
        method: a key of ``SAMPLERS``: ``"pc"`` | ``"langevin"`` | ``"ode"`` | ``"ddim"`` | ``"dpm_solver"`` | ``"heun"``
            | ``"dpm_solver_pp"`` | ``"dpm_solver_adaptive"`` | ``"unipc"`` | ``"edm"``.
        steps: number of solver steps (NFE may differ and is reported); ``None`` for the method's default
            (``DEFAULT_STEPS``: pc ``sde.N``, langevin 100 levels, ode adaptive (fixed grid: ``FIXED_GRID_STEPS``),
            ddim 50, dpm_solver 20, heun 18, dpm_solver_pp 20, unipc 20, edm 18); must be ``None`` for adaptive ODE
            solvers and dpm_solver_adaptive.
        generator: ``None``, a ``torch.Generator``, or a list of ``B`` generators (one per sample: every random
            number of sample ``b`` comes from ``generator[b]``, so it does not depend on the batch).
        progress: show a tqdm progress bar.
        dtype: of the samples (default ``x_T``'s, else float32). device: default ``x_T``'s, else the generator's, else cpu.
        x_T: ``(B, *dims)`` start instead of a prior draw. return_trajectory: keep every state (see Returns).
        **options: the method's options, the keyword-only parameters of ``SAMPLERS[method]`` (names and defaults in
            ``METHOD_OPTIONS[method]``, types in ``option_types(method)``; each sampler's docstring says what they do):
            all: ``eps``, ``denoise``; pc: ``schedule``, ``rho``, ``predictor`` (euler_maruyama | reverse_diffusion |
            ancestral | none), ``corrector`` (langevin | annealed_langevin | none), ``snr`` (0.16), ``n_steps``,
            ``probability_flow``, ``langevin_norm`` (batch | sample; default sample with a list of generators, else
            batch); langevin: ``schedule`` (default logSNR), ``rho``, ``snr`` (0.3), ``n_steps`` (per noise level);
            ode: ``ode_method`` (``ODE_METHODS``: dopri5 ... scipy_rk45 adaptive, euler, midpoint, rk4 ... fixed),
            ``rtol``, ``atol`` (1e-5 as in the paper), ``error_norm`` (per_sample | batch), ``trajectory_points``
            (adaptive only); ddim: ``schedule``, ``rho``, ``eta`` in [0, 1]; dpm_solver: ``schedule`` (time_uniform |
            logSNR | karras), ``rho``, ``order`` (1, 2, 3), ``multistep``, ``lower_order_final``; heun: ``schedule``, ``rho``;
            dpm_solver_pp: as dpm_solver plus ``thresholding``, ``threshold_ratio``, ``threshold_max``;
            dpm_solver_adaptive: ``order`` (2: DPM-Solver-12, 3: -23), ``rtol``, ``atol``, ``h_init``, ``theta``,
            ``prediction`` (noise | data), ``steps`` None; unipc: ``schedule``, ``rho``, ``order`` (1, 2, 3), ``variant``
            (bh1 | bh2), ``corrector``, ``lower_order_final``, ``prediction`` (data | noise); edm: ``schedule``, ``rho``,
            ``S_churn``, ``S_tmin``,
            ``S_tmax``, ``S_noise``.

    Returns:
        ``SampleResult`` with ``x`` (``shape``), ``nfe`` (score calls counted), ``trajectory``/``times``
        (``(K, *shape)``, ``(K,)``, from ``x_T`` at ``T`` to ``eps``, plus the denoised ``x`` at ``t = 0``
        when ``denoise``; with ``return_trajectory``) and ``info`` (``method``, the options used with ``steps``
        and ``eps`` resolved, solver statistics).

    Sampling runs under ``torch.no_grad()``; a ``score_fn`` that needs autograd inside must enable it itself.

    Raises:
        ValueError/TypeError for any bad argument (``check_sample_options``, then the run's own arguments),
        before any score evaluation.
    """
    if not callable(score_fn):
        raise TypeError(f"score_fn must be callable as score_fn(x, t); got {type(score_fn).__name__}")
    opts = check_sample_options(sde, method, steps=steps, **options)
    shape, dtype, device, noise = _check_run(shape, dtype, device, x_T, return_trajectory, generator)

    if x_T is not None:
        x = x_T.to(device=device, dtype=dtype)
    elif noise.generators is not None:
        x = sde.prior_std * noise.randn(shape)
    else:
        x = sde.prior_sampling(shape, noise.generator, device=device, dtype=dtype)

    states, times, callback = None, None, None
    if return_trajectory:
        states, times = [x], [float(sde.T)]

        def callback(xt, t):
            states.append(xt)
            times.append(t)

    counted = CountingScore(score_fn)
    with torch.no_grad():
        x, info = SAMPLERS[method](counted, sde, x, noise, callback, progress, **opts)
    bad = int((~torch.isfinite(x.reshape(x.shape[0], -1)).all(dim=1)).sum())
    if bad:
        log.warning("sample(method=%r): %d of %d samples are not finite", method, bad, x.shape[0])
    result = SampleResult(x=x, nfe=counted.calls, info={"method": method, **opts, **info, "n_nonfinite": bad})
    if return_trajectory:
        result.trajectory = torch.stack(states)
        result.times = torch.tensor(times, dtype=torch.float64)
    return result
