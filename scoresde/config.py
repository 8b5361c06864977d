"""Structured configs, validation, builders from configs, and the score_sde (ml-collections) bridge.

This module and ``scoresde/cli.py`` are the only places that know about Hydra/OmegaConf; the
library itself takes plain Python objects. Three layers:

1. **Schemas** -- dataclasses registered in Hydra's ``ConfigStore`` under ``schema/<group>/<name>``.
   The YAML options in ``scoresde/configs/<group>/`` extend them, so a key that is not in the schema
   (``sde.sigma_max`` under ``sde=vp``) or a value of the wrong type fails at composition, naming
   the full key. Unknown group options fail in Hydra with the list of available options.
2. **Validation** -- ``validate(cfg)`` converts the composed config to dataclass instances and calls
   each one's ``check(prefix)``, which raises :class:`ConfigError` (a ``ValueError``) naming the field
   and the allowed values for anything out of range (a negative learning rate, ``beta_min >= beta_max``,
   an unknown predictor, ...). The entry points call it before any data is loaded. Where the library
   can check a group cheaply (building the SDE or ``train.TrainOptions``; a sampler's options through
   ``samplers.check_method_options``; the likelihood solver's through ``likelihood.check_likelihood_options``),
   ``check`` lets it, and the library's own validation is the rule:
   its ``ValueError`` comes back as a ``ConfigError`` naming the full config key (``_library_check``).
   ``check`` itself only holds what the library cannot know:
   config-only fields and encodings, cross-group combinations, and groups whose object is expensive to
   build or needs the data (the networks, the data set).
3. **Builders** -- ``build_sde``, ``build_model``, ``build_loss``, ``build_train_options``,
   ``sampler_kwargs``, ... turn the validated dataclasses into library objects.

The bridge ``score_sde_overrides(config_dict)`` maps a score_sde-style ``get_config()`` ConfigDict
(the paper's field names) to Hydra overrides; unknown or unsupported fields raise ``ConfigError``
naming them.
"""

from __future__ import annotations

import importlib.util
import math
import os
import re
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any, Callable, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from .data.datasets import DATASET_NAMES
from .likelihood import check_likelihood_options
from .samplers.api import METHOD_OPTIONS, check_method_options
from .samplers.ode import ADAPTIVE_ODE_METHODS, FIXED_ODE_METHODS

__all__ = [
    "ConfigError",
    "VPSDEConfig",
    "SubVPSDEConfig",
    "VESDEConfig",
    "MLPModelConfig",
    "UNetModelConfig",
    "OracleModelConfig",
    "DataConfig",
    "PCSamplerConfig",
    "LangevinSamplerConfig",
    "ODESamplerConfig",
    "DDIMSamplerConfig",
    "DPMSolverSamplerConfig",
    "HeunSamplerConfig",
    "TrainConfig",
    "EvalConfig",
    "CompareConfig",
    "TrainAppConfig",
    "SampleAppConfig",
    "NLLAppConfig",
    "CompareAppConfig",
    "register_configs",
    "validate",
    "validate_sampler",
    "to_plain",
    "resolve_device",
    "resolve_dtype",
    "build_sde",
    "build_net",
    "build_model",
    "build_loss",
    "build_train_options",
    "sampler_kwargs",
    "default_parameterization",
    "load_score_sde_config",
    "score_sde_overrides",
    "expand_score_sde_argv",
]


class ConfigError(ValueError):
    """A configuration value is missing, unknown or out of range; the message names the field."""


# --------------------------------------------------------------------------------------------
# small checkers: each raises ConfigError naming ``prefix.name`` and the allowed values
# --------------------------------------------------------------------------------------------
def _name(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _choice(prefix, name, value, allowed):
    if value not in allowed:
        raise ConfigError(f"{_name(prefix, name)} must be one of {list(allowed)}; got {value!r}")


def _positive(prefix, name, value, allow_zero=False):
    ok = value is not None and math.isfinite(value) and (value >= 0 if allow_zero else value > 0)
    if not ok:
        raise ConfigError(f"{_name(prefix, name)} must be a finite number {'>= 0' if allow_zero else '> 0'}; got {value!r}")


def _int_at_least(prefix, name, value, low):
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"{_name(prefix, name)} must be an integer >= {low}; got {value!r}")


def _in_unit(prefix, name, value, closed_right=False):
    hi_ok = value <= 1 if closed_right else value < 1
    if not (value is not None and math.isfinite(value) and value >= 0 and hi_ok):
        raise ConfigError(f"{_name(prefix, name)} must lie in [0, 1{']' if closed_right else ')'}; got {value!r}")


def _check_method_name(prefix, value, expected):
    if value != expected:
        raise ConfigError(f"{prefix} must be {expected!r} for this schema; got {value!r} (choose another {prefix.split('.')[0]} group option instead)")


def _library_check(prefix: str, build: Callable[[], Any], keys: Dict[str, str]) -> Any:
    """Validate a config group by building the (cheap) library object it describes: ``build()``.

    The library's ``ValueError`` is re-raised as ``ConfigError`` with every library argument name in
    ``keys`` (library name -> config field) replaced by the full config key ``prefix.field``, e.g.
    ``"N must be > beta_max ..."`` -> ``"sde.N must be > sde.beta_max ..."``. Returns the built object.
    """
    try:
        return build()
    except ValueError as e:
        names = "|".join(re.escape(k) for k in sorted(keys, key=len, reverse=True))
        msg = re.sub(rf"(?<![\w.])({names})(?!\w)", lambda m: _name(prefix, keys[m.group(1)]), str(e))
        raise ConfigError(msg) from None


# --------------------------------------------------------------------------------------------
# SDE group: sde=vp | vp_cosine | subvp | ve
# --------------------------------------------------------------------------------------------
@dataclass
class VPSDEConfig:
    """``VPSDE(beta_min, beta_max, N, schedule)``: ``beta(t) = beta_min + t (beta_max - beta_min)`` or cosine."""

    name: str = "vp"
    beta_min: float = 0.1
    beta_max: float = 20.0
    N: int = 1000
    schedule: str = "linear"

    def check(self, p: str = "sde") -> None:
        """``VPSDE.__init__`` validates the values (beta_min < beta_max, N > beta_max, ...)."""
        _check_method_name(_name(p, "name"), self.name, "vp")
        _library_check(p, lambda: build_sde(self), _sde_keys(self))


