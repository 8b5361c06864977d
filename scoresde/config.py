"""The edge: Hydra schemas derived from the library's signatures, validation, and plain objects for the runs.

This module and ``scoresde/cli.py`` are the only places that know Hydra/OmegaConf. The library is the schema:

* ``sde/<option>``: the constructor arguments of ``scoresde.build.SDES[name]`` (``VPSDE``, ``SubVPSDE``, ``VESDE``);
* ``model/<option>``: the constructor arguments of ``scoresde.build.NETWORKS[name]`` minus those taken from the data
  (``build.DATA_ARGS``), plus ``parameterization`` (``auto``: the SDE's usual one, ``build.default_parameterization``);
* ``sampler/<option>``: ``method`` plus the keyword options of that sampler function (``samplers.METHOD_OPTIONS``,
  typed by ``samplers.option_types``);
* ``train``: the fields of ``scoresde.train.TrainOptions`` (``seed`` is the app's top-level one) and the arguments
  of ``scoresde.losses.get_loss_fn`` (``continuous``, ``weighting``, ``importance_sampling``, ``reduce``, ``eps``);
* ``data``, ``eval``, ``compare``: the library dataclasses ``runs.DataOptions``, ``evaluate.EvalOptions``,
  ``compare.CompareOptions`` themselves.

Defaults are the signatures' defaults; the YAML options in ``scoresde/configs`` only set what differs. A key
that is not in the schema, or a value of the wrong type, fails at composition naming the full key.
``validate(cfg)`` then builds the cheap library objects (the SDE, the network on the ``meta`` device, the
``ScoreModel``, the loss, ``TrainOptions``, the sampler's options checked against the SDE) so the library's
own checks are the rules; their ``ValueError`` comes back as ``ConfigError`` naming the full config key.
``to_run(cfg)`` returns the plain objects of ``scoresde.runs`` / ``scoresde.compare``.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import inspect
import re
import typing
from dataclasses import dataclass, field, fields, is_dataclass, make_dataclass
from typing import Any, Callable, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from . import build, samplers
from .compare import CompareConfig, CompareOptions
from .classifier import ClassifierOptions
from .controllable import InpaintOptions
from .distill import DistillOptions
from .export import ExportOptions
from .evaluate import EvalOptions, GuidanceOptions
from .losses import class_conditional, get_loss_fn
from .runs import DataOptions, RunConfig, legacy_override_error
from .train import TrainOptions

__all__ = ["ConfigError", "SDE_SCHEMAS", "MODEL_SCHEMAS", "SAMPLER_SCHEMAS", "TrainSchema", "TrainAppConfig",
           "SampleAppConfig", "NLLAppConfig", "CompareAppConfig", "register_configs", "validate", "to_run",
           "to_plain", "legacy_override_error"]


class ConfigError(ValueError):
    """A configuration value is missing, unknown or out of range; the message names the field."""


# ============================================================================================
# schemas derived from signatures
# ============================================================================================
def _config_type(tp):
    """A signature's annotation as a type OmegaConf accepts: tuples become lists."""
    origin = typing.get_origin(tp)
    if tp in (tuple, list) or origin in (tuple, list, collections.abc.Sequence):
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        return List[args[0] if args else Any]
    if origin is typing.Union:
        args = typing.get_args(tp)
        if type(None) in args:
            inner = [a for a in args if a is not type(None)]
            return Optional[_config_type(inner[0])] if len(inner) == 1 else Any
    return tp


def _default(value):
    if isinstance(value, (tuple, list)):
        return field(default_factory=lambda v=list(value): list(v))
    return value


def _signature_fields(fn: Callable, exclude=()) -> Dict[str, tuple]:
    """``name -> (config type, default)`` of the keyword arguments of ``fn`` (a function or a class)."""
    target = fn.__init__ if inspect.isclass(fn) else fn
    hints = typing.get_type_hints(target)
    out = {}
    for name, p in inspect.signature(target).parameters.items():
        if name in ("self", *exclude) or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if p.default is inspect.Parameter.empty:
            raise TypeError(f"{fn.__name__}.{name} has no default: a configurable argument needs one")
        if name not in hints:
            raise TypeError(f"{fn.__name__}.{name} has no type annotation: a configurable argument needs one")
        out[name] = (_config_type(hints[name]), p.default)
    return out


