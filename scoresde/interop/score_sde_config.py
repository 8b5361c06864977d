"""The score_sde bridge: a score_sde-style ``get_config()`` file (ml-collections, the paper's field names) as
Hydra overrides of ``scoresde-train`` (``score_sde_config=path.py``).

``score_sde_overrides(config)`` maps the fields to this toolkit's groups and keys; bookkeeping fields are
ignored, fields whose values are not implemented and unknown fields raise ``ValueError`` naming all of them.
No Hydra import: the overrides are plain strings.
"""

from __future__ import annotations

import inspect
from typing import List, Optional

__all__ = ["load_score_sde_config", "score_sde_overrides", "expand_score_sde_argv"]


def load_score_sde_config(path: str):
    """Import a score_sde-style Python config file and return its ``get_config()`` ConfigDict
    (``scoresde.interop.score_sde.load_config``; a missing file is a ``ValueError`` naming it)."""
    from .score_sde import load_config

    try:
        return load_config(path)
    except FileNotFoundError as e:
        raise ValueError(f"score_sde_config: {e}") from None


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
# score_sde model.name -> (our model option, its network in scoresde.build.NETWORKS): the same networks, so every
# architecture field maps 1:1 onto a constructor argument of ours (read from its signature, not listed here)
_MODEL_NAMES = {"ncsnpp": ("ddpmpp", "ncsnpp"), "ddpm": ("ddpm", "ddpm"), "mlp": ("mlp", "mlp")}
_DATASET_NAMES = {"cifar10": "cifar10", "mnist": "mnist", "digits": "digits", "gmm": "gmm", "swissroll": "swissroll",
                  "moons": "moons", "eight_gaussians": "eight_gaussians", "checkerboard": "checkerboard"}
_PREDICTORS = {"reverse_diffusion": "reverse_diffusion", "euler_maruyama": "euler_maruyama",
               "ancestral_sampling": "ancestral", "ancestral": "ancestral", "none": "none"}
_CORRECTORS = {"langevin": "langevin", "ald": "annealed_langevin", "annealed_langevin": "annealed_langevin", "none": "none"}
_IMAGE_SHAPES = {"cifar10": (32, 3), "mnist": (28, 1), "digits": (8, 1)}

# fields copied to one of our keys (value unchanged)
_DIRECT = {
    "training.continuous": "train.continuous",
    
    
    "training.importance_sampling": "train.importance_sampling",
    "training.n_iters": "train.n_steps",
    "training.batch_size": "train.batch_size",
    "training.snapshot_freq": "train.checkpoint_every",
    "training.log_freq": "train.log_every",
    "training.eval_freq": "train.eval_every",
    "model.num_scales": "sde.N",
    "model.ema_rate": "train.ema_rate",
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
    "sampling.sampling_eps": "sampler.eps",
    "eval.batch_size": "eval.batch_size",
    "eval.enable_bpd": "eval.nll",
    "eval.num_samples": "eval.n_samples",
    "seed": "seed",
}
# fields whose value is translated to the library's own encoding: score_sde key -> (our key, {value: ours})
_TRANSLATED = {
    "training.likelihood_weighting": ("train.weighting", {True: "likelihood", False: "default"}),
    "training.reduce_mean": ("train.reduce", {True: "mean", False: "sum"}),
}
# fields that only do bookkeeping in score_sde (checkpoint cadence for pre-emption, which checkpoints to
# evaluate, ...): accepted and ignored, they do not change the model or the numbers.
_IGNORED = {
    "training.snapshot_freq_for_preemption", "training.snapshot_sampling", "training.eval_freq_for_preemption",
    "eval.begin_ckpt", "eval.end_ckpt", "eval.enable_loss", "eval.enable_sampling", "eval.bpd_dataset",
    "eval.num_samples_per_class", "data.num_workers", "device", "model.normalization",
    "model.beta_min", "model.beta_max", "model.sigma_min", "model.sigma_max", "model.name", "data.dataset", "data.image_size", "data.num_channels", "training.sde", "sampling.method",
    "sampling.predictor", "sampling.corrector", "optim.optimizer",
}
# fields whose only supported value is the one our implementation has (value checked)
_REQUIRED_VALUES = {
    "model.normalization": ("GroupNorm",),
    "optim.optimizer": ("Adam",),
    "training.snapshot_sampling": (True, False),
}


def score_sde_overrides(config) -> List[str]:
    """Hydra overrides equivalent to a score_sde-style config (an ``ml_collections.ConfigDict`` or nested dict).

    Maps the paper's field names (``training.sde``, ``model.beta_min``, ``model.nf``, ``optim.lr``,
    ``sampling.predictor``, ``data.dataset``, ...) to this toolkit's groups and keys. Bookkeeping
    fields (checkpoint cadence for pre-emption, which checkpoints to evaluate) are ignored; fields
    whose values we do not implement (``model.fir=True``, ``model.progressive='output_skip'``, an
    optimiser other than Adam, ...) and unknown fields raise ``ValueError`` naming all of them.
    Returns a list like ``["sde=vp", "model=ddpmpp", "train.lr=0.0002", ...]``.
    """
    d = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    flat = _flatten(d)
    from ..build import DATA_ARGS, NETWORKS, SDE_ARGS

    arch_of = {ours: [n for n in inspect.signature(NETWORKS[net].__init__).parameters
                      if n not in ("self", *DATA_ARGS, *SDE_ARGS)] for ours, net in _MODEL_NAMES.values()}
    entry = _MODEL_NAMES.get(str(flat.get("model.name", "")).lower())
    arch = {f"model.{n}" for n in arch_of[entry[0]]} if entry else set()
    every_arch = {f"model.{n}" for names in arch_of.values() for n in names}
    known = set(_DIRECT) | set(_TRANSLATED) | every_arch | _IGNORED | set(_REQUIRED_VALUES)
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

    if entry is None and "model.name" in flat:
        bad.append(f"model.name={flat['model.name']!r} (supported: {sorted(_MODEL_NAMES)})")
    if entry is not None:
        out.append(f"model={entry[0]}")
        for k, v in flat.items():
            if k in arch:
                out.append(f"{k}={_fmt(list(v) if isinstance(v, tuple) else v)}")
            elif k in every_arch:
                bad.append(f"{k} (not an argument of the {flat['model.name']!r} network)")
        if entry[0] != "mlp":  # score_sde: VP / sub-VP score = -net / std (an eps-model); VE: the net's output is the score
            out.append("model.parameterization=" + ("score" if sde_eff == "ve" else "eps"))

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
        elif k in _TRANSLATED:
            key, values = _TRANSLATED[k]
            out.append(f"{key}={_fmt(values[bool(v)])}")

    if unknown or bad:
        parts = []
        if unknown:
            parts.append(f"unknown field(s): {unknown}")
        if bad:
            parts.append(f"unsupported value(s): {bad}")
        raise ValueError("score_sde config: " + "; ".join(parts))
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
        raise ValueError("score_sde_config takes a single file (sweeping over score_sde files is not supported)")
    derived = score_sde_overrides(load_score_sde_config(paths[0]))
    user_keys = {_override_key(a) for a in argv}
    derived = [o for o in derived if _override_key(o) not in user_keys]
    return derived + list(argv)