@dataclass
class SubVPSDEConfig:
    """``SubVPSDE(beta_min, beta_max, N)``."""

    name: str = "subvp"
    beta_min: float = 0.1
    beta_max: float = 20.0
    N: int = 1000

    def check(self, p: str = "sde") -> None:
        """``SubVPSDE.__init__`` validates the values."""
        _check_method_name(_name(p, "name"), self.name, "subvp")
        _library_check(p, lambda: build_sde(self), _sde_keys(self))


@dataclass
class VESDEConfig:
    """``VESDE(sigma_min, sigma_max, N)``: ``sigma(t) = sigma_min (sigma_max / sigma_min)^t``."""

    name: str = "ve"
    sigma_min: float = 0.01
    sigma_max: float = 50.0
    N: int = 1000

    def check(self, p: str = "sde") -> None:
        """``VESDE.__init__`` validates the values."""
        _check_method_name(_name(p, "name"), self.name, "ve")
        _library_check(p, lambda: build_sde(self), _sde_keys(self))


def _sde_keys(c) -> Dict[str, str]:
    """The SDE constructors' argument names are the config's field names (all but ``name``)."""
    return {f.name: f.name for f in fields(c) if f.name != "name"}


# --------------------------------------------------------------------------------------------
# model group: model=mlp | unet_tiny | ddpmpp | oracle
# --------------------------------------------------------------------------------------------
PARAMETERIZATIONS = ("auto", "eps", "score", "sigma_scaled", "x0")
TIME_EMBEDDINGS = ("fourier", "sinusoidal")


def _check_parameterization(p, value):
    _choice(p, "parameterization", value, PARAMETERIZATIONS)


@dataclass
class MLPModelConfig:
    """``MLPScoreNet(dim, hidden, depth, time_embedding, embed_dim, fourier_scale, dropout)``; images are flattened."""

    name: str = "mlp"
    hidden: int = 256
    depth: int = 3
    time_embedding: str = "fourier"
    embed_dim: int = 64
    fourier_scale: float = 16.0
    dropout: float = 0.0
    parameterization: str = "auto"

    def check(self, p: str = "model") -> None:
        _check_method_name(_name(p, "name"), self.name, "mlp")
        _int_at_least(p, "hidden", self.hidden, 1)
        _int_at_least(p, "depth", self.depth, 1)
        _choice(p, "time_embedding", self.time_embedding, TIME_EMBEDDINGS)
        _int_at_least(p, "embed_dim", self.embed_dim, 2)
        _positive(p, "fourier_scale", self.fourier_scale)
        _in_unit(p, "dropout", self.dropout)
        _check_parameterization(p, self.parameterization)


@dataclass
class UNetModelConfig:
    """``UNet(in_channels, image_size, ch, ch_mult, num_res_blocks, attn_resolutions, dropout, ...)`` (DDPM++ style)."""

    name: str = "unet"
    ch: int = 128
    ch_mult: List[int] = field(default_factory=lambda: [1, 2, 2, 2])
    num_res_blocks: int = 2
    attn_resolutions: List[int] = field(default_factory=lambda: [16])
    dropout: float = 0.1
    time_embedding: str = "sinusoidal"
    fourier_scale: float = 16.0
    skip_rescale: bool = True
    resamp_with_conv: bool = True
    num_groups: int = 32
    parameterization: str = "auto"

    def check(self, p: str = "model") -> None:
        _check_method_name(_name(p, "name"), self.name, "unet")
        _int_at_least(p, "ch", self.ch, 1)
        if len(self.ch_mult) < 1:
            raise ConfigError(f"{p}.ch_mult must be a non-empty list of integers >= 1; got {list(self.ch_mult)}")
        for m in self.ch_mult:
            _int_at_least(p, "ch_mult[i]", m, 1)
        _int_at_least(p, "num_res_blocks", self.num_res_blocks, 1)
        for r in self.attn_resolutions:
            _int_at_least(p, "attn_resolutions[i]", r, 1)
        _in_unit(p, "dropout", self.dropout)
        _choice(p, "time_embedding", self.time_embedding, TIME_EMBEDDINGS)
        _positive(p, "fourier_scale", self.fourier_scale)
        _int_at_least(p, "num_groups", self.num_groups, 1)
        _check_parameterization(p, self.parameterization)


@dataclass
class OracleModelConfig:
    """The exact score of the data's Gaussian mixture (``data=gmm`` only); nothing to train."""

    name: str = "oracle"

    def check(self, p: str = "model") -> None:
        _check_method_name(_name(p, "name"), self.name, "oracle")


# --------------------------------------------------------------------------------------------
# data group (one schema): data=gmm | swissroll | moons | eight_gaussians | checkerboard | digits | mnist | cifar10
# --------------------------------------------------------------------------------------------


@dataclass
class DataConfig:
    """``load_dataset(name, split, root, download, n)``; scaler ``centered``; training-time flips, dequantisation and
    the noise-mixture augmentation (``scoresde.data.noise_mixture``: with probability ``noise_mixture_prob`` a training
    sample gets Gaussian noise of std log-uniform in ``[noise_mixture_std_min, noise_mixture_std_max]``; 0 = off).

    ``n_train``/``n_eval``: number of examples (toy sets: generated size; image sets: a deterministic
    subset; ``null`` = the dataset's default / all).
    """

    name: str = "gmm"
    n_train: Optional[int] = None
    n_eval: Optional[int] = None
    root: Optional[str] = None
    download: bool = False
    centered: bool = True
    random_flip: bool = False
    dequantize: bool = True
    noise_mixture_prob: float = 0.0
    noise_mixture_std_min: float = 0.03
    noise_mixture_std_max: float = 0.3

    def check(self, p: str = "data") -> None:
        _choice(p, "name", self.name, DATASET_NAMES)
        if self.n_train is not None:
            _int_at_least(p, "n_train", self.n_train, 1)
        if self.n_eval is not None:
            _int_at_least(p, "n_eval", self.n_eval, 1)
        import torch

        from .data.transforms import noise_mixture

        _library_check(p, lambda: noise_mixture(torch.zeros(1, 1), self.noise_mixture_prob, self.noise_mixture_std_min,
                                                self.noise_mixture_std_max),
                       {"prob": "noise_mixture_prob", "std_min": "noise_mixture_std_min", "std_max": "noise_mixture_std_max"})


# --------------------------------------------------------------------------------------------
# sampler group: sampler=pc | ancestral | langevin | ode | ddim | dpm_solver | heun
# --------------------------------------------------------------------------------------------
def _check_steps(p, steps):
    if steps is not None:
        _int_at_least(p, "steps", steps, 1)


