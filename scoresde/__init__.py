"""scoresde: continuous-time score-based generative models (Song et al. 2021) with DDPM as the discrete VP case."""

from .oracle import GaussianMixture
from .sde import SDE, VESDE, VPSDE, ReverseSDE, SubVPSDE
from .likelihood import LikelihoodResult, bits_per_dim, evaluate_bpd, log_likelihood
from .elbo import ddpm_elbo, evaluate_elbo

__all__ = ["SDE", "VPSDE", "SubVPSDE", "VESDE", "ReverseSDE", "GaussianMixture"]
__all__ += ["log_likelihood", "bits_per_dim", "LikelihoodResult", "evaluate_bpd", "ddpm_elbo", "evaluate_elbo"]
from .samplers import SampleResult, sample

__all__ += ["sample", "SampleResult"]
__version__ = "0.1.0"
from .build import load

__all__ += ["load"]