def _make_schema(cls_name: str, head: Dict[str, tuple], body: Dict[str, tuple]):
    specs = [(n, t, _default(d)) for n, (t, d) in {**head, **body}.items()]
    cls = make_dataclass(cls_name, [(n, t, d if isinstance(d, dataclasses.Field) else field(default=d)) for n, t, d in specs])
    # a module-level name, so pickled configs (Hydra's joblib / submitit launchers) find the same class again
    cls.__module__, cls.__qualname__ = __name__, cls_name
    globals()[cls_name] = cls
    return cls


def _title(name: str) -> str:
    return "".join(p.capitalize() for p in name.split("_"))


SDE_SCHEMAS = {name: _make_schema(f"{_title(name)}SDESchema", {"name": (str, name)}, _signature_fields(cls))
               for name, cls in build.SDES.items()}
PARAMETERIZATIONS = ("auto", "eps", "score", "sigma_scaled", "x0")
_NET_EXCLUDED = (*build.DATA_ARGS, *build.SDE_ARGS)
MODEL_SCHEMAS = {name: _make_schema(f"{_title(name)}ModelSchema", {"name": (str, name)},
                                    {**_signature_fields(cls, _NET_EXCLUDED), "parameterization": (str, "auto")})
                 for name, cls in build.NETWORKS.items()}
MODEL_SCHEMAS["oracle"] = _make_schema("OracleModelSchema", {"name": (str, "oracle")}, {})
SAMPLER_SCHEMAS = {m: _make_schema(f"{_title(m)}SamplerSchema", {"method": (str, m)},
                                   {k: (samplers.option_types(m)[k], d) for k, d in samplers.METHOD_OPTIONS[m].items()})
                   for m in samplers.METHODS}
_TRAIN_APP_FIELDS = ("seed",)  # the app's top-level ``seed``
# the loss: get_loss_fn's keyword arguments, and the label dropout of class-conditional models (class_conditional's)
_LOSS_FIELDS = {**_signature_fields(get_loss_fn, ("sde",)), **_signature_fields(class_conditional, ("loss_fn", "num_classes"))}
TrainSchema = _make_schema("TrainSchema", {}, {
    **{f.name: (typing.get_type_hints(TrainOptions)[f.name], f.default) for f in fields(TrainOptions) if f.name not in _TRAIN_APP_FIELDS},
    **_LOSS_FIELDS})


# ============================================================================================
# app schemas
# ============================================================================================
@dataclass
class _Common:
    seed: int = 0
    device: str = "auto"
    dtype: str = "float32"
    progress: bool = True
    allow_nonfinite: bool = False


@dataclass
class TrainAppConfig(_Common):
    """``scoresde-train``: train one model, then sample and evaluate it. ``resume``: continue the run in the
    directory (it must be the same run); ``resume=false`` starts over, in a directory holding a run only with
    ``overwrite=true``."""

    resume: bool = True
    overwrite: bool = False
    sde: Any = MISSING
    model: Any = MISSING
    data: DataOptions = field(default_factory=DataOptions)
    sampler: Any = MISSING
    train: TrainSchema = field(default_factory=TrainSchema)
    eval: EvalOptions = field(default_factory=EvalOptions)
    score_sde_config: Optional[str] = None


@dataclass
class _Saved(_Common):
    """A saved model: ``ckpt`` (a scoresde-train run directory or checkpoint file) or a score_sde_pytorch
    checkpoint ``score_sde_ckpt`` with its config file ``score_sde_config``; ``data`` (e.g. ``+data=tensor_file``)
    replaces the run's own data for evaluation."""

    ckpt: Optional[str] = None
    score_sde_ckpt: Optional[str] = None
    score_sde_config: Optional[str] = None
    data: Optional[DataOptions] = None
    eval: EvalOptions = field(default_factory=EvalOptions)


@dataclass
class SampleAppConfig(_Saved):
    """``scoresde-sample``: draw samples from a trained run; ``guidance``, ``class_label``, ``classifier``: conditional
    and guided sampling (``scoresde.evaluate.GuidanceOptions``)."""

    sampler: Any = MISSING
    guidance: float = 0.0
    class_label: Optional[int] = None
    classifier: Optional[str] = None