def _check_method_options(p, c) -> None:
    """The method's own options (all fields but ``method``, ``steps``, ``denoise``, ``eps``) are validated by
    ``samplers.check_method_options``, the check ``sample`` runs; errors name ``p.<option>``."""
    opts = {f.name: getattr(c, f.name) for f in fields(c) if f.name in METHOD_OPTIONS[c.method]}
    _library_check(p, lambda: check_method_options(c.method, opts), {k: k for k in opts})


def _check_eps(p, eps):
    if eps is not None and not (math.isfinite(eps) and 0 < eps < 1):
        raise ConfigError(f"{p}.eps must lie in (0, 1) (or be null for the sampler's default); got {eps!r}")


@dataclass
class PCSamplerConfig:
    """Predictor-corrector sampling (``sample(method="pc", ...)``); ``steps=null`` means ``sde.N``.

    ``eps=null``: the sampler's default end time (1e-3 for VP/sub-VP, 1e-5 for VE).
    """

    method: str = "pc"
    steps: Optional[int] = None
    predictor: str = "reverse_diffusion"
    corrector: str = "langevin"
    snr: float = 0.16
    n_steps: int = 1
    probability_flow: bool = False
    denoise: bool = True
    eps: Optional[float] = None

    def check(self, p: str = "sampler") -> None:
        _check_method_name(_name(p, "method"), self.method, "pc")
        _check_steps(p, self.steps)
        _check_method_options(p, self)
        _check_eps(p, self.eps)


@dataclass
class LangevinSamplerConfig:
    """Annealed Langevin dynamics over the noise levels (``sample(method="langevin", ...)``), NCSN's sampler."""

    method: str = "langevin"
    steps: Optional[int] = 100
    snr: float = 0.16
    n_steps: int = 10
    denoise: bool = True
    eps: Optional[float] = None

    def check(self, p: str = "sampler") -> None:
        _check_method_name(_name(p, "method"), self.method, "langevin")
        _check_steps(p, self.steps)
        _check_method_options(p, self)
        _check_eps(p, self.eps)


@dataclass
class ODESamplerConfig:
    """Probability-flow ODE (torchdiffeq, or scipy RK45); ``steps`` only for the fixed-grid methods.

    ``error_norm="per_sample"`` controls every sample's error (the batch is not one averaged state).
    """

    method: str = "ode"
    steps: Optional[int] = None
    ode_method: str = "dopri5"
    rtol: float = 1e-5
    atol: float = 1e-5
    error_norm: str = "per_sample"
    denoise: bool = False
    eps: Optional[float] = None

    def check(self, p: str = "sampler") -> None:
        _check_method_name(_name(p, "method"), self.method, "ode")
        _check_steps(p, self.steps)
        _check_method_options(p, self)
        # config-only: the grid is explicit (the library would default a fixed grid to 100 steps)
        if self.ode_method in FIXED_ODE_METHODS and self.steps is None:
            raise ConfigError(f"{p}.steps must be set (an integer >= 1) for the fixed-grid ode_method={self.ode_method!r}")
        if self.ode_method in ADAPTIVE_ODE_METHODS and self.steps is not None:
            raise ConfigError(f"{p}.steps must be null for the adaptive ode_method={self.ode_method!r} (set {p}.rtol/{p}.atol; "
                              f"or pick a fixed-grid ode_method in {list(FIXED_ODE_METHODS)})")
        _check_eps(p, self.eps)


@dataclass
class DDIMSamplerConfig:
    """DDIM with ``eta`` in [0, 1] (0: deterministic; 1: DDPM-like) for VP and sub-VP."""

    method: str = "ddim"
    steps: Optional[int] = 50
    eta: float = 0.0
    schedule: str = "time_uniform"
    rho: float = 7.0
    denoise: bool = False
    eps: Optional[float] = None

    def check(self, p: str = "sampler") -> None:
        _check_method_name(_name(p, "method"), self.method, "ddim")
        _check_steps(p, self.steps)
        _check_method_options(p, self)
        _check_eps(p, self.eps)


@dataclass
class DPMSolverSamplerConfig:
    """DPM-Solver of ``order`` 1-3, single- or multistep, for VP and sub-VP (lower order in the last steps)."""

    method: str = "dpm_solver"
    steps: Optional[int] = 20
    order: int = 3
    multistep: bool = True
    schedule: str = "logSNR"
    rho: float = 7.0
    lower_order_final: bool = True
    denoise: bool = False
    eps: Optional[float] = None

    def check(self, p: str = "sampler") -> None:
        _check_method_name(_name(p, "method"), self.method, "dpm_solver")
        _check_steps(p, self.steps)
        _check_method_options(p, self)
        _check_eps(p, self.eps)


@dataclass
class HeunSamplerConfig:
    """Heun's 2nd-order method in the EDM sigma-parameterisation (any SDE), Karras steps with ``rho``."""

    method: str = "heun"
    steps: Optional[int] = 18
    schedule: str = "karras"
    rho: float = 7.0
    denoise: bool = False
    eps: Optional[float] = None

    def check(self, p: str = "sampler") -> None:
        _check_method_name(_name(p, "method"), self.method, "heun")
        _check_steps(p, self.steps)
        _check_method_options(p, self)
        _check_eps(p, self.eps)


SAMPLER_SCHEMAS = {
    "pc": PCSamplerConfig,
    "langevin": LangevinSamplerConfig,
    "ode": ODESamplerConfig,
    "ddim": DDIMSamplerConfig,
    "dpm_solver": DPMSolverSamplerConfig,
    "heun": HeunSamplerConfig,
}


