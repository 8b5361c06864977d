"""Build specs: how to rebuild an SDE, a score network and a score model from plain values.

A *spec* is a JSON-able dict. Training checkpoints carry the model's spec (``ScoreModel.spec``), so
``load(path)`` rebuilds a trained model without Hydra, without the run's YAML and without loading data::

    {"format": "scoresde-spec-1",
     "sde": {"name": "vp", "kwargs": {"beta_min": 0.1, "beta_max": 20.0, "N": 1000, "schedule": "linear"}},
     "net": {"name": "mlp", "kwargs": {"hidden": 512, "depth": 3, ...}},
     "data_shape": [1, 8, 8],                       # per-sample shape (C, H, W) or (D,)
     "data": {"name": "digits", "centered": True, "levels": 17},   # the scaler (levels None: continuous)
     "parameterization": "eps", "continuous": True, "seed": 0}

The tables ``SDES`` and ``NETWORKS`` name the classes a spec may use; their constructors' keyword
arguments are the spec's ``kwargs`` (and, at the edge, the config fields: ``scoresde.config`` derives
its schemas from these signatures). Arguments a network takes from the data or the SDE
(``DATA_ARGS``: ``dim``, ``in_channels``, ``image_size``, ...) are filled in here, never configured.

A class-conditional model records ``num_classes`` in ``net.kwargs`` (e.g. ``{"name": "convnet", "kwargs": {...,
"num_classes": 10}}``), so ``build_model`` / ``load`` rebuild it; ``CLASS_CONDITIONAL`` names the networks that take it.
"""

from __future__ import annotations

import inspect
import math
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from . import nets
from .model import ScoreModel
from .sde import SDE, VESDE, VPSDE, SubVPSDE

__all__ = ["SDES", "NETWORKS", "CLASS_CONDITIONAL", "DATA_ARGS", "SDE_ARGS", "SPEC_FORMAT", "sde_spec", "build_sde",
           "build_net", "build_model", "model_spec", "default_parameterization", "find_checkpoint", "load", "Flatten"]

SPEC_FORMAT = "scoresde-spec-1"

# config name -> SDE class (the classes' constructor arguments are the config fields)
SDES = {"vp": VPSDE, "subvp": SubVPSDE, "ve": VESDE}

# config name -> network class
NETWORKS = {"mlp": nets.MLPScoreNet, "unet": nets.UNet}
for _name, _cls in (("ncsnpp", "NCSNpp"), ("ddpm", "DDPM"), ("convnet", "ConvScoreNet"), ("dit", "DiT")):
    if hasattr(nets, _cls):
        NETWORKS[_name] = getattr(nets, _cls)

# networks that take ``num_classes`` (class-conditional: ``forward(x, t_in, class_labels=...)``)
CLASS_CONDITIONAL = tuple(n for n, c in NETWORKS.items() if "num_classes" in inspect.signature(c.__init__).parameters)

# network constructor arguments that come from the data, the SDE or the seed, not from a config (NCSN++ / DDPM take
# the data's scaler ``centered`` and, for ``scale_by_sigma``, the VE SDE's noise levels)
DATA_ARGS = ("dim", "in_channels", "num_channels", "image_size", "centered", "seed")
SDE_ARGS = {"sigma_min": "sigma_min", "sigma_max": "sigma_max", "num_scales": "N"}


def _init_args(cls) -> dict:
    """``name -> inspect.Parameter`` of ``cls.__init__`` without ``self`` and ``*args``/``**kwargs``."""
    params = inspect.signature(cls.__init__).parameters
    return {n: p for n, p in params.items() if n != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}


def sde_spec(sde: SDE) -> dict:
    """``{"name", "kwargs"}`` of an SDE built from ``SDES`` (its constructor arguments read back from the object)."""
    for name, cls in SDES.items():
        if type(sde) is cls:
            return {"name": name, "kwargs": {k: getattr(sde, k) for k in _init_args(cls)}}
    raise TypeError(f"sde must be one of {[c.__name__ for c in SDES.values()]}; got {type(sde).__name__}")


def build_sde(name: str, **kwargs) -> SDE:
    """``SDES[name](**kwargs)``; ``ValueError`` names an unknown ``name`` or argument."""
    if name not in SDES:
        raise ValueError(f"sde name must be one of {list(SDES)}; got {name!r}")
    unknown = sorted(set(kwargs) - set(_init_args(SDES[name])))
    if unknown:
        raise ValueError(f"unknown argument(s) {unknown} for sde {name!r}; allowed: {list(_init_args(SDES[name]))}")
    return SDES[name](**kwargs)