@dataclass
class NLLAppConfig(_Saved):
    """``scoresde-nll``: bits/dim of a trained run per split, with standard errors."""


@dataclass
class CompareAppConfig(_Common):
    """``scoresde-compare``: DDPM vs continuous VP / sub-VP / VE on one data set (one model and train setting)."""

    model: Any = MISSING
    data: DataOptions = field(default_factory=DataOptions)
    train: TrainSchema = field(default_factory=TrainSchema)
    eval: EvalOptions = field(default_factory=EvalOptions)
    compare: CompareOptions = field(default_factory=CompareOptions)


_REGISTERED = False


def register_configs() -> None:
    """Register every schema in Hydra's ConfigStore (idempotent): groups under ``schema/<group>/<name>`` (the YAML
    options extend them through their defaults list); apps as ``schema_train``, ``_sample``, ``_nll``, ``_compare``."""
    global _REGISTERED
    if _REGISTERED:
        return
    cs = ConfigStore.instance()
    for group, table in (("sde", SDE_SCHEMAS), ("model", MODEL_SCHEMAS), ("sampler", SAMPLER_SCHEMAS)):
        for name, schema in table.items():
            cs.store(group=f"schema/{group}", name=name, node=schema)
    for name, schema in (("train", TrainAppConfig), ("sample", SampleAppConfig), ("nll", NLLAppConfig),
                         ("compare", CompareAppConfig), ("export", ExportOptions), ("distill", DistillOptions),
                         ("train_classifier", ClassifierOptions), ("inpaint", InpaintOptions)):
        cs.store(name=f"schema_{name}", node=schema)
    _REGISTERED = True


# ============================================================================================
# validation: the library's checks, errors renamed to the full config key
# ============================================================================================
def _library_check(prefix: str, check: Callable[[], Any], keys) -> Any:
    """Run ``check()`` (which builds or checks a library object); its ``ValueError``/``TypeError`` comes back as
    ``ConfigError`` with every library argument name in ``keys`` replaced by the config key ``prefix.name`` (``keys``
    may also map a library name to another config name under ``prefix``)."""
    try:
        return check()
    except (ValueError, TypeError) as e:
        keys = keys if isinstance(keys, dict) else {k: k for k in keys}
        names = "|".join(re.escape(k) for k in sorted(keys, key=len, reverse=True))
        msg = str(e)
        if names:
            msg = re.sub(rf"(?<![\w.])({names})(?!\w)", lambda m: f"{prefix}.{keys[m.group(1)]}", msg)
        raise ConfigError(msg) from None


def _group_kwargs(node, head: str) -> dict:
    return {f.name: getattr(node, f.name) for f in fields(node) if f.name != head}


def _tuples(kwargs: dict) -> dict:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}


def _check_common(c) -> None:
    if isinstance(c.seed, bool) or not isinstance(c.seed, int) or c.seed < 0:
        raise ConfigError(f"seed must be an integer >= 0; got {c.seed!r}")
    if not (c.device in ("auto", "cpu", "cuda") or c.device.startswith("cuda:")):
        raise ConfigError(f"device must be one of ['auto', 'cpu', 'cuda', 'cuda:<index>']; got {c.device!r}")
    if c.dtype not in ("float32", "float64"):
        raise ConfigError(f"dtype must be one of ['float32', 'float64']; got {c.dtype!r}")


def _check_data(d: DataOptions) -> None:
    keys = {"prob": "noise_mixture_prob", "std_min": "noise_mixture_std_min", "std_max": "noise_mixture_std_max",
            **{f.name: f.name for f in fields(DataOptions)}}
    _library_check("data", d.check, keys)


def _data_shape(d: DataOptions) -> tuple:
    from .runs import IMAGE_SHAPES, load_split

    if d.name in IMAGE_SHAPES:
        return IMAGE_SHAPES[d.name]
    keys = {"path": "path", **{k: f"tensor_file.{k}" for k in d.tensor_file}}
    return _library_check("data", lambda: tuple(load_split(dataclasses.replace(d, n_eval=1), "test").shape), keys)