# --------------------------------------------------------------------------------------------
# train and eval
# --------------------------------------------------------------------------------------------
@dataclass
class TrainConfig:
    """Optimisation and loss settings (the paper's CIFAR-10 defaults). ``continuous=false`` is discrete DDPM/SMLD."""

    n_iters: int = 10000
    batch_size: int = 128
    lr: float = 2e-4
    beta1: float = 0.9
    beta2: float = 0.999
    adam_eps: float = 1e-8
    weight_decay: float = 0.0
    warmup: int = 5000
    lr_schedule: str = "constant"
    lr_final_ratio: float = 0.0
    grad_clip: float = 1.0
    ema_rate: float = 0.9999
    continuous: bool = True
    likelihood_weighting: bool = False
    importance_sampling: bool = False
    reduce_mean: bool = True
    eps: float = 1e-5
    amp: str = "off"
    log_every: int = 100
    ckpt_every: int = 1000
    eval_every: int = 0
    patience: Optional[int] = None

    def check(self, p: str = "train") -> None:
        """The optimisation fields are validated by ``train.TrainOptions`` (built by ``build_train_options``);
        here only what it cannot know: the config's own encodings and stricter ranges (``grad_clip=0`` is
        "no clipping", ``ckpt_every >= 1``, no ``amp=auto``), ``patience``, and the loss fields (the loss
        needs the SDE)."""
        # config-only: these come first, so their (narrower or different) allowed values are the ones reported
        _positive(p, "grad_clip", self.grad_clip, allow_zero=True)
        _int_at_least(p, "ckpt_every", self.ckpt_every, 1)
        _choice(p, "amp", self.amp, ("off", "bf16", "fp16"))
        # kept while TrainOptions words this rule "must be a number in [0, 1)" (tests pin "must lie in")
        _in_unit(p, "ema_rate", self.ema_rate)
        _library_check(p, lambda: build_train_options(self, seed=0), _TRAIN_OPTION_KEYS)
        if self.importance_sampling and not self.likelihood_weighting:
            raise ConfigError(f"{p}.importance_sampling=true needs {p}.likelihood_weighting=true")
        if not (math.isfinite(self.eps) and 0 < self.eps < 1):
            raise ConfigError(f"{p}.eps must lie in (0, 1); got {self.eps!r}")
        if self.patience is not None:
            _int_at_least(p, "patience", self.patience, 1)


# ``train.TrainOptions`` argument -> ``TrainConfig`` field (``build_train_options``; ``seed`` is the app's)
_TRAIN_OPTION_KEYS = {
    "n_steps": "n_iters",
    "batch_size": "batch_size",
    "lr": "lr",
    "beta1": "beta1",
    "beta2": "beta2",
    "adam_eps": "adam_eps",
    "weight_decay": "weight_decay",
    "warmup": "warmup",
    "lr_schedule": "lr_schedule",
    "lr_final_ratio": "lr_final_ratio",
    "grad_clip": "grad_clip",
    "ema_rate": "ema_rate",
    "amp": "amp",
    "log_every": "log_every",
    "checkpoint_every": "ckpt_every",
    "eval_every": "eval_every",
}


SPLITS = ("train", "val", "test")


@dataclass
class EvalConfig:
    """What a run evaluates: samples (grid + quality metrics + NFE) and likelihoods (ODE NLL, DDPM ELBO).

    ``fd``: for image data, also the Fréchet distance of the samples to the test split on the features
    of a small classifier trained on the same data set (``scoresde.features``; trained once and cached
    in ``feature_cache``, default ``scoresde.features.default_cache_dir()``), with the same distance
    between a training subset and the test split as its floor. ``elbo_terms``: null sums all N terms.
    """

    n_samples: int = 256
    batch_size: int = 256
    quality: bool = True
    nll: bool = True
    splits: List[str] = field(default_factory=lambda: ["test"])
    divergence: str = "hutchinson"
    probes: int = 1
    rtol: float = 1e-5
    atol: float = 1e-5
    eps: float = 1e-5
    elbo: bool = False
    elbo_terms: Optional[int] = None
    use_ema: bool = True
    fd: bool = False
    feature_cache: Optional[str] = None

    def check(self, p: str = "eval") -> None:
        """The PF-ODE solver fields (divergence, probes, rtol, atol, eps) are checked by
        ``likelihood.check_likelihood_options``; the rest here."""
        _int_at_least(p, "n_samples", self.n_samples, 0)
        _int_at_least(p, "batch_size", self.batch_size, 1)
        for s in self.splits:
            _choice(p, "splits[i]", s, SPLITS)
        solver = {"divergence": self.divergence, "probes": self.probes, "rtol": self.rtol, "atol": self.atol, "eps": self.eps}
        _library_check(p, lambda: check_likelihood_options(**solver), {k: k for k in solver})
        if self.elbo_terms is not None:
            _int_at_least(p, "elbo_terms", self.elbo_terms, 1)


VARIANTS = ("ddpm", "vp", "subvp", "ve")


@dataclass
class CompareConfig:
    """The DDPM-vs-SDE comparison: which variants to train and which samplers evaluate each.

    ``samplers``: label -> sampler config (``method`` plus that method's fields), used for every
    variant; ``samplers_ve``: label -> replacement for the VE variant (VE has no DDIM / DPM-Solver);
    a sampler a variant cannot use (ancestral for sub-VP) is reported as n/a. ``sde_overrides``:
    variant -> SDE fields (e.g. ``{ve: {sigma_max: 12.0}}``); ``ema_rate_ve``: the VE EMA rate
    (the paper uses 0.999 for VE, 0.9999 for VP).
    """

    variants: List[str] = field(default_factory=lambda: list(VARIANTS))
    samplers: Dict[str, Any] = field(default_factory=dict)
    samplers_ve: Dict[str, Any] = field(default_factory=dict)
    sde_overrides: Dict[str, Any] = field(default_factory=dict)
    ema_rate_ve: Optional[float] = None
    nll: bool = True
    elbo: bool = True

    def check(self, p: str = "compare") -> None:
        if not self.variants:
            raise ConfigError(f"{p}.variants must name at least one of {list(VARIANTS)}")
        for v in self.variants:
            _choice(p, "variants[i]", v, VARIANTS)
        if not self.samplers:
            raise ConfigError(f"{p}.samplers must define at least one sampler (label -> {{method: ..., ...}})")
        for label, s in list(self.samplers.items()) + list(self.samplers_ve.items()):
            validate_sampler(s, prefix=f"{p}.samplers.{label}")
        for label in self.samplers_ve:
            if label not in self.samplers:
                raise ConfigError(f"{p}.samplers_ve.{label}: no sampler {label!r} in {p}.samplers to replace; labels: {list(self.samplers)}")
        schemas = {"ddpm": VPSDEConfig, "vp": VPSDEConfig, "subvp": SubVPSDEConfig, "ve": VESDEConfig}
        for v, over in self.sde_overrides.items():
            _choice(p, "sde_overrides keys", v, VARIANTS)
            allowed = {f.name for f in fields(schemas[v])} - {"name"}
            unknown = sorted(set(over or {}) - allowed)
            if unknown:
                raise ConfigError(f"{p}.sde_overrides.{v}: unknown field(s) {unknown}; allowed: {sorted(allowed)}")
            schemas[v](**(over or {})).check(f"{p}.sde_overrides.{v}")
        if self.ema_rate_ve is not None:
            _in_unit(p, "ema_rate_ve", self.ema_rate_ve)  # as train.ema_rate


