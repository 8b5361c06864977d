"""Load score_sde_pytorch checkpoints (Song et al., ICLR 2021) as a ``ScoreModel`` and its ``SDE``.

A reference checkpoint is ``{'model': state_dict of DataParallel(net), 'ema': {'decay', 'num_updates',
'shadow_params'}, 'optimizer': ..., 'step': int}``; the network is rebuilt from the run's config
(``config.model.*``, ``config.data.*``) as ``scoresde.nets.NCSNpp`` or ``scoresde.nets.DDPM`` with the
reference's parameter names, so the state_dict loads with ``strict=True``. With ``ema=True`` (how the
paper evaluates) the EMA ``shadow_params`` replace the trainable parameters; they are listed in the
order of the reference's ``model.parameters()`` restricted to ``requires_grad`` ones, which is the
order of those keys in the checkpoint's state_dict.

The returned model's ``score_fn(x, t)`` is the reference's ``get_score_fn``:

=====================  ===============================  ==========================================
``training``           network time ``labels``          score
=====================  ===============================  ==========================================
VP / sub-VP, cont.     ``999 t``                        ``-net / s(t)``, ``s`` the marginal std
sub-VP, discrete       ``999 t`` (as the reference)     ``-net / s(t)``
VP, discrete (DDPM)    ``t (N - 1)`` (not rounded)      ``-net / sqrt(1 - alpha_bar[floor(t (N - 1))])``
VE, continuous         ``sigma(t)``                     ``net`` (NCSN++'s ``scale_by_sigma``)
VE, discrete (SMLD)    ``round((1 - t) (N - 1))``       ``net``
=====================  ===============================  ==========================================

``scoresde.model.ScoreModel`` with ``continuous=False`` rounds the DDPM step for both the network
input and the std (``i = round(t (N - 1))``) and feeds a VE network ``sigma_i`` rather than the
reversed index, so the discrete cases use ``ScoreSDEModel``, a ``ScoreModel`` subclass with the
reference's discrete conventions; at grid times ``t = i / (N - 1)`` the two agree for VP.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from ..model import ScoreModel
from ..nets.ddpm import DDPM
from ..nets.ncsnpp import NCSNpp, _config_field
from ..sde import SDE, VESDE, SubVPSDE, VPSDE

__all__ = ["load", "load_config", "build_network", "build_sde", "ScoreSDEModel", "SDE_NAMES", "MODEL_NAMES"]

SDE_NAMES = ("vpsde", "subvpsde", "vesde")
MODEL_NAMES = ("ncsnpp", "ddpm")
_CHECKPOINT_KEYS = ("model", "ema", "optimizer", "step")
_SHOW = 5  # keys listed in an error message


# --- config -------------------------------------------------------------------------------------
def load_config(config):
    """A score_sde config as an ``ml_collections.ConfigDict``.

    ``config``: a path to a score_sde config ``.py`` file defining ``get_config()`` (imports such as
    ``from configs.default_cifar10_configs import ...`` resolve against the folder holding the file's
    ``configs`` package), a ``ConfigDict`` (returned as is) or a nested ``dict``.
    Raises ``FileNotFoundError``, ``ValueError`` (no ``get_config``) or ``TypeError``.
    """
    import ml_collections

    if isinstance(config, (str, os.PathLike)):
        return _config_from_file(Path(config))
    if isinstance(config, ml_collections.ConfigDict):
        return config
    if isinstance(config, Mapping):
        return ml_collections.ConfigDict(dict(config))
    raise TypeError(f"config must be a path to a score_sde config .py file, a ConfigDict or a dict; got {type(config).__name__}")


def _config_from_file(path: Path):
    import ml_collections

    if not path.is_file():
        raise FileNotFoundError(f"score_sde config file not found: {path}")
    if path.suffix != ".py":
        raise ValueError(f"a score_sde config is a .py file defining get_config(); got {path}")
    path = path.resolve()
    root = next((p.parent for p in path.parents if p.name == "configs"), path.parent)
    # the file may import its siblings as ``configs.*``: make that package the one next to the file
    saved = {k: sys.modules.pop(k) for k in list(sys.modules) if k == "configs" or k.startswith("configs.")}
    sys.path.insert(0, str(root))
    try:
        spec = importlib.util.spec_from_file_location(f"_score_sde_config_{abs(hash(str(path)))}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        if not callable(getattr(module, "get_config", None)):
            raise ValueError(f"{path} defines no get_config(); a score_sde config file must")
        config = module.get_config()
        if not isinstance(config, (ml_collections.ConfigDict, Mapping)):
            raise TypeError(f"get_config() of {path} returned a {type(config).__name__}; it must return an "
                            "ml_collections.ConfigDict (or a dict)")
        return config if isinstance(config, ml_collections.ConfigDict) else ml_collections.ConfigDict(dict(config))
    finally:
        sys.path.remove(str(root))
        for k in [k for k in sys.modules if k == "configs" or k.startswith("configs.")]:
            del sys.modules[k]
        sys.modules.update(saved)


def _training(config) -> tuple[str, bool]:
    sde = _config_field(config, "training", "sde")
    sde_l = sde.lower() if isinstance(sde, str) else sde
    if sde_l not in SDE_NAMES:
        raise ValueError(f"config.training.sde must be one of {SDE_NAMES}; got {sde!r}")
    continuous = _config_field(config, "training", "continuous")
    if not isinstance(continuous, bool):
        raise ValueError(f"config.training.continuous must be True or False; got {continuous!r}")
    return sde_l, continuous


def build_sde(config) -> SDE:
    """The forward SDE of a score_sde config: ``config.training.sde`` with ``config.model``'s
    ``beta_min``, ``beta_max``, ``num_scales`` (VP, sub-VP) or ``sigma_min``, ``sigma_max``, ``num_scales`` (VE)."""
    config = load_config(config)
    sde, _ = _training(config)
    m = lambda name: _config_field(config, "model", name)  # noqa: E731
    try:
        if sde == "vesde":
            return VESDE(sigma_min=float(m("sigma_min")), sigma_max=float(m("sigma_max")), N=m("num_scales"))
        cls = VPSDE if sde == "vpsde" else SubVPSDE
        return cls(beta_min=float(m("beta_min")), beta_max=float(m("beta_max")), N=m("num_scales"))
    except ValueError as err:
        msg = str(err)
        field = {"N": "num_scales"}.get(msg.split(" ")[0], msg.split(" ")[0])
        raise ValueError(f"config.model.{field}: {msg}") from None


def build_network(config, seed: int = 0) -> nn.Module:
    """``NCSNpp.from_config`` or ``DDPM.from_config`` by ``config.model.name`` (``'ncsnpp'`` or ``'ddpm'``)."""
    config = load_config(config)
    name = _config_field(config, "model", "name")
    name_l = name.lower() if isinstance(name, str) else name
    if name_l not in MODEL_NAMES:
        raise ValueError(f"config.model.name must be one of {MODEL_NAMES} (the networks scoresde rebuilds); got {name!r}")
    return (NCSNpp if name_l == "ncsnpp" else DDPM).from_config(config, seed=seed)


# --- the score model with the reference's discrete conventions ------------------------------------
class ScoreSDEModel(ScoreModel):
    """A ``ScoreModel`` whose discrete-time conventions are score_sde's ``get_score_fn`` (module docstring).

    Continuous models behave exactly as ``ScoreModel``. With ``continuous=False``:
    VP ``net_time(t) = t (N - 1) / T`` (not rounded) and ``coefs`` use ``alpha_bar[floor(t (N - 1) / T)]``;
    VE ``net_time(t) = round((T - t) (N - 1) / T)`` (the reference's index into its descending ``sigmas``).
    ``t`` ``(B,)`` -> ``(B,)``.
    """

    def net_time(self, t: torch.Tensor) -> torch.Tensor:
        if self.continuous:
            return super().net_time(t)
        N, T = self.sde.N, self.sde.T
        if isinstance(self.sde, VESDE):
            return torch.round((T - t) * (N - 1) / T)
        return t * (N - 1) / T

    def coefs(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.continuous or isinstance(self.sde, VESDE):
            return super().coefs(t)
        i = (t * (self.sde.N - 1) / self.sde.T).long()  # the reference truncates (labels.long())
        return self._ddpm_coefs(i, t.dtype)


# --- checkpoint ------------------------------------------------------------------------------------
def _read_checkpoint(checkpoint) -> Mapping:
    if isinstance(checkpoint, (str, os.PathLike)):
        path = Path(checkpoint)
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint file not found: {path}")
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - any failure to unpickle means "not a checkpoint we can read"
            raise ValueError(
                f"{path} is not a score_sde checkpoint: torch.load(weights_only=True) failed "
                f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
            ) from None
        where = str(path)
    else:
        ckpt, where = checkpoint, "checkpoint"
    if not isinstance(ckpt, Mapping):
        raise TypeError(
            f"{where} is not a score_sde checkpoint: expected a dict with keys {_CHECKPOINT_KEYS}; got {type(ckpt).__name__}"
        )
    if "model" not in ckpt:
        keys = list(ckpt)[:_SHOW]
        raise ValueError(
            f"{where} is not a score_sde checkpoint: it has no 'model' entry (expected keys {_CHECKPOINT_KEYS}; "
            f"got {len(ckpt)} keys, e.g. {keys})"
        )
    sd = ckpt["model"]
    if not isinstance(sd, Mapping) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in sd.items()):
        raise TypeError(f"{where}['model'] must be a state_dict (a dict of str -> tensor); got {type(sd).__name__}")
    return ckpt


def _strip_module(sd: Mapping) -> dict:
    """Drop DataParallel / DDP's ``module.`` prefix (where every key has it)."""
    if sd and all(k.startswith("module.") for k in sd):
        return {k[len("module."):]: v for k, v in sd.items()}
    return dict(sd)


def _few(keys) -> str:
    keys = list(keys)
    more = f", ... ({len(keys) - _SHOW} more)" if len(keys) > _SHOW else ""
    return ", ".join(keys[:_SHOW]) + more


def _check_fits(sd: Mapping, net: nn.Module) -> None:
    expected = net.state_dict()
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s) the network needs: {_few(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s) the network does not have: {_few(unexpected)}")
        raise ValueError(
            f"checkpoint does not fit the network built from the config ({type(net).__name__}): " + "; ".join(parts)
            + " (check config.model.name, num_res_blocks, ch_mult, attn_resolutions, progressive*, embedding_type, conditional)"
        )
    bad = [(k, tuple(sd[k].shape), tuple(v.shape)) for k, v in expected.items() if tuple(sd[k].shape) != tuple(v.shape)]
    if bad:
        shown = "; ".join(f"{k}: checkpoint {a} vs network {b}" for k, a, b in bad[:_SHOW])
        more = f"; ... ({len(bad) - _SHOW} more)" if len(bad) > _SHOW else ""
        raise ValueError(
            f"checkpoint does not fit the network built from the config: {len(bad)} shape mismatch(es): {shown}{more} "
            "(check config.model.nf, ch_mult, data.num_channels)"
        )


def _ema_assignment(ckpt: Mapping, sd: Mapping, net: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Pair the EMA ``shadow_params`` with parameter names (checkpoint key order, trainable parameters only)."""
    ema = ckpt.get("ema")
    shadow = ema.get("shadow_params") if isinstance(ema, Mapping) else None
    if not isinstance(shadow, (list, tuple)) or not all(torch.is_tensor(s) for s in shadow):
        raise ValueError(
            "checkpoint has no EMA weights (expected ckpt['ema']['shadow_params'], a list of tensors); "
            "pass ema=False to use the raw weights"
        )
    params = dict(net.named_parameters())
    names = [k for k in sd if k in params and params[k].requires_grad]
    if len(names) != len(shadow):
        raise ValueError(
            f"checkpoint's EMA shadow_params has {len(shadow)} tensors but the network has {len(names)} trainable "
            "parameters; the EMA does not belong to this network"
        )
    bad = [(k, tuple(s.shape), tuple(params[k].shape)) for k, s in zip(names, shadow) if tuple(s.shape) != tuple(params[k].shape)]
    if bad:
        k, a, b = bad[0]
        raise ValueError(
            f"checkpoint's EMA shadow_params do not fit the network: {len(bad)} shape mismatch(es), first {k}: "
            f"shadow {a} vs network {b}"
        )
    return list(zip(names, shadow))


def load(checkpoint, config, ema: bool = True, device=None) -> tuple[ScoreModel, SDE]:
    """Load a score_sde_pytorch checkpoint as ``(ScoreModel, SDE)``.

    Args:
        checkpoint: path to the reference's ``checkpoint_*.pth`` (or the dict it holds).
        config: the run's score_sde config: a path to its ``.py`` file (with ``get_config()``), a
            ``ConfigDict`` or a nested dict. Uses ``model.*``, ``data.image_size``, ``data.num_channels``,
            ``data.centered``, ``training.sde`` and ``training.continuous``.
        ema: use the EMA weights (``ema.shadow_params``; how the paper evaluates) instead of the raw ones.
        device: where to put the network (default CPU).

    Returns ``(model, sde)``: ``model`` (in eval mode) is a ``ScoreModel`` (``ScoreSDEModel`` for discrete
    VP / VE) whose ``score_fn(x, t)`` is the reference's score function (module docstring), ``sde`` the
    matching ``VPSDE`` / ``SubVPSDE`` / ``VESDE``.

    Raises ``ValueError`` / ``TypeError`` naming what does not fit: a config field, a file that is not a
    score_sde checkpoint, missing or unexpected state_dict keys (a few listed, with counts), a shape
    mismatch (both shapes), EMA weights that do not match the network.
    """
    if not isinstance(ema, bool):
        raise TypeError(f"ema must be True or False; got {ema!r}")
    config = load_config(config)
    sde_name, continuous = _training(config)
    sde = build_sde(config)
    with torch.device("meta"):  # shapes only; every tensor comes from the checkpoint
        net = build_network(config)
    ckpt = _read_checkpoint(checkpoint)
    sd = _strip_module(ckpt["model"])
    _check_fits(sd, net)
    pairs = _ema_assignment(ckpt, sd, net) if ema else []

    net = net.to_empty(device=torch.device(device) if device is not None else torch.device("cpu"))
    net.load_state_dict(sd, strict=True)
    if pairs:
        params = dict(net.named_parameters())
        with torch.no_grad():
            for name, s in pairs:
                params[name].copy_(s)
    net.eval()

    if sde_name == "vesde":
        parameterization = "score"  # the network's output is the score (scale_by_sigma inside NCSN++)
    else:
        parameterization = "eps"
    # the reference treats sub-VP as continuous whatever training.continuous says
    cont = continuous or sde_name == "subvpsde"
    cls = ScoreModel if cont else ScoreSDEModel
    model = cls(net, sde, parameterization=parameterization, continuous=cont)
    return model.eval(), sde