def _split_train(node) -> tuple[TrainOptions, dict]:
    """``(TrainOptions, get_loss_fn kwargs)`` of the ``train`` node; with ``eval_every > 0`` the app keeps the best
    EMA weights by validation loss unless told otherwise (``select_metric`` null -> ``"val_loss"``, the metric the
    app evaluates)."""
    kw = _group_kwargs(node, "")
    loss = {k: kw.pop(k) for k in _LOSS_FIELDS}
    if kw["eval_every"] > 0 and kw["select_metric"] is None:
        kw["select_metric"] = "val_loss"
    return TrainOptions(**kw), loss


def _check_model(c, sde, data: DataOptions, loss: dict):
    """The network (built on the ``meta`` device: every constructor check, no memory), then the ``ScoreModel``
    (parameterisation vs SDE, discrete vs SDE) and the loss on it. Returns ``(net dict or None, parameterization)``."""
    import torch

    from .model import ScoreModel

    if c.model.name == "oracle":
        if data.name != "gmm":
            raise ConfigError(f"model=oracle needs data=gmm (the only data set with an exact score); got data.name={data.name!r}")
        return None, None
    kwargs = _tuples(_group_kwargs(c.model, "name"))
    param = kwargs.pop("parameterization")
    if param not in PARAMETERIZATIONS:
        raise ConfigError(f"model.parameterization must be one of {list(PARAMETERIZATIONS)}; got {param!r}")
    param = None if param == "auto" else param
    keys = list(kwargs) + ["parameterization", "continuous"]
    shape = _data_shape(data)
    with torch.device("meta"):
        net = _library_check("model", lambda: build.build_net(c.model.name, shape, sde=sde, centered=data.centered, **kwargs), keys)
        model = _library_check("model", lambda: ScoreModel(net, sde, param or build.default_parameterization(sde, kwargs),
                                                           loss.get("continuous", True)), keys)
    if getattr(net, "aug_cond", False) and data.noise_mixture_prob == 0:
        raise ConfigError("model.aug_cond=true conditions the network on the noise-mixture augmentation, which is off: "
                          "set data.noise_mixture_prob > 0 (e.g. 0.2) or model.aug_cond=false")
    loss = dict(loss)
    p_uncond = loss.pop("p_uncond")
    _library_check("train", lambda: get_loss_fn(sde, **loss), list(loss))
    if model.num_classes is not None:
        _library_check("train", lambda: class_conditional(get_loss_fn(sde, **loss), model.num_classes, p_uncond), ["p_uncond"])
        _check_labels(data, model.num_classes)
    del model
    return {"name": c.model.name, "kwargs": kwargs}, param


def _check_labels(data: DataOptions, num_classes: int) -> None:
    """A class-conditional model needs a data set with labels, and classes that fit ``model.num_classes``."""
    from .data.datasets import NUM_CLASSES

    if data.name not in NUM_CLASSES:
        raise ConfigError(f"model.num_classes={num_classes} trains a class-conditional model, which needs labelled data: "
                          f"data.name must be one of {list(NUM_CLASSES)}; got {data.name!r}")
    if num_classes != NUM_CLASSES[data.name]:
        raise ConfigError(f"model.num_classes must equal the number of classes of data={data.name!r}, "
                          f"{NUM_CLASSES[data.name]}; got {num_classes}")


def _sampler_dict(node) -> dict:
    return {"method": node.method, **_group_kwargs(node, "method")}


def check_sampler(sampler: dict, sde, prefix: str = "sampler", dtype: str = "float32") -> dict:
    """A sampler dict checked against ``sde`` by ``samplers.check_sample_options`` and, for the fast solvers, the
    SDE's range in the run's ``dtype`` (``samplers.fast.check_schedule``); errors name ``prefix.<option>``."""
    import torch

    from .samplers.fast import check_schedule

    opts = {k: v for k, v in sampler.items() if k != "method"}
    _library_check(prefix, lambda: samplers.check_sample_options(sde, sampler["method"], **opts), list(opts) + ["method"])
    if sampler["method"] in ("ddim", "dpm_solver", "heun"):
        _library_check(prefix, lambda: check_schedule(sde, sampler["method"], getattr(torch, dtype)), ["method"])
    return sampler