# --------------------------------------------------------------------------------------------
# top-level app schemas
# --------------------------------------------------------------------------------------------
@dataclass
class _Common:
    seed: int = 0
    device: str = "auto"
    dtype: str = "float32"
    progress: bool = True

    def check_common(self) -> None:
        _int_at_least("", "seed", self.seed, 0)
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ConfigError(f"device must be one of ['auto', 'cpu', 'cuda', 'cuda:<index>']; got {self.device!r}")
        _choice("", "dtype", self.dtype, ("float32", "float64"))


@dataclass
class TrainAppConfig(_Common):
    """``scoresde-train``: train one model, then sample and evaluate it."""

    sde: Any = MISSING
    model: Any = MISSING
    data: DataConfig = field(default_factory=DataConfig)
    sampler: Any = MISSING
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    score_sde_config: Optional[str] = None

    def check(self) -> None:
        self.check_common()
        self.sde.check("sde")
        self.model.check("model")
        self.data.check("data")
        self.sampler.check("sampler")
        self.train.check("train")
        self.eval.check("eval")
        _check_combination(self.sde, self.model, self.data, self.train, self.sampler)


@dataclass
class SampleAppConfig(_Common):
    """``scoresde-sample``: draw samples from a trained run (``ckpt`` = checkpoint file or train run dir)."""

    ckpt: str = MISSING
    sampler: Any = MISSING
    eval: EvalConfig = field(default_factory=EvalConfig)

    def check(self) -> None:
        self.check_common()
        self.sampler.check("sampler")
        self.eval.check("eval")


@dataclass
class NLLAppConfig(_Common):
    """``scoresde-nll``: bits/dim of a trained run per split, with standard errors."""

    ckpt: str = MISSING
    eval: EvalConfig = field(default_factory=EvalConfig)

    def check(self) -> None:
        self.check_common()
        self.eval.check("eval")


@dataclass
class CompareAppConfig(_Common):
    """``scoresde-compare``: DDPM vs continuous VP / sub-VP / VE on one dataset (one model and train setting)."""

    model: Any = MISSING
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    compare: CompareConfig = field(default_factory=CompareConfig)

    def check(self) -> None:
        self.check_common()
        self.model.check("model")
        self.data.check("data")
        self.train.check("train")
        self.eval.check("eval")
        self.compare.check("compare")
        if isinstance(self.model, OracleModelConfig):
            raise ConfigError("model must be a trainable network (mlp, unet_tiny, ddpmpp) for scoresde-compare; got 'oracle'")


def _check_combination(sde, model, data, train, sampler) -> None:
    """Cross-group rules that no single schema can check."""
    if isinstance(model, OracleModelConfig) and data.name != "gmm":
        raise ConfigError(f"model=oracle needs data=gmm (the only dataset with an exact score); got data.name={data.name!r}")
    param = getattr(model, "parameterization", "auto")
    if param == "sigma_scaled" and not isinstance(sde, VESDEConfig):
        raise ConfigError(f"model.parameterization='sigma_scaled' needs sde=ve; got sde={sde.name} (use 'eps' or 'auto')")
    if not train.continuous and isinstance(sde, SubVPSDEConfig):
        raise ConfigError("train.continuous=false needs sde=vp (DDPM) or sde=ve (SMLD); sub-VP has no discrete chain")
    method = getattr(sampler, "method", None)
    if method in ("ddim", "dpm_solver") and isinstance(sde, VESDEConfig):
        raise ConfigError(f"sampler={method} supports sde=vp, vp_cosine, subvp only; got sde=ve (use sampler=heun, ode or pc)")
    if getattr(sampler, "predictor", None) == "ancestral" and isinstance(sde, SubVPSDEConfig):
        raise ConfigError("sampler.predictor='ancestral' needs sde=vp or sde=ve (DDPM / SMLD chains); got sde=subvp")


# --------------------------------------------------------------------------------------------
# ConfigStore registration and validation
# --------------------------------------------------------------------------------------------
_REGISTERED = False


def register_configs() -> None:
    """Register every schema in Hydra's ConfigStore (idempotent).

    Group schemas live under ``schema/<group>/<name>``; the YAML options in ``scoresde/configs``
    extend them through their defaults list. App schemas: ``schema_train``, ``schema_sample``,
    ``schema_nll``, ``schema_compare``.
    """
    global _REGISTERED
    if _REGISTERED:
        return
    cs = ConfigStore.instance()
    cs.store(group="schema/sde", name="vp", node=VPSDEConfig)
    cs.store(group="schema/sde", name="subvp", node=SubVPSDEConfig)
    cs.store(group="schema/sde", name="ve", node=VESDEConfig)
    cs.store(group="schema/model", name="mlp", node=MLPModelConfig)
    cs.store(group="schema/model", name="unet", node=UNetModelConfig)
    cs.store(group="schema/model", name="oracle", node=OracleModelConfig)
    for method, schema in SAMPLER_SCHEMAS.items():
        cs.store(group="schema/sampler", name=method, node=schema)
    cs.store(name="schema_train", node=TrainAppConfig)
    cs.store(name="schema_sample", node=SampleAppConfig)
    cs.store(name="schema_nll", node=NLLAppConfig)
    cs.store(name="schema_compare", node=CompareAppConfig)
    _REGISTERED = True


def validate_sampler(node, prefix: str = "sampler"):
    """Type-check and range-check one sampler config (a dict or DictConfig with ``method``); returns the dataclass."""
    if is_dataclass(node):
        node.check(prefix)
        return node
    d = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)
    method = d.get("method")
    if method not in SAMPLER_SCHEMAS:
        raise ConfigError(f"{prefix}.method must be one of {list(SAMPLER_SCHEMAS)}; got {method!r}")
    schema = SAMPLER_SCHEMAS[method]
    unknown = sorted(set(d) - {f.name for f in fields(schema)})
    if unknown:
        raise ConfigError(f"{prefix}: unknown key(s) {unknown} for method={method!r}; allowed: {[f.name for f in fields(schema)]}")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), d)
    except Exception as e:  # omegaconf ValidationError: re-raise naming the field
        raise ConfigError(f"{prefix}: {e}") from None
    obj = OmegaConf.to_object(merged)
    obj.check(prefix)
    return obj


