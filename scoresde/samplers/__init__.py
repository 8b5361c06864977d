"""Samplers for score-based models: predictor–corrector, annealed Langevin, probability-flow ODE, DDIM,
DPM-Solver, EDM-Heun, and the few-step DPM-Solver++, adaptive DPM-Solver, UniPC and EDM's stochastic sampler (k-diffusion style: one small function each), in one table ``SAMPLERS`` behind one
entry point ``sample``. A method's options are its sampler function's keyword-only parameters
(``METHOD_OPTIONS``, ``option_types``); ``check_method_options`` / ``check_sample_options`` validate them."""

from ._common import (
    CountingScore, Noise, SampleResult, default_eps, denoise, end_time, final_denoise, langevin_alpha, time_grid, transition,
)
from .api import (
    DEFAULT_DENOISE, DEFAULT_STEPS, METHOD_OPTIONS, METHODS, SAMPLERS, VP_ONLY_METHODS, check_method_options,
    check_sample_options, option_types, sample,
)
from .dpm_solver_pp import dynamic_threshold, sample_dpm_solver_adaptive, sample_dpm_solver_pp
from .edm import sample_edm
from .fast import ddim_step, sample_ddim, sample_dpm_solver, sample_heun
from .unipc import sample_unipc
from .ode import (
    ADAPTIVE_ODE_METHODS, FIXED_GRID_STEPS, FIXED_ODE_METHODS, ODE_METHODS, TORCHDIFFEQ_ADAPTIVE, TORCHDIFFEQ_FIXED,
    probability_flow_drift, sample_ode,
)
from .pc import (
    CORRECTORS,
    PREDICTORS,
    PROBABILITY_FLOW_PREDICTORS,
    ancestral_step,
    annealed_langevin_corrector,
    euler_maruyama_step,
    langevin_corrector,
    reverse_diffusion_step,
    sample_langevin,
    sample_pc,
)

__all__ = [
    "sample", "SAMPLERS", "METHODS", "METHOD_OPTIONS", "DEFAULT_STEPS", "DEFAULT_DENOISE", "VP_ONLY_METHODS", "option_types",
    "check_method_options", "check_sample_options", "SampleResult", "CountingScore", "Noise", "time_grid", "transition",
    "denoise", "final_denoise", "default_eps", "end_time", "langevin_alpha", "PREDICTORS", "PROBABILITY_FLOW_PREDICTORS",
    "CORRECTORS", "euler_maruyama_step", "reverse_diffusion_step", "ancestral_step", "langevin_corrector",
    "annealed_langevin_corrector", "sample_pc", "sample_langevin", "sample_ode", "probability_flow_drift", "ADAPTIVE_ODE_METHODS",
    "FIXED_ODE_METHODS", "ODE_METHODS", "TORCHDIFFEQ_ADAPTIVE", "TORCHDIFFEQ_FIXED", "FIXED_GRID_STEPS", "ddim_step", "sample_ddim",
    "sample_dpm_solver", "sample_heun", "sample_dpm_solver_pp", "sample_dpm_solver_adaptive", "sample_unipc", "sample_edm",
    "dynamic_threshold",
]
from .guidance import cfg_score_fn, classifier_guided_score_fn, model_label_score  # noqa: E402
__all__ += ["cfg_score_fn", "classifier_guided_score_fn", "model_label_score"]
from .inpaint import COLORIZATION_MATRIX, INPAINT_METHODS, ODE_STEPS, colorization_matrix, colorize, inpaint  # noqa: E402
__all__ += ["inpaint", "colorize", "colorization_matrix", "COLORIZATION_MATRIX", "INPAINT_METHODS", "ODE_STEPS"]
