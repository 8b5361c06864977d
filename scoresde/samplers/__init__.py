"""Samplers for score-based models: predictor–corrector, annealed Langevin, probability-flow ODE, DDIM,
DPM-Solver and EDM-Heun, all behind one entry point ``sample`` (k-diffusion style: one small function each)."""

from ._common import CountingScore, Noise, SampleResult, default_eps, denoise, langevin_alpha, time_grid, transition
from .api import DEFAULT_STEPS, METHOD_OPTIONS, METHODS, check_method_options, sample
from .fast import ddim_step, sample_ddim, sample_dpm_solver, sample_heun
from .ode import probability_flow_drift, sample_ode
from .pc import (
    CORRECTORS,
    PREDICTORS,
    ancestral_step,
    annealed_langevin_corrector,
    euler_maruyama_step,
    langevin_corrector,
    reverse_diffusion_step,
    sample_langevin,
    sample_pc,
)

__all__ = [
    "sample", "check_method_options", "SampleResult", "METHODS", "METHOD_OPTIONS", "DEFAULT_STEPS", "CountingScore", "Noise", "time_grid",
    "transition", "denoise", "default_eps", "langevin_alpha", "PREDICTORS", "CORRECTORS", "euler_maruyama_step",
    "reverse_diffusion_step", "ancestral_step", "langevin_corrector", "annealed_langevin_corrector", "sample_pc",
    "sample_langevin", "sample_ode", "probability_flow_drift", "ddim_step", "sample_ddim", "sample_dpm_solver", "sample_heun",
]