def validate(cfg):
    """Convert a composed app config to its dataclasses and range-check every field.

    ``cfg``: a ``DictConfig`` composed from one of the app schemas (or the dataclass itself).
    Returns the dataclass instance (e.g. ``TrainAppConfig``). Raises ``ConfigError`` naming the field.
    """
    obj = cfg if is_dataclass(cfg) else OmegaConf.to_object(cfg)
    if not hasattr(obj, "check"):
        raise TypeError(f"validate expects a config composed from an app schema; got {type(obj).__name__}")
    obj.check()
    return obj


def to_plain(obj) -> Any:
    """A dataclass config (or DictConfig) as plain dicts/lists (for JSON and YAML)."""
    if isinstance(obj, DictConfig):
        return OmegaConf.to_container(obj, resolve=True)
    return OmegaConf.to_container(OmegaConf.structured(obj), resolve=True)


# --------------------------------------------------------------------------------------------
# builders: config dataclasses -> library objects
# --------------------------------------------------------------------------------------------
def resolve_device(name: str):
    """``"auto"`` -> CUDA when available, else CPU; otherwise ``torch.device(name)``."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={name!r} but CUDA is not available; use device=cpu or device=auto")
    return torch.device(name)


def resolve_dtype(name: str):
    """``"float32"`` / ``"float64"`` -> the torch dtype."""
    import torch

    _choice("", "dtype", name, ("float32", "float64"))
    return {"float32": torch.float32, "float64": torch.float64}[name]


def build_sde(c):
    """``VPSDEConfig`` / ``SubVPSDEConfig`` / ``VESDEConfig`` -> ``VPSDE`` / ``SubVPSDE`` / ``VESDE``."""
    from .sde import VESDE, VPSDE, SubVPSDE

    if isinstance(c, VPSDEConfig):
        return VPSDE(c.beta_min, c.beta_max, c.N, schedule=c.schedule)
    if isinstance(c, SubVPSDEConfig):
        return SubVPSDE(c.beta_min, c.beta_max, c.N)
    if isinstance(c, VESDEConfig):
        return VESDE(c.sigma_min, c.sigma_max, c.N)
    raise TypeError(f"sde config must be VPSDEConfig, SubVPSDEConfig or VESDEConfig; got {type(c).__name__}")


def default_parameterization(sde_cfg, model_cfg) -> str:
    """``auto`` -> ``eps`` for VP/sub-VP (DDPM), ``sigma_scaled`` for VE (NCSN++); an explicit choice is kept."""
    p = getattr(model_cfg, "parameterization", "auto")
    if p != "auto":
        return p
    return "sigma_scaled" if isinstance(sde_cfg, VESDEConfig) else "eps"


def build_net(model_cfg, data_shape, seed: int = 0):
    """The score network for data of per-sample shape ``data_shape`` (``(D,)`` or ``(C, H, W)``).

    MLP on images: wrapped so that it flattens ``(B, C, H, W) -> (B, D)`` and back. ``seed`` seeds the
    initial weights.
    """
    from . import nets

    shape = tuple(int(s) for s in data_shape)
    if isinstance(model_cfg, MLPModelConfig):
        dim = int(math.prod(shape))
        net = nets.MLPScoreNet(
            dim,
            hidden=model_cfg.hidden,
            depth=model_cfg.depth,
            time_embedding=model_cfg.time_embedding,
            embed_dim=model_cfg.embed_dim,
            fourier_scale=model_cfg.fourier_scale,
            dropout=model_cfg.dropout,
            seed=seed,
        )
        return net if len(shape) == 1 else _Flatten(net, shape)
    if isinstance(model_cfg, UNetModelConfig):
        if len(shape) != 3:
            raise ConfigError(f"model=unet needs image data (C, H, W); got per-sample shape {shape} (use model=mlp)")
        c, h, w = shape
        if h != w:
            raise ConfigError(f"model=unet needs square images; got {h}x{w}")
        return nets.UNet(
            in_channels=c,
            image_size=h,
            ch=model_cfg.ch,
            ch_mult=tuple(model_cfg.ch_mult),
            num_res_blocks=model_cfg.num_res_blocks,
            attn_resolutions=tuple(model_cfg.attn_resolutions),
            dropout=model_cfg.dropout,
            time_embedding=model_cfg.time_embedding,
            fourier_scale=model_cfg.fourier_scale,
            skip_rescale=model_cfg.skip_rescale,
            resamp_with_conv=model_cfg.resamp_with_conv,
            num_groups=model_cfg.num_groups,
            seed=seed,
        )
    raise TypeError(f"model config must be MLPModelConfig or UNetModelConfig to build a network; got {type(model_cfg).__name__}")


def _flatten_class():
    import torch

    class Flatten(torch.nn.Module):
        """Run a vector network ``net((B, D), t)`` on per-sample shape ``shape`` by flattening."""

        def __init__(self, net, shape):
            super().__init__()
            self.net = net
            self.shape = tuple(shape)

        def forward(self, x, t_in):
            return self.net(x.reshape(x.shape[0], -1), t_in).reshape(x.shape)

    return Flatten


def _Flatten(net, shape):
    return _flatten_class()(net, shape)


def build_model(model_cfg, sde_cfg, sde, data_shape, continuous: bool, seed: int = 0):
    """``ScoreModel(net, sde, parameterization, continuous)`` from the model and SDE configs."""
    from .model import ScoreModel

    net = build_net(model_cfg, data_shape, seed=seed)
    return ScoreModel(net, sde, parameterization=default_parameterization(sde_cfg, model_cfg), continuous=continuous)


def build_loss(train_cfg: TrainConfig, sde):
    """``get_loss_fn(sde, continuous, weighting, importance_sampling, reduce, eps)`` from ``train.*``."""
    from .losses import get_loss_fn

    return get_loss_fn(
        sde,
        continuous=train_cfg.continuous,
        weighting="likelihood" if train_cfg.likelihood_weighting else "default",
        importance_sampling=train_cfg.importance_sampling,
        reduce="mean" if train_cfg.reduce_mean else "sum",
        eps=train_cfg.eps,
    )


def build_train_options(train_cfg: TrainConfig, seed: int, **extra):
    """``scoresde.train.TrainOptions`` from ``train.*`` (``n_iters`` -> ``n_steps``, ``ckpt_every`` ->
    ``checkpoint_every``, ``grad_clip=0`` -> no clipping); ``extra`` adds model-selection options."""
    from .train import TrainOptions

    wanted = {opt: getattr(train_cfg, key) for opt, key in _TRAIN_OPTION_KEYS.items()}
    wanted.update(grad_clip=train_cfg.grad_clip if train_cfg.grad_clip > 0 else None, seed=seed)
    wanted.update(extra)
    return TrainOptions(**wanted)


def sampler_kwargs(c) -> dict:
    """Keyword arguments of ``scoresde.sample`` (``method``, ``steps`` and the method's options) from a sampler config."""
    d = {f.name: getattr(c, f.name) for f in fields(c)}
    if d.get("eps") is None:
        d.pop("eps", None)
    return d


# --------------------------------------------------------------------------------------------
# score_sde (ml-collections) bridge
# --------------------------------------------------------------------------------------------
def load_score_sde_config(path: str):
    """Import a score_sde-style Python config file and return its ``get_config()`` ConfigDict."""
    if not os.path.isfile(path):
        raise ConfigError(f"score_sde_config: file not found: {path!r}")
    spec = importlib.util.spec_from_file_location("_score_sde_config", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    if not hasattr(mod, "get_config"):
        raise ConfigError(f"score_sde_config: {path!r} defines no get_config()")
    return mod.get_config()


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict):
            out.update(_flatten(v, key))
        else:
            out[key] = v
    return out


def _fmt(v) -> str:
    """A Python value in Hydra's override grammar."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(_fmt(x) for x in v) + "]"
    s = str(v)
    return "'" + s.replace("\\", "\\\\").replace("'", "\\'") + "'"


_SDE_NAMES = {"vpsde": "vp", "subvpsde": "subvp", "vesde": "ve"}
_MODEL_NAMES = {"ddpm": "ddpmpp", "ncsnpp": "ddpmpp", "ddpm++": "ddpmpp", "unet": "ddpmpp", "mlp": "mlp"}
_DATASET_NAMES = {"cifar10": "cifar10", "mnist": "mnist", "digits": "digits", "gmm": "gmm", "swissroll": "swissroll",
                  "moons": "moons", "eight_gaussians": "eight_gaussians", "checkerboard": "checkerboard"}
_PREDICTORS = {"reverse_diffusion": "reverse_diffusion", "euler_maruyama": "euler_maruyama",
               "ancestral_sampling": "ancestral", "ancestral": "ancestral", "none": "none"}
_CORRECTORS = {"langevin": "langevin", "ald": "annealed_langevin", "annealed_langevin": "annealed_langevin", "none": "none"}
_EMBEDDINGS = {"positional": "sinusoidal", "sinusoidal": "sinusoidal", "fourier": "fourier"}
_IMAGE_SHAPES = {"cifar10": (32, 3), "mnist": (28, 1), "digits": (8, 1)}

# fields copied to one of our keys (value unchanged)
_DIRECT = {
    "training.continuous": "train.continuous",
    "training.reduce_mean": "train.reduce_mean",
    "training.likelihood_weighting": "train.likelihood_weighting",
    "training.importance_sampling": "train.importance_sampling",
    "training.n_iters": "train.n_iters",
    "training.batch_size": "train.batch_size",
    "training.snapshot_freq": "train.ckpt_every",
    "training.log_freq": "train.log_every",
    "training.eval_freq": "train.eval_every",
    "model.num_scales": "sde.N",
    "model.ema_rate": "train.ema_rate",
    "model.dropout": "model.dropout",
    "optim.lr": "train.lr",
    "optim.warmup": "train.warmup",
    "optim.grad_clip": "train.grad_clip",
    "optim.beta1": "train.beta1",
    "optim.eps": "train.adam_eps",
    "optim.weight_decay": "train.weight_decay",
    "sampling.snr": "sampler.snr",
    "sampling.n_steps_each": "sampler.n_steps",
    "sampling.noise_removal": "sampler.denoise",
    "sampling.probability_flow": "sampler.probability_flow",
    "data.centered": "data.centered",
    "data.random_flip": "data.random_flip",
    "data.uniform_dequantization": "data.dequantize",
    "eval.batch_size": "eval.batch_size",
    "eval.enable_bpd": "eval.nll",
    "eval.num_samples": "eval.n_samples",
    "seed": "seed",
}
# UNet architecture fields (only with a U-Net model)
_UNET_DIRECT = {
    "model.nf": "model.ch",
    "model.ch_mult": "model.ch_mult",
    "model.num_res_blocks": "model.num_res_blocks",
    "model.attn_resolutions": "model.attn_resolutions",
    "model.resamp_with_conv": "model.resamp_with_conv",
    "model.skip_rescale": "model.skip_rescale",
    "model.fourier_scale": "model.fourier_scale",
}
# MLP architecture fields (our extension, for toy data)
_MLP_DIRECT = {"model.hidden": "model.hidden", "model.depth": "model.depth", "model.embed_dim": "model.embed_dim",
               "model.fourier_scale": "model.fourier_scale"}
# fields that only do bookkeeping in score_sde (checkpoint cadence for pre-emption, which checkpoints to
# evaluate, ...): accepted and ignored, they do not change the model or the numbers.
_IGNORED = {
    "training.snapshot_freq_for_preemption", "training.snapshot_sampling", "training.eval_freq_for_preemption",
    "eval.begin_ckpt", "eval.end_ckpt", "eval.enable_loss", "eval.enable_sampling", "eval.bpd_dataset",
    "eval.num_samples_per_class", "data.num_workers", "device", "sampling.sampling_eps",
    "model.conditional", "model.nonlinearity", "model.normalization", "model.resblock_type",
    "model.init_scale", "model.conv_size", "model.attention_type", "model.embedding_type",
    "model.scale_by_sigma", "model.beta_min", "model.beta_max", "model.sigma_min", "model.sigma_max",
    "model.progressive", "model.progressive_input", "model.progressive_combine", "model.fir", "model.fir_kernel",
    "model.name", "data.dataset", "data.image_size", "data.num_channels", "training.sde", "sampling.method",
    "sampling.predictor", "sampling.corrector", "optim.optimizer",
}
# fields whose only supported value is the one our implementation has (value checked)
_REQUIRED_VALUES = {
    "model.conditional": (True,),
    "model.nonlinearity": ("swish", "silu"),
    "model.normalization": ("GroupNorm",),
    "model.progressive": ("none",),
    "model.progressive_input": ("none",),
    "model.progressive_combine": ("sum",),
    "model.fir": (False,),
    "model.attention_type": ("ddpm",),
    "model.conv_size": (3,),
    "optim.optimizer": ("Adam",),
    "training.snapshot_sampling": (True, False),
}


def score_sde_overrides(config) -> List[str]:
    """Hydra overrides equivalent to a score_sde-style config (an ``ml_collections.ConfigDict`` or nested dict).

    Maps the paper's field names (``training.sde``, ``model.beta_min``, ``model.nf``, ``optim.lr``,
    ``sampling.predictor``, ``data.dataset``, ...) to this toolkit's groups and keys. Bookkeeping
    fields (checkpoint cadence for pre-emption, which checkpoints to evaluate) are ignored; fields
    whose values we do not implement (``model.fir=True``, ``model.progressive='output_skip'``, an
    optimiser other than Adam, ...) and unknown fields raise ``ConfigError`` naming all of them.
    Returns a list like ``["sde=vp", "model=ddpmpp", "train.lr=0.0002", ...]``.
    """
    d = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    flat = _flatten(d)
    known = set(_DIRECT) | set(_UNET_DIRECT) | set(_MLP_DIRECT) | _IGNORED | set(_REQUIRED_VALUES)
    unknown = sorted(k for k in flat if k not in known)
    bad = []
    for k, allowed in _REQUIRED_VALUES.items():
        if k in flat and flat[k] not in allowed:
            bad.append(f"{k}={flat[k]!r} (supported: {list(allowed)})")
    out: List[str] = []

    def pick(key, table, what):
        if key not in flat:
            return None
        v = str(flat[key])
        m = table.get(v.lower() if key != "sampling.predictor" else v)
        if m is None:
            bad.append(f"{key}={flat[key]!r} ({what}: {sorted(table)})")
        return m

    sde = pick("training.sde", _SDE_NAMES, "supported")
    if sde is not None:
        out.append(f"sde={sde}")
    sde_eff = sde or "vp"
    if sde_eff in ("vp", "subvp"):
        for k in ("model.beta_min", "model.beta_max"):
            if k in flat:
                out.append(f"sde.{k.split('.')[1]}={_fmt(float(flat[k]))}")
    else:
        for k in ("model.sigma_min", "model.sigma_max"):
            if k in flat:
                out.append(f"sde.{k.split('.')[1]}={_fmt(float(flat[k]))}")

    model = pick("model.name", _MODEL_NAMES, "supported")
    if model is not None:
        out.append(f"model={model}")
    arch = _MLP_DIRECT if model == "mlp" else _UNET_DIRECT
    other = _UNET_DIRECT if model == "mlp" else _MLP_DIRECT
    for k, v in flat.items():
        if k in arch:
            out.append(f"{arch[k]}={_fmt(list(v) if isinstance(v, tuple) else v)}")
        elif k in other and k not in arch and k not in _IGNORED:
            bad.append(f"{k} (only for model.name={'mlp' if model != 'mlp' else 'ncsnpp/ddpm'})")
    emb = pick("model.embedding_type", _EMBEDDINGS, "supported")
    if emb is not None:
        out.append(f"model.time_embedding={emb}")
    if "model.scale_by_sigma" in flat:
        if flat["model.scale_by_sigma"]:
            out.append("model.parameterization=sigma_scaled")
        elif model != "mlp":
            out.append("model.parameterization=eps" if sde_eff != "ve" else "model.parameterization=score")

    ds = pick("data.dataset", _DATASET_NAMES, "supported")
    if ds is not None:
        out.append(f"data={ds}")
        if ds in _IMAGE_SHAPES:
            size, chans = _IMAGE_SHAPES[ds]
            if "data.image_size" in flat and int(flat["data.image_size"]) != size:
                bad.append(f"data.image_size={flat['data.image_size']!r} (dataset {ds} has size {size}; resizing is not supported)")
            if "data.num_channels" in flat and int(flat["data.num_channels"]) != chans:
                bad.append(f"data.num_channels={flat['data.num_channels']!r} (dataset {ds} has {chans} channel(s))")

    method = flat.get("sampling.method")
    if method is not None:
        if method not in ("pc", "ode"):
            bad.append(f"sampling.method={method!r} (supported: ['pc', 'ode'])")
        else:
            out.append(f"sampler={method}")
    pred = pick("sampling.predictor", _PREDICTORS, "supported")
    corr = pick("sampling.corrector", _CORRECTORS, "supported")
    if method in (None, "pc"):
        if pred is not None:
            out.append(f"sampler.predictor={pred}")
        if corr is not None:
            out.append(f"sampler.corrector={corr}")
    pc_only = ("sampling.snr", "sampling.n_steps_each", "sampling.noise_removal", "sampling.probability_flow")
    for k, v in flat.items():
        if k in _DIRECT:
            if method == "ode" and k in pc_only:
                continue  # PC settings carried in an ODE config: irrelevant
            out.append(f"{_DIRECT[k]}={_fmt(v)}")

    if unknown or bad:
        parts = []
        if unknown:
            parts.append(f"unknown field(s): {unknown}")
        if bad:
            parts.append(f"unsupported value(s): {bad}")
        raise ConfigError("score_sde config: " + "; ".join(parts))
    return out


def _override_key(arg: str) -> Optional[str]:
    if arg.startswith("-") or "=" not in arg:
        return None
    key = arg.split("=", 1)[0].lstrip("+~")
    return key


def expand_score_sde_argv(argv: List[str]) -> List[str]:
    """Expand ``score_sde_config=PATH`` on a command line into the equivalent overrides.

    ``argv`` excludes the program name. The derived overrides come first, so the user's own
    overrides on the same keys win; a derived group choice the user also gives is dropped.
    The ``score_sde_config=PATH`` override itself is kept (it is recorded in the run's config).
    """
    paths = [a.split("=", 1)[1] for a in argv if _override_key(a) == "score_sde_config"]
    if not paths:
        return list(argv)
    if len(paths) > 1 or "," in paths[0]:
        raise ConfigError("score_sde_config takes a single file (sweeping over score_sde files is not supported)")
    derived = score_sde_overrides(load_score_sde_config(paths[0]))
    user_keys = {_override_key(a) for a in argv}
    derived = [o for o in derived if _override_key(o) not in user_keys]
    return derived + list(argv)


register_configs()