def check_sampler_against_run(c) -> None:
    """``scoresde-sample``: the sampler checked against the SDE of the run ``c.ckpt`` (read from its spec: no
    weights, no data), so a sampler the trained SDE cannot use fails naming ``sampler.<option>`` before any work."""
    from pathlib import Path

    from .runs import legacy_spec, read_spec

    if c.score_sde_ckpt is not None:
        from .interop.score_sde import build_sde, load_config

        check_sampler(_sampler_dict(c.sampler), build_sde(load_config(c.score_sde_config)))
        return
    p = Path(c.ckpt).expanduser()
    if not p.exists():
        return  # reported by the run, naming the path
    run_dir = p if p.is_dir() else p.parent
    spec = read_spec(run_dir) or legacy_spec(run_dir)
    if spec is not None:
        check_sampler(_sampler_dict(c.sampler), build.build_sde(spec["sde"]["name"], **spec["sde"]["kwargs"]))


def _unknown_keys(node, prefix: str = "") -> list:
    """``(full key, close matches)`` of every key of a composed config that its schema lacks (a key added with ``+``,
    which OmegaConf would otherwise drop silently when building the dataclasses)."""
    import difflib

    out = []
    if not isinstance(node, DictConfig):
        return out
    schema = OmegaConf.get_type(node)
    known = {f.name for f in fields(schema)} if is_dataclass(schema) else None
    for key in node.keys():
        if prefix == "" and key == "hydra":
            continue
        full = f"{prefix}{key}"
        if known is not None and key not in known:
            out.append((full, difflib.get_close_matches(str(key), sorted(known), n=1)))
            continue
        child = node._get_node(key)
        if isinstance(child, DictConfig) and not child._is_missing() and not child._is_none():
            out.extend(_unknown_keys(child, full + "."))
    return out


def check_unknown_keys(cfg) -> None:
    """``ConfigError`` naming every key the app's schema does not have (with the closest known key)."""
    bad = _unknown_keys(cfg)
    if bad:
        parts = [f"{k}" + (f" (did you mean {k.rsplit('.', 1)[0] + '.' if '.' in k else ''}{m[0]}?)" if m else "") for k, m in bad]
        raise ConfigError(f"unknown key(s) {', '.join(parts)}: the schema has no such field (a key added with + is not used)")


def validate(cfg):
    """Convert a composed app config to its dataclasses and check every field (before any data is loaded).

    ``cfg``: a ``DictConfig`` composed from one of the app schemas (or the dataclass itself). Returns the
    dataclass instance. Raises ``ConfigError`` naming the field and the allowed values.
    """
    if isinstance(cfg, DictConfig):
        check_unknown_keys(cfg)
    options_class = OmegaConf.get_type(cfg) if isinstance(cfg, DictConfig) else type(cfg)
    if options_class in OPTIONS_APPS:
        return _options_app(cfg, options_class)
    c = cfg if is_dataclass(cfg) else OmegaConf.to_object(cfg)
    _check_common(c)
    if hasattr(c, "eval"):
        _library_check("eval", c.eval.check, [f.name for f in fields(EvalOptions)])
    if getattr(c, "data", None) is not None:
        _check_data(c.data)
    if hasattr(c, "train"):
        _library_check("train", lambda: _split_train(c.train), [f.name for f in fields(c.train)])
    if isinstance(c, TrainAppConfig):
        if c.overwrite and c.resume:
            raise ConfigError("overwrite=true deletes the run in the directory and needs resume=false; got resume=true")
        kw = _group_kwargs(c.sde, "name")
        sde = _library_check("sde", lambda: build.build_sde(c.sde.name, **kw), list(kw))
        _, loss = _split_train(c.train)
        _check_model(c, sde, c.data, loss)
        check_sampler(_sampler_dict(c.sampler), sde, dtype=c.dtype)
    if isinstance(c, _Saved):
        if (c.ckpt is None) == (c.score_sde_ckpt is None):
            raise ConfigError("give exactly one of ckpt=<scoresde-train run dir or checkpoint> or "
                              "score_sde_ckpt=<score_sde checkpoint .pth> (with score_sde_config=<its config .py>)")
        if c.score_sde_ckpt is not None and c.score_sde_config is None:
            raise ConfigError("score_sde_ckpt needs score_sde_config=<the run's score_sde config .py file>")
    if isinstance(c, SampleAppConfig):
        opts = _group_kwargs(c.sampler, "method")
        _library_check("sampler", lambda: samplers.check_method_options(c.sampler.method, opts), list(opts))
        try:
            GuidanceOptions.of(c).check()
        except ValueError as e:
            raise ConfigError(str(e)) from None
    elif isinstance(c, CompareAppConfig):
        if c.model.name == "oracle":
            raise ConfigError("model must be a trainable network for scoresde-compare; got 'oracle'")
        _library_check("compare", c.compare.check, [f.name for f in fields(CompareOptions)])
        _, loss = _split_train(c.train)
        from .compare import VARIANT_SDE

        for v in c.compare.variants:
            sde = build.build_sde(VARIANT_SDE[v], **dict(c.compare.sde_overrides.get(v, {}) or {}))
            _check_model(c, sde, c.data, {**loss, "continuous": v != "ddpm"})
    return c


