"""scoresde: continuous-time score-based generative models (Song et al. 2021) with DDPM as the discrete VP case."""

from .oracle import GaussianMixture
from .sde import SDE, VESDE, VPSDE, ReverseSDE, SubVPSDE

__all__ = ["SDE", "VPSDE", "SubVPSDE", "VESDE", "ReverseSDE", "GaussianMixture"]
__version__ = "0.1.0"