class Flatten(nn.Module):
    """Run a vector network ``net((B, D), t_in, class_labels)`` on per-sample shape ``shape`` (e.g. images):
    ``(B, *shape) -> (B, *shape)``; ``class_labels (B,)`` (or ``None``) passes through unchanged and ``num_classes``
    is the wrapped network's."""

    def __init__(self, net: nn.Module, shape):
        super().__init__()
        self.net = net
        self.shape = tuple(int(s) for s in shape)

    @property
    def num_classes(self) -> Optional[int]:
        return getattr(self.net, "num_classes", None)

    def forward(self, x: torch.Tensor, t_in: torch.Tensor, class_labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        flat = x.reshape(x.shape[0], -1)
        out = self.net(flat, t_in) if class_labels is None else self.net(flat, t_in, class_labels=class_labels)
        return out.reshape(x.shape)


def build_net(name: str, data_shape, seed: int = 0, sde: Optional[SDE] = None, centered: bool = True,
              num_classes: Optional[int] = None, **kwargs) -> nn.Module:
    """The network ``NETWORKS[name]`` for per-sample data shape ``data_shape`` (``(D,)`` or ``(C, H, W)``).

    ``kwargs`` are the network's own constructor arguments; the data-dependent ones (``DATA_ARGS``) are
    filled in: ``dim = prod(data_shape)`` for vector networks (images are flattened around them, see
    ``Flatten``), ``in_channels``/``num_channels`` and ``image_size`` for image networks, ``centered`` (the data's
    scaler), ``seed``, and from a VE ``sde`` the noise levels a ``scale_by_sigma`` network needs (``SDE_ARGS``).
    ``num_classes``: ``None`` (unconditional) or the number of classes of a class-conditional network (one of
    ``CLASS_CONDITIONAL``; ``ValueError`` for the others).
    """
    if name not in NETWORKS:
        raise ValueError(f"network name must be one of {list(NETWORKS)}; got {name!r}")
    cls = NETWORKS[name]
    params = _init_args(cls)
    if num_classes is not None and "num_classes" not in params:
        raise ValueError(f"network {name!r} has no class conditioning (num_classes={num_classes!r}); "
                         f"the networks that take num_classes: {list(CLASS_CONDITIONAL)}")
    own = [n for n in params if n not in DATA_ARGS and n not in SDE_ARGS]
    unknown = sorted(set(kwargs) - set(own))
    if unknown:
        raise ValueError(f"unknown argument(s) {unknown} for network {name!r}; allowed: {own}")
    shape = tuple(int(s) for s in data_shape)
    args = dict(kwargs)
    if "num_classes" in params:
        args["num_classes"] = num_classes
    if "seed" in params:
        args["seed"] = seed
    if "centered" in params:
        args["centered"] = bool(centered)
    if isinstance(sde, VESDE):
        args.update({k: getattr(sde, v) for k, v in SDE_ARGS.items() if k in params})
    if "dim" in params:
        net = cls(int(math.prod(shape)), **args)
        return net if len(shape) == 1 else Flatten(net, shape)
    if len(shape) != 3:
        raise ValueError(f"network {name!r} needs image data of shape (C, H, W); got per-sample shape {shape} (use 'mlp')")
    c, h, w = shape
    if h != w:
        raise ValueError(f"network {name!r} needs square images; got {h}x{w}")
    for key in ("in_channels", "num_channels"):
        if key in params:
            args[key] = c
    if "image_size" in params:
        args["image_size"] = h
    return cls(**args)


def default_parameterization(sde: SDE, net_kwargs: Optional[dict] = None) -> str:
    """The usual output of a network for ``sde``: ``"score"`` for a network that divides by σ itself
    (``scale_by_sigma=True``, score_sde's NCSN++), else ``"sigma_scaled"`` for VE (σ times the score), ``"eps"``
    for VP / sub-VP (DDPM; score_sde's ``-net / std``)."""
    if (net_kwargs or {}).get("scale_by_sigma"):
        return "score"
    return "sigma_scaled" if isinstance(sde, VESDE) else "eps"


def model_spec(sde: SDE, net_name: str, net_kwargs: dict, data_shape, parameterization: Optional[str] = None,
               continuous: bool = True, data: Optional[dict] = None, seed: int = 0) -> dict:
    """A model spec (module docstring) from its parts; ``parameterization=None`` -> ``default_parameterization(sde)``."""
    return {
        "format": SPEC_FORMAT,
        "sde": sde_spec(sde),
        "net": {"name": net_name, "kwargs": dict(net_kwargs)},
        "data_shape": [int(s) for s in data_shape],
        "data": dict(data or {}),
        "parameterization": parameterization or default_parameterization(sde, net_kwargs),
        "continuous": bool(continuous),
        "seed": int(seed),
    }


def build_model(spec: dict, device=None, dtype=None) -> ScoreModel:
    """``ScoreModel(build_net(...), build_sde(...), parameterization, continuous)`` from a spec, with ``.spec`` set
    (so training checkpoints carry it). The network's initial weights come from ``spec["seed"]``."""
    if not isinstance(spec, dict) or spec.get("format") != SPEC_FORMAT:
        got = spec.get("format") if isinstance(spec, dict) else type(spec).__name__
        raise ValueError(f"spec must be a dict with format {SPEC_FORMAT!r}; got {got!r}")
    sde = build_sde(spec["sde"]["name"], **spec["sde"]["kwargs"])
    net = build_net(spec["net"]["name"], spec["data_shape"], seed=spec.get("seed", 0), sde=sde,
                    centered=spec.get("data", {}).get("centered", True), **spec["net"]["kwargs"])
    model = ScoreModel(net, sde, parameterization=spec["parameterization"], continuous=spec["continuous"])
    model.spec = spec
    return model.to(device=device, dtype=dtype)


def find_checkpoint(path) -> Path:
    """A checkpoint file: ``path`` itself, or in a run directory the checkpoint the run's evaluation uses.

    ``best.pt`` (the EMA weights selected on validation) when it is the run's current selection, else
    ``checkpoint.pt``: ``best.pt`` records the step that wrote it and the run's hash (``scoresde.train``), and is
    used only if the latest ``checkpoint.pt`` still selects by a metric, names that step as its best and has the
    same run hash; otherwise it is stale (a run continued with evaluation off, a ``best.pt`` of another run) and
    ``checkpoint.pt`` is used, with a note in the log. A run without evaluation has only ``checkpoint.pt``.
    Raises ``FileNotFoundError`` naming what was looked for.
    """
    p = Path(path).expanduser()
    if p.is_file():
        return p
    if p.is_dir():
        ckpt, best = p / "checkpoint.pt", p / "best.pt"
        if best.is_file() and ckpt.is_file():
            return best if _best_is_current(ckpt, best) else ckpt
        for f in (best, ckpt):
            if f.is_file():
                return f
        raise FileNotFoundError(f"{str(p)!r} holds no best.pt or checkpoint.pt (is it a scoresde-train run directory?)")
    raise FileNotFoundError(f"no such checkpoint file or run directory: {str(p)!r}")


def _best_is_current(ckpt: Path, best: Path) -> bool:
    """Whether ``best.pt`` is the current selection of the run whose latest checkpoint is ``ckpt``."""
    import logging

    from .checkpoint import load_checkpoint

    c = load_checkpoint(ckpt, map_location="cpu", mmap=True)
    b = load_checkpoint(best, map_location="cpu", mmap=True)
    selecting = (c.get("options") or {}).get("select_metric") is not None
    same_step = (c.get("selection") or {}).get("best_step") == b.get("step")
    same_run = c.get("run_hash") == b.get("run_hash")
    if selecting and same_step and same_run:
        return True
    why = "the run no longer selects by a metric" if not selecting else (
        "it is not the run's current best" if not same_step else "it belongs to another run")
    logging.getLogger("scoresde").info("best.pt (step %s) is stale: %s; using checkpoint.pt (step %s)",
                                       b.get("step"), why, c.get("step"))
    return False


def _is_export_dir(path) -> bool:
    p = Path(path).expanduser()
    return p.is_dir() and (p / "model.safetensors").is_file() and (p / "config.json").is_file()


def load(path, ema: bool = True, device=None, dtype=None, spec: Optional[dict] = None) -> tuple[ScoreModel, SDE]:
    """Rebuild a trained model from a training checkpoint or an exported directory: ``(model, sde)``, model in eval mode.

    ``path``: a checkpoint file (``checkpoint.pt``, ``best.pt``), a run directory (``find_checkpoint``), or a directory
    written by ``scoresde.export.export_safetensors`` (``model.safetensors`` + ``config.json``, the EMA weights and
    their build spec; read without the training checkpoint, needs the ``safetensors`` package).
    ``ema``: the EMA weights (default; ``best.pt`` holds only these) or the raw trained weights.
    ``spec``: for checkpoints written before checkpoints carried their spec (the edge passes the one it
    translates from the run's ``config.yaml``). Raises ``ValueError`` naming the file when it is not a
    scoresde training checkpoint, has no spec, or does not fit the spec.
    """
    from .checkpoint import check_state_dict, load_checkpoint

    if _is_export_dir(path):
        if not ema:
            raise ValueError(f"{str(path)!r} is an exported model directory: it holds only the EMA weights (ema=True)")
        from .export import load_exported

        model = load_exported(path, device=device, dtype=dtype)
        return model, model.sde
    file = find_checkpoint(path)
    state = load_checkpoint(file, map_location="cpu", required_keys=("ema",))
    spec = state.get("spec") or spec
    if spec is None:
        raise ValueError(f"checkpoint file {str(file)!r} carries no build spec (written by an older scoresde); "
                         "load it through its run directory with scoresde-sample / scoresde-nll, which translate config.yaml")
    model = build_model(spec)
    if ema:
        sd = state["ema"]["module"]
    elif "model" in state:
        sd = state["model"]
    else:
        raise ValueError(f"checkpoint file {str(file)!r} holds only EMA weights (ema=True); raw weights are in checkpoint.pt")
    check_state_dict(model, sd, source=f"checkpoint file {str(file)!r}")
    model.load_state_dict(sd)
    model.eval()
    return model.to(device=device, dtype=dtype), model.sde