# apps whose schema is a library options class itself, with top-level keys (``scoresde-export``, ``scoresde-distill``,
# ``scoresde-train-classifier``, ``scoresde-inpaint``)
OPTIONS_APPS = (ExportOptions, DistillOptions, ClassifierOptions, InpaintOptions)


def _options_app(cfg, cls):
    """``cls(**fields)`` checked by the library (its ``__post_init__`` / ``check``); errors name the top-level key."""
    values = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dataclasses.asdict(cfg)
    values = {k: v for k, v in values.items() if k != "hydra"}
    try:
        obj = cls(**values)
        return obj.check() if hasattr(obj, "check") else obj
    except (ValueError, TypeError) as e:
        raise ConfigError(str(e)) from None


def to_plain(obj) -> Any:
    """A dataclass config (or DictConfig) as plain dicts/lists (for JSON and YAML)."""
    if isinstance(obj, DictConfig):
        return OmegaConf.to_container(obj, resolve=True)
    return OmegaConf.to_container(OmegaConf.structured(obj), resolve=True)


def to_run(c):
    """The plain objects of a validated app config: ``runs.RunConfig`` (train), ``compare.CompareConfig``, or the
    app dataclass itself with ``sampler`` as a dict and ``config`` set (sample, nll); the library options of
    ``scoresde-export`` / ``scoresde-distill`` as they are."""
    if isinstance(c, OPTIONS_APPS):
        return c
    common = dict(seed=c.seed, device=c.device, dtype=c.dtype, progress=c.progress, config=to_plain(c),
                  allow_nonfinite=c.allow_nonfinite)
    if isinstance(c, (TrainAppConfig, CompareAppConfig)):
        train, loss = _split_train(c.train)
        net = None if c.model.name == "oracle" else {"name": c.model.name, "kwargs": _tuples(_group_kwargs(c.model, "name"))}
        param = net["kwargs"].pop("parameterization") if net else "auto"
        param = None if param == "auto" else param
        if isinstance(c, CompareAppConfig):
            compare = dataclasses.replace(c.compare, samplers={k: dict(v) for k, v in c.compare.samplers.items()},
                                          samplers_ve={k: dict(v) for k, v in c.compare.samplers_ve.items()},
                                          sde_overrides={k: dict(v or {}) for k, v in c.compare.sde_overrides.items()})
            return CompareConfig(net=net, data=c.data, train=train, loss=loss, eval=c.eval, compare=compare,
                                 parameterization=param, **common)
        sde = {"name": c.sde.name, "kwargs": _group_kwargs(c.sde, "name")}
        return RunConfig(sde=sde, net=net, data=c.data, sampler=_sampler_dict(c.sampler), train=train, loss=loss,
                         eval=c.eval, parameterization=param, resume=c.resume, overwrite=c.overwrite, **common)
    out = dataclasses.replace(c)
    if isinstance(c, SampleAppConfig):
        out.sampler = _sampler_dict(c.sampler)
    out.config = common["config"]
    return out


register_configs()
