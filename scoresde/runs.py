"""What the apps do, as plain functions on plain objects: train a run, reload it, sample from it, score it.

``scoresde.config`` turns a Hydra config into the dataclasses here (``RunConfig``, ``DataOptions``,
``scoresde.evaluate.EvalOptions``, ``scoresde.train.TrainOptions``); nothing here knows Hydra, so a
script can call ``run_train(RunConfig(...), outdir)`` directly. Every run directory holds:

* ``config.yaml`` -- the resolved config (written by the app);
* ``spec.json`` -- the model's build spec (``scoresde.build``), also inside every checkpoint;
* ``checkpoint.pt`` / ``best.pt`` / ``metrics.jsonl`` -- training state and log;
* ``metrics.json`` -- every number of the run, machine-readable; ``samples.png`` -- a sample figure.

Run directories written before the build spec existed are read through ``legacy_spec``, which
translates their ``config.yaml`` once (``LEGACY_KEYS``: the old field names and their new ones).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Optional

import torch

from . import build
from .data.datasets import TENSOR_FILE_OPTIONS
from .evaluate import EvalOptions, evaluate_run, print_summary
from .train import TrainOptions, derive_seed

__all__ = ["DataOptions", "RunOptions", "RunConfig", "LoadedRun", "run_train", "run_sample", "run_nll", "load_run", "load_score_sde_run", "load_split",
           "make_prepare", "reference_samples", "write_json", "select_checkpoint", "check_run_dir", "run_definition",
           "recorded_definition", "RunLock", "RunDirError", "remove_orphans", "check_finite_samples", "NonFiniteError", "stream_seed", "legacy_spec", "LEGACY_KEYS",
           "translate_legacy", "legacy_override_error", "CONFIG_NAME", "SPEC_NAME", "METRICS_NAME", "SAMPLES_NAME"]

log = logging.getLogger("scoresde")

CONFIG_NAME = "config.yaml"
SPEC_NAME = "spec.json"
METRICS_NAME = "metrics.json"
SAMPLES_NAME = "samples.png"


# ============================================================================================
# options
# ============================================================================================
@dataclass
class DataOptions:
    """The data of a run: ``load_dataset(name, split, root, download, n)``, the scaler (``centered``: [-1, 1]
    else [0, 1]) and the training-time transforms (uniform dequantisation of discrete data, horizontal flips,
    and the noise-mixture augmentation ``scoresde.data.noise_mixture``: with probability
    ``noise_mixture_prob`` a training sample gets Gaussian noise of std log-uniform in
    ``[noise_mixture_std_min, noise_mixture_std_max]``; 0 = off). ``n_train``/``n_eval``: number of examples
    (toy sets: generated size; image sets: a deterministic subset; ``None`` = the data set's default / all).
    ``name="tensor_file"``: the user's own array file ``path`` (``.npy``/``.npz``/``.pt``) read by
    ``scoresde.data.load_tensor_file`` with the options ``tensor_file`` (its keyword arguments and defaults:
    ``levels`` for discrete data, ``value_range``, ``key``, ``channels_last``, split fractions, ``split_seed``).
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
    path: Optional[str] = None
    tensor_file: Dict[str, Any] = field(default_factory=lambda: _tensor_file_defaults())

    def check(self) -> "DataOptions":
        """``ValueError`` naming the field: ``name``, ``n_train``/``n_eval``, the noise mixture (by ``noise_mixture``'s
        own check, which names ``prob``, ``std_min``, ``std_max``). The file of ``tensor_file`` is checked on loading."""
        from ._validate import check_choice, check_int
        from .data.datasets import DATASET_NAMES
        from .data.transforms import noise_mixture

        check_choice("name", self.name, DATASET_NAMES)
        for key in ("n_train", "n_eval"):
            if getattr(self, key) is not None:
                check_int(key, getattr(self, key))
        noise_mixture(torch.zeros(1, 1), self.noise_mixture_prob, self.noise_mixture_std_min, self.noise_mixture_std_max)
        return self


def _tensor_file_defaults() -> dict:
    """``load_tensor_file``'s own options and defaults (``centered`` is ``DataOptions.centered``)."""
    import inspect

    from .data.tensor_file import load_tensor_file

    params = inspect.signature(load_tensor_file).parameters
    return {k: params[k].default for k in TENSOR_FILE_OPTIONS if k != "centered"}


@dataclass(kw_only=True)
class RunOptions:
    """What every app that trains shares, as plain values: ``net`` (``{"name", "kwargs"}`` of
    ``scoresde.build.NETWORKS``; ``None``: the exact score of ``data=gmm``'s mixture, nothing to train),
    ``parameterization`` (``None`` for the SDE's usual one), ``data``, ``train`` (``train.seed`` is replaced by
    ``seed``), ``loss`` (keyword arguments of ``scoresde.losses.get_loss_fn``), ``eval``, the device / dtype / seed,
    and ``config`` (the resolved app config, recorded in ``metrics.json`` and ``config.yaml``). With
    ``train.eval_every > 0`` the training loss on a fixed validation batch is evaluated as ``"val_loss"`` (set
    ``train.select_metric="val_loss"`` to keep the best EMA weights in ``best.pt``). ``resume``: continue the run
    already in the directory (it must define the same run, ``check_run_dir``); ``resume=False`` starts over, which
    in a directory that holds a run needs ``overwrite=True`` (its run files are deleted first).
    ``allow_nonfinite``: samples with NaN/inf are counted and warned about; without it they make the run fail.
    """

    net: Optional[dict]
    data: DataOptions
    train: TrainOptions
    loss: dict
    eval: EvalOptions
    parameterization: Optional[str] = None
    seed: int = 0
    device: str = "auto"
    dtype: str = "float32"
    progress: bool = True
    config: dict = field(default_factory=dict)
    resume: bool = True
    overwrite: bool = False
    allow_nonfinite: bool = False


@dataclass(kw_only=True)
class RunConfig(RunOptions):
    """Everything ``run_train`` needs: ``RunOptions`` plus ``sde`` (``{"name", "kwargs"}`` of ``scoresde.build.SDES``)
    and ``sampler`` (``{"method": ..., **options of scoresde.sample}``)."""

    sde: dict
    sampler: dict


# ============================================================================================
# small helpers
# ============================================================================================
def _jsonable(v):
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if torch.is_tensor(v):
        return _jsonable(v.tolist())
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if isinstance(v, Path):
        return str(v)
    return v


def write_json(path, obj) -> None:
    """Write ``obj`` as indented JSON (tensors -> lists, non-finite floats -> strings), atomically."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(_jsonable(obj), indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


def stream_seed(seed: int, *stream: int) -> int:
    """The seed of an independent random stream of a run (sampling, likelihood, ...): ``derive_seed(seed, *stream, bits=32)``."""
    return derive_seed(seed, *stream, bits=32)


def _write_config(config: dict, outdir: Path) -> None:
    import yaml

    tmp = outdir / (CONFIG_NAME + ".tmp")
    tmp.write_text(yaml.safe_dump(config, sort_keys=False))
    os.replace(tmp, outdir / CONFIG_NAME)


def _generator(seed: int, device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(int(seed))


def resolve_device(name: str) -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; otherwise ``torch.device(name)`` (``ValueError`` if CUDA is absent)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={name!r} but CUDA is not available; use device=cpu or device=auto")
    return torch.device(name)


DTYPES = {"float32": torch.float32, "float64": torch.float64}


def _setup(c) -> tuple[torch.device, torch.dtype]:
    if c.dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {list(DTYPES)}; got {c.dtype!r}")
    torch.manual_seed(c.seed)
    return resolve_device(c.device), DTYPES[c.dtype]


def _is_rank0() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


# ============================================================================================
# data
# ============================================================================================
def load_split(data: DataOptions, split: str, seed: int = 0):
    """``load_dataset`` for one split: ``n_train`` examples for "train", ``n_eval`` for the others."""
    from .data import load_dataset

    n = data.n_train if split == "train" else data.n_eval
    extra = {}
    if data.name == "tensor_file":
        opts = {k: tuple(v) if isinstance(v, list) else v for k, v in dict(data.tensor_file).items()}
        extra = dict(path=data.path, centered=data.centered, **opts)
    try:
        return load_dataset(data.name, split=split, root=data.root, download=data.download, n=n, seed=seed, **extra)
    except FileNotFoundError as e:  # name the config key too (the apps' users set data.download, not download)
        raise FileNotFoundError(str(e).replace("pass download=True", "pass download=True (config key data.download=true)")) from None


def make_prepare(data: DataOptions, levels: Optional[int], dtype: torch.dtype, conditioned: bool = False) -> Callable:
    """``prepare(batch, generator) -> x0`` on the model's scale: dequantise (discrete data), flip (images) and the
    noise-mixture augmentation (off at ``noise_mixture_prob = 0``, which draws nothing). ``conditioned``: the
    network is conditioned on the augmentation (``aug_cond``), which the loss then applies
    (``losses.conditioned_noise_mixture``), so ``prepare`` leaves it out."""
    from .data.transforms import noise_mixture, random_hflip, uniform_dequantize

    def prepare(batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if levels is not None:
            x = uniform_dequantize(batch, levels, centered=data.centered, generator=generator, dtype=dtype, noise=data.dequantize)
        else:
            x = batch.to(dtype)
        if data.random_flip and x.dim() == 4:
            x = random_hflip(x, generator=generator)
        if conditioned:
            return x
        return noise_mixture(x, data.noise_mixture_prob, data.noise_mixture_std_min, data.noise_mixture_std_max, generator=generator)

    return prepare


def reference_samples(ds, data: DataOptions, seed: int, dtype, device) -> torch.Tensor:
    """The data on the model's scale (discrete data uniformly dequantised with a fixed seed)."""
    g = torch.Generator().manual_seed(int(seed))
    return ds.model_scale(centered=data.centered, dequantize=True, generator=g, dtype=dtype).to(device)


# ============================================================================================
# reloading a run
# ============================================================================================
@dataclass
class LoadedRun:
    """A trained (or oracle) model ready for evaluation, with the data options and seed of its run."""

    sde: Any
    score_fn: Callable
    model: Any  # ScoreModel or None (oracle)
    oracle: Any  # GaussianMixture or None
    shape: tuple
    data: DataOptions
    seed: int
    run_dir: Path
    checkpoint: Optional[Path]
    step: Optional[int]


def _oracle():
    from .data import default_gmm

    return default_gmm(2)


def read_spec(run_dir: Path) -> Optional[dict]:
    """The run's ``spec.json`` (``None`` if it has none)."""
    p = run_dir / SPEC_NAME
    return json.loads(p.read_text()) if p.is_file() else None


def load_run(ckpt: str, device, dtype, use_ema: bool = True) -> LoadedRun:
    """Reload a ``scoresde-train`` run (a run directory or one of its checkpoint files) for evaluation.

    The model comes from the checkpoint's build spec (``scoresde.build.load``); the run's data options from
    the spec's ``data`` entry. Runs written before specs existed are read through ``legacy_spec``.
    Raises ``FileNotFoundError``/``ValueError`` naming the file or directory that does not fit.
    """
    p = Path(ckpt).expanduser()
    run_dir = p if p.is_dir() else p.parent
    if not p.exists():
        raise FileNotFoundError(f"ckpt: no such file or directory: {ckpt!r} (give a scoresde-train run directory or a checkpoint file)")
    spec = read_spec(run_dir) or legacy_spec(run_dir)
    if spec is None:
        raise FileNotFoundError(f"ckpt: {str(run_dir)!r} has no {SPEC_NAME} or {CONFIG_NAME} (is it a scoresde-train run directory?)")
    data = DataOptions(**spec["data"]["options"])
    seed = int(spec.get("seed", 0))
    if spec["net"] is None:  # the oracle: nothing was trained
        gm = _oracle()
        sde = build.build_sde(spec["sde"]["name"], **spec["sde"]["kwargs"])
        return LoadedRun(sde, gm.score_fn(sde), None, gm, (gm.D,), data, seed, run_dir, None, None)
    from .checkpoint import load_checkpoint

    file = select_checkpoint(p) if p.is_dir() else p
    try:
        model, sde = build.load(file, ema=use_ema, spec=spec)
    except RuntimeError as e:  # the weights do not fit the spec's network (another model's checkpoint)
        raise ValueError(f"checkpoint file {str(file)!r} does not fit the model of {str(run_dir / SPEC_NAME)!r}: "
                         f"{str(e).strip().splitlines()[0]}") from None
    model = model.to(device=device, dtype=dtype)
    step = load_checkpoint(file, map_location="cpu", mmap=True).get("step")
    return LoadedRun(sde, model.score_fn, model, None, tuple(spec["data_shape"]), data, seed, run_dir, file, step)


def select_checkpoint(run_dir) -> Path:
    """The checkpoint a run's evaluation uses (``build.find_checkpoint``'s rule, one definition for the apps and
    ``scoresde.load``): ``best.pt`` when it is the run's current selection, else ``checkpoint.pt``."""
    return build.find_checkpoint(Path(run_dir))


def load_score_sde_run(checkpoint, config, device, dtype, use_ema: bool = True) -> LoadedRun:
    """A score_sde_pytorch checkpoint with its config file (``scoresde.interop.score_sde.load``) for evaluation; the
    data options are the config's data set (``data.dataset``, ``data.centered``), the shape its ``data.image_size``
    and ``data.num_channels``."""
    from .interop.score_sde import load, load_config
    from .interop.score_sde_config import _DATASET_NAMES

    cfg = load_config(config)
    model, sde = load(checkpoint, cfg, ema=use_ema, device=device)
    model = model.to(dtype=dtype)
    name = _DATASET_NAMES.get(str(cfg.data.get("dataset", "cifar10")).lower(), str(cfg.data.get("dataset")))
    data = DataOptions(name=name, centered=bool(cfg.data.get("centered", True)))
    shape = (int(cfg.data.num_channels), int(cfg.data.image_size), int(cfg.data.image_size))
    return LoadedRun(sde, model.score_fn, model, None, shape, data, int(cfg.get("seed", 0)), Path(checkpoint).parent,
                     Path(checkpoint), None)


# Old config.yaml field -> new field (value translation, if any). The one place the old names live.
LEGACY_KEYS = {
    "train.n_iters": ("train.n_steps", None),
    "train.ckpt_every": ("train.checkpoint_every", None),
    "train.likelihood_weighting": ("train.weighting", {True: "likelihood", False: "default"}),
    "train.reduce_mean": ("train.reduce", {True: "mean", False: "sum"}),
    "train.grad_clip": ("train.grad_clip", {0: None, 0.0: None}),
}
IMAGE_SHAPES = {"digits": (1, 8, 8), "mnist": (1, 28, 28), "cifar10": (3, 32, 32)}


def legacy_override_error(argv: list) -> Optional[str]:
    """A message if a command-line override uses a field name of an older release (``runs.LEGACY_KEYS``), else None."""
    for a in argv:
        key = a.split("=", 1)[0].lstrip("+~") if "=" in a and not a.startswith("-") else None
        if key in LEGACY_KEYS and LEGACY_KEYS[key][0] != key:
            new, values = LEGACY_KEYS[key]
            hint = f" (values: {', '.join(f'{k}->{v}' for k, v in values.items())})" if values else ""
            return f"{key} was renamed {new}{hint}; the library's own name is the config key"
    return None


def translate_legacy(cfg: dict) -> tuple[dict, list[str]]:
    """Rename the old fields of a config dict (``LEGACY_KEYS``); returns ``(new dict, notes)``, one note per renamed field."""
    cfg = json.loads(json.dumps(cfg))
    notes = []
    for old, (new, values) in LEGACY_KEYS.items():
        g, k = old.split(".")
        node = cfg.get(g)
        if not isinstance(node, dict) or k not in node:
            continue
        v = node.pop(k)
        if values is not None and v in values:
            v = values[v]
        node[new.split(".")[1]] = v
        if old != new:
            notes.append(f"{old} -> {new}")
    return cfg, notes


def legacy_spec(run_dir: Path) -> Optional[dict]:
    """The build spec of a run written before specs existed, from its ``config.yaml`` (``None`` if it has none).

    Old field names are translated once (``translate_legacy``); the model's ``name: unet`` group, the
    ``auto`` parameterisation and the data shape of the image sets are resolved as the old release did.
    """
    import yaml

    p = Path(run_dir) / CONFIG_NAME
    if not p.is_file():
        return None
    cfg, notes = translate_legacy(yaml.safe_load(p.read_text()) or {})
    if "sde" not in cfg or "model" not in cfg or "data" not in cfg:
        raise ValueError(f"{str(p)!r} is not the config of a scoresde-train run (it has no sde/model/data); "
                         "give the training run directory, not a sample or nll output directory")
    if notes:
        log.info("read %s written by an older scoresde: renamed %s", p, ", ".join(notes))
    sde_cfg = dict(cfg["sde"])
    sde = build.build_sde(sde_cfg.pop("name"), **sde_cfg)
    data_fields = {f.name for f in dataclasses.fields(DataOptions)}
    data = DataOptions(**{k: v for k, v in cfg["data"].items() if k in data_fields})
    model_cfg = dict(cfg["model"])
    name = model_cfg.pop("name")
    param = model_cfg.pop("parameterization", "auto")
    seed = int(cfg.get("seed", 0))
    continuous = bool(cfg.get("train", {}).get("continuous", True))
    if name == "oracle":
        spec = build.model_spec(sde, "mlp", {}, (2,), continuous=continuous, seed=seed)
        spec["net"] = None
    else:
        if data.name in IMAGE_SHAPES:
            shape = IMAGE_SHAPES[data.name]
        else:
            shape = tuple(load_split(data, "test", seed=seed).shape)
        if name == "unet":
            model_cfg["ch_mult"] = tuple(model_cfg["ch_mult"])
            model_cfg["attn_resolutions"] = tuple(model_cfg["attn_resolutions"])
        spec = build.model_spec(sde, name, model_cfg, shape, parameterization=None if param == "auto" else param,
                                continuous=continuous, seed=seed)
    spec["data"] = _data_entry(data, None)
    return spec


def _data_entry(data: DataOptions, levels: Optional[int]) -> dict:
    return {"options": dataclasses.asdict(data), "centered": data.centered, "levels": levels}


# ============================================================================================
# the run directory: one writer, one run, nothing written before the checks pass
# ============================================================================================
LOCK_NAME = ".scoresde.lock"
# the files a run writes (``overwrite=True`` deletes exactly these)
RUN_FILES = (CONFIG_NAME, SPEC_NAME, "checkpoint.pt", "best.pt", "metrics.jsonl", METRICS_NAME, SAMPLES_NAME, "samples.pt")
# config keys that do not change what a run trains (an evaluation setting, a log interval, ...)
NON_DEFINING = ("data.n_eval", "data.root", "data.download")


class RunDirError(ValueError):
    """A run directory cannot be used as asked (another run, another writer, not writable); the message says why."""


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _plain(v):
    """Lists for tuples, so values read from YAML/JSON compare equal to the ones built in Python."""
    return json.loads(json.dumps(_jsonable(v)))


def run_definition(c: RunConfig) -> dict:
    """The run-defining settings of ``c`` under their config keys (flat, e.g. ``{"sde.beta_max": 20.0, ...}``):
    seed, dtype, the SDE and its parameters, the network and its parameterisation, the data set and its options
    (not ``NON_DEFINING``), the loss and the trajectory-defining training options (``train_options._RUN_DEFINING``;
    ``n_steps`` too under a decaying learning rate). A resumed run must keep every one of them."""
    from .train_options import _RUN_DEFINING

    train = {k: getattr(c.train, k) for k in _RUN_DEFINING if k != "seed"}
    if c.train.lr_schedule != "constant":
        train["n_steps"] = c.train.n_steps
    model = {"name": "oracle"} if c.net is None else {"name": c.net["name"], **c.net["kwargs"],
                                                       "parameterization": c.parameterization or "auto"}
    d = {"seed": c.seed, "dtype": c.dtype, "sde": {"name": c.sde["name"], **c.sde["kwargs"]}, "model": model,
         "data": dataclasses.asdict(c.data), "train": {**train, **c.loss}}
    flat = _flatten(_plain(d))
    return {k: v for k, v in flat.items() if k not in NON_DEFINING}


def recorded_definition(run_dir: Path) -> Optional[dict]:
    """The flat settings the run in ``run_dir`` was started with: its ``config.yaml`` (old names translated), else
    the SDE, network, data and seed of its ``spec.json``; ``None`` if it has neither."""
    import yaml

    run_dir = Path(run_dir)
    if (run_dir / CONFIG_NAME).is_file():
        cfg, _ = translate_legacy(yaml.safe_load((run_dir / CONFIG_NAME).read_text()) or {})
        return _flatten(_plain(cfg))
    spec = read_spec(run_dir)
    if spec is None:
        return None
    model = {"name": "oracle"} if spec.get("net") is None else {"name": spec["net"]["name"], **spec["net"]["kwargs"]}
    d = {"seed": spec.get("seed", 0), "sde": {"name": spec["sde"]["name"], **spec["sde"]["kwargs"]}, "model": model,
         "data": spec.get("data", {}).get("options", {})}
    return _flatten(_plain(d))


def holds_run(run_dir: Path) -> bool:
    """``run_dir`` holds (part of) a run: a config, spec, checkpoint or metrics file."""
    return any((Path(run_dir) / n).exists() for n in RUN_FILES[:6])


def _checkpoint_step(path: Path) -> int:
    from .checkpoint import load_checkpoint

    return int(load_checkpoint(path, map_location="cpu", required_keys=("step",), mmap=True)["step"])


def check_run_dir(c: RunConfig, run_dir) -> str:
    """What ``run_train(c, run_dir)`` may do in ``run_dir``, decided from its files alone (nothing is written):

    * ``"new"``: it holds no run; ``"overwrite"``: it holds one, ``resume=False`` and ``overwrite=True``;
    * ``"resume"``: it holds this run (same ``run_definition``), not finished;
    * ``"finished"``: it holds this run, trained to ``train.n_steps`` and evaluated (``metrics.json``).

    Raises ``RunDirError`` (one line) naming every differing field when it holds another run, when it holds a run
    and ``resume=False`` without ``overwrite``, or when the run already has more steps than ``train.n_steps``.
    """
    run_dir = Path(run_dir)
    if not holds_run(run_dir):
        return "new"
    if not c.resume:
        if c.overwrite:
            return "overwrite"
        raise RunDirError(f"run directory {str(run_dir)!r} already holds a run and resume=false: give another "
                          "hydra.run.dir, or add overwrite=true to delete that run and start over")
    old = recorded_definition(run_dir)
    if old is not None:
        new = run_definition(c)
        diffs = [f"{k} was {old[k]!r}, now {new[k]!r}" for k in new if k in old and old[k] != new[k]]
        if diffs:
            raise RunDirError(f"run directory {str(run_dir)!r} holds another run: {'; '.join(diffs)} (resume with the same "
                              "values, give another hydra.run.dir, or add resume=false overwrite=true to start over)")
    if c.net is None:
        return "finished" if (run_dir / METRICS_NAME).is_file() else "resume"
    ckpt = run_dir / "checkpoint.pt"
    if not ckpt.is_file():
        return "resume"
    try:
        step = _checkpoint_step(ckpt)
    except ValueError as e:
        raise RunDirError(f"{e}; the run cannot resume from it (add resume=false overwrite=true to start over)") from None
    if step > c.train.n_steps:
        raise RunDirError(f"run directory {str(run_dir)!r} already holds {step} training steps, more than "
                          f"train.n_steps={c.train.n_steps} (give train.n_steps >= {step}, or another hydra.run.dir)")
    return "finished" if step == c.train.n_steps and (run_dir / METRICS_NAME).is_file() else "resume"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """An exclusive lock on a run directory: the file ``LOCK_NAME`` holding the owner's PID and host.

    Created atomically (written aside, then hard-linked into place, which fails if it exists). A lock of a
    process that no longer runs on this host is stale: it is replaced, with a warning. A live one (or one from
    another host) raises ``RunDirError`` naming the owner. Released (deleted) on exit.
    """

    def __init__(self, run_dir):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self.held = False

    def _owner(self) -> dict:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}

    def check(self) -> None:
        """Raise ``RunDirError`` if a live process holds the lock (nothing is written)."""
        import socket

        if self.path.exists():
            owner = self._owner()
            pid, host = owner.get("pid"), owner.get("host")
            if host not in (None, socket.gethostname()) or (isinstance(pid, int) and _pid_alive(pid)):
                raise self._in_use(pid, host)

    def _in_use(self, pid, host) -> RunDirError:
        return RunDirError(f"run directory {str(self.run_dir)!r} is in use by process {pid} on {host} (lock file "
                           f"{str(self.path)!r}); wait for it to finish or give another hydra.run.dir")

    def acquire(self) -> "RunLock":
        import socket

        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            tmp = self.run_dir / f"{LOCK_NAME}.{os.getpid()}.tmp"
            tmp.write_text(json.dumps(me))
        except OSError as e:
            raise RunDirError(f"run directory {str(self.run_dir)!r} is not writable ({e.strerror}); give a writable "
                              "hydra.run.dir") from None
        try:
            for _ in range(3):
                try:
                    os.link(tmp, self.path)
                    self.held = True
                    return self
                except FileExistsError:
                    owner = self._owner()
                    pid, host = owner.get("pid"), owner.get("host")
                    if host not in (None, me["host"]) or (isinstance(pid, int) and _pid_alive(pid)):
                        raise self._in_use(pid, host) from None
                    log.warning("removing the stale lock %s of process %s, which is no longer running", self.path, pid)
                    try:
                        os.unlink(self.path)
                    except FileNotFoundError:
                        pass
            raise RunDirError(f"could not lock run directory {str(self.run_dir)!r} (lock file {str(self.path)!r})")
        finally:
            tmp.unlink(missing_ok=True)

    def release(self) -> None:
        if self.held and self._owner().get("pid") == os.getpid():
            self.path.unlink(missing_ok=True)
        self.held = False

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


def remove_orphans(run_dir) -> list:
    """Delete the temporary files of writes a killed process left behind (``.checkpoint.pt.*.tmp``, ``*.json.tmp``,
    ...; call it holding the ``RunLock``). Returns the paths removed."""
    run_dir = Path(run_dir)
    found = [p for pat in (".*.pt.*.tmp", "*.json.tmp", "*.yaml.tmp", "metrics.tmp", f"{LOCK_NAME}.*.tmp") for p in run_dir.glob(pat)]
    for p in found:
        log.warning("removing %s, left by an interrupted write (%d bytes)", p, p.stat().st_size)
        p.unlink(missing_ok=True)
    return found


def _clear_run(run_dir: Path) -> None:
    for name in RUN_FILES:
        (run_dir / name).unlink(missing_ok=True)
    log.info("overwrite=true: deleted the run in %s", run_dir)


# ============================================================================================
# the runs
# ============================================================================================
def _val_loss_fn(loss_fn, val_x0: torch.Tensor, seed: int, val_y: Optional[torch.Tensor] = None):
    """``eval_fn(ema_model, step) -> {"val_loss": ...}``: the training loss on a fixed validation batch and noise
    (with its labels ``val_y`` for a class-conditional loss)."""

    def eval_fn(ema_model, step):
        g = _generator(seed, val_x0.device)
        with torch.no_grad():
            args = () if val_y is None else (val_y,)
            return {"val_loss": float(loss_fn(ema_model, val_x0, g, *args))}

    return eval_fn


def make_loss_fn(model, loss: dict, data: DataOptions):
    """The training loss of a run: ``get_loss_fn(sde, **loss)``; for a network conditioned on the augmentation
    (``aug_cond``) the non-leaking noise mixture (``conditioned_noise_mixture``); for a class-conditional network
    (``model.num_classes``) label dropout with ``loss["p_uncond"]`` (``class_conditional``), whose loss then takes
    the batch's labels."""
    from .losses import class_conditional, conditioned_noise_mixture, get_loss_fn

    loss = dict(loss)
    p_uncond = loss.pop("p_uncond", None)  # None: class_conditional's default
    loss_fn = get_loss_fn(model.sde, **loss)
    if getattr(model.net, "aug_cond", False):
        loss_fn = conditioned_noise_mixture(loss_fn, data.noise_mixture_prob, data.noise_mixture_std_min,
                                            data.noise_mixture_std_max)
    if model.num_classes is not None:
        kw = {} if p_uncond is None else {"p_uncond": p_uncond}
        loss_fn = class_conditional(loss_fn, model.num_classes, **kw)
    return loss_fn


def _spec_for(c: RunConfig, train_ds) -> dict:
    sde = build.build_sde(c.sde["name"], **c.sde["kwargs"])
    if c.net is None:
        spec = build.model_spec(sde, "mlp", {}, train_ds.shape, continuous=c.loss.get("continuous", True), seed=c.seed)
        spec["net"] = None
    else:
        spec = build.model_spec(sde, c.net["name"], c.net["kwargs"], train_ds.shape, parameterization=c.parameterization,
                                continuous=c.loss.get("continuous", True), seed=c.seed)
    spec["data"] = _data_entry(c.data, train_ds.levels)
    return spec


def train_model(c: RunConfig, outdir: Path, device, dtype, progress: bool = True, callback=None, resume: bool = True):
    """Train the configured model into ``outdir`` (``spec.json``, ``checkpoint.pt``, ``best.pt``, ``metrics.jsonl``);
    ``resume``: continue from ``checkpoint.pt`` if there is one (``scoresde.train.train``).

    Returns ``(TrainResult or None, seconds)``; ``None`` for the oracle (nothing to train).
    """
    from .train import train

    train_ds = load_split(c.data, "train", seed=c.seed)
    spec = _spec_for(c, train_ds)
    if _is_rank0():
        write_json(outdir / SPEC_NAME, spec)
    if spec["net"] is None:
        log.info("model=oracle: the exact score of the data's mixture; nothing to train")
        return None, 0.0
    model = build.build_model(spec, device=device, dtype=dtype)
    loss_fn = make_loss_fn(model, c.loss, c.data)
    aug_cond = bool(getattr(model.net, "aug_cond", False))
    labels = None
    if model.num_classes is not None:
        if train_ds.labels is None:
            raise ValueError(f"model.num_classes={model.num_classes}: data={c.data.name!r} has no labels")
        labels = train_ds.labels
    prepare = make_prepare(c.data, train_ds.levels, dtype, conditioned=aug_cond)
    eval_fn = None
    if c.train.eval_every > 0:
        val_ds = load_split(c.data, "val", seed=c.seed)
        val_x0 = prepare(val_ds.x[: 4 * c.train.batch_size].to(device), _generator(stream_seed(c.seed, 6), device))
        val_y = None if labels is None else val_ds.labels[: 4 * c.train.batch_size].to(device)
        eval_fn = _val_loss_fn(loss_fn, val_x0, stream_seed(c.seed, 7), val_y)
    options = dataclasses.replace(c.train, seed=c.seed)
    n_params = sum(p.numel() for p in model.parameters())
    log.info("training %s (%s parameters) on %s (%d examples), sde=%s, continuous=%s, %d steps, device=%s",
             spec["net"]["name"], f"{n_params:,}", c.data.name, len(train_ds), spec["sde"]["name"], spec["continuous"],
             options.n_steps, device)
    t0 = time.perf_counter()
    kwargs = {"callback": callback} if callback is not None else {}
    result = train(model, loss_fn, train_ds.x, options, outdir, prepare=prepare, eval_fn=eval_fn, resume=resume,
                   progress=progress, labels=labels, **kwargs)
    return result, time.perf_counter() - t0


def run_train(c: RunConfig, outdir, progress: Optional[bool] = None) -> dict:
    """Train, then evaluate (samples with the configured sampler; NLL per split; ELBO if asked).

    Writes checkpoints, ``spec.json``, ``metrics.json`` and the sample figure into ``outdir`` and returns the
    metrics dict. Under torchrun only rank 0 evaluates.

    The directory is a contract (``check_run_dir``): every check runs before anything is written; rank 0 holds
    ``RunLock`` throughout and first removes temporary files an interrupted run left. A finished run asked again
    with the same settings is not touched (its recorded metrics are returned); with other evaluation settings it is
    evaluated again, its recorded training figures kept.
    """
    outdir = Path(outdir)
    progress = c.progress if progress is None else progress
    device, dtype = _setup(c)
    lock = RunLock(outdir) if _is_rank0() else contextlib.nullcontext()
    with lock:
        status = check_run_dir(c, outdir)
        if _is_rank0():
            remove_orphans(outdir)
        if status == "finished":
            return _finished_run(c, outdir, device, dtype, progress)
        if status == "overwrite" and _is_rank0():
            _clear_run(outdir)
        if c.config and _is_rank0():
            _write_config(c.config, outdir)
        result, secs = train_model(c, outdir, device, dtype, progress, resume=status == "resume")
        metrics: dict = {"config": c.config}
        if result is not None:
            metrics["train"] = _train_metrics(result, secs, outdir)
        if not _is_rank0():
            return metrics
        return _evaluate_into(c, outdir, metrics, device, dtype, progress)


def _train_metrics(result, secs: float, outdir: Path) -> dict:
    loss = float(result.loss)
    if not result.history and not math.isfinite(loss):  # resumed at its last step: the loss it logged then
        loss = _last_logged_loss(outdir / "metrics.jsonl")
    return {"steps": int(result.step), "final_loss": loss, "seconds": secs, "best_step": result.best_step,
            "best_val_loss": result.best_value, "stopped_early": bool(result.stopped_early),
            "world_size": int(getattr(result, "world_size", 1))}


def _last_logged_loss(path: Path) -> float:
    loss = float("nan")
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if "loss" in rec:
                loss = float(rec["loss"])
    return loss


def _evaluate_into(c: RunConfig, outdir: Path, metrics: dict, device, dtype, progress) -> dict:
    run = load_run(str(outdir), device, dtype, use_ema=c.eval.use_ema)
    metrics["checkpoint"] = run.checkpoint.name if run.checkpoint else None
    metrics["checkpoint_step"] = run.step
    metrics.update(evaluate_run(run, c.sampler, c.eval, outdir, c.seed, device, dtype, progress))
    check_finite_samples(metrics, c.allow_nonfinite, outdir)
    write_json(outdir / METRICS_NAME, metrics)
    print_summary(metrics)
    log.info("run directory: %s", outdir)
    return metrics


# settings that change neither the run nor what its evaluation reports
_INCIDENTAL = ("progress", "device", "resume", "overwrite", "allow_nonfinite")


def _finished_run(c: RunConfig, outdir: Path, device, dtype, progress) -> dict:
    """A finished run asked again: the recorded metrics if nothing that matters changed (nothing is written), else
    a new evaluation that keeps the recorded training figures."""
    old = json.loads((outdir / METRICS_NAME).read_text())
    same = c.config and _flatten(_plain({k: v for k, v in (old.get("config") or {}).items() if k not in _INCIDENTAL})) \
        == _flatten(_plain({k: v for k, v in c.config.items() if k not in _INCIDENTAL}))
    if same:
        print_summary(old)
        log.info("run directory %s holds this run, finished: nothing to do (its recorded results are above)", outdir)
        return old
    log.info("run directory %s holds this run, finished: evaluating it again with the new settings", outdir)
    if c.config:
        _write_config(c.config, outdir)
    metrics = {"config": c.config, **{k: old[k] for k in ("train",) if k in old}}
    return _evaluate_into(c, outdir, metrics, device, dtype, progress)


def check_finite_samples(metrics: dict, allow: bool, outdir: Optional[Path] = None) -> int:
    """Count the samples with a NaN/inf entry (``samples.pt`` in ``outdir``), record it as
    ``metrics["samples"]["n_nonfinite"]`` and warn; raise ``NonFiniteError`` unless ``allow``. Returns the count."""
    s = metrics.get("samples")
    path = Path(outdir) / "samples.pt" if outdir is not None else None
    if not isinstance(s, dict) or path is None or not path.is_file():
        return 0
    x = torch.load(path, weights_only=True)
    n_bad = int((~torch.isfinite(x.reshape(x.shape[0], -1))).any(dim=1).sum())
    s["n_nonfinite"] = n_bad
    if n_bad:
        msg = f"{n_bad} of {x.shape[0]} samples have NaN/inf entries (saved as they are in {str(path)!r})"
        log.warning(msg)
        if not allow:
            write_json(Path(outdir) / METRICS_NAME, metrics)
            raise NonFiniteError(msg + "; add allow_nonfinite=true to accept them")
    return n_bad


class NonFiniteError(ValueError):
    """Samples or likelihoods came out NaN/inf and the user did not allow it."""


def _evaluate_saved_run(c, outdir, progress: Optional[bool], sampler: Optional[dict], **evaluate_kwargs) -> dict:
    """Reload the run ``c.ckpt``, check ``sampler`` (if any) against its SDE, then ``evaluate_run`` into ``outdir``."""
    from .samplers import check_sample_options

    outdir = Path(outdir)
    progress = c.progress if progress is None else progress
    device, dtype = _setup(c)
    if c.score_sde_ckpt is not None:
        run = load_score_sde_run(c.score_sde_ckpt, c.score_sde_config, device, dtype, use_ema=c.eval.use_ema)
    else:
        run = load_run(c.ckpt, device, dtype, use_ema=c.eval.use_ema)
    if c.data is not None:
        run = dataclasses.replace(run, data=c.data)
    if sampler is not None and c.score_sde_ckpt is not None:
        sampler = _score_sde_sampling_eps(sampler, c.score_sde_config)
    if sampler is not None:
        opts = {k: v for k, v in sampler.items() if k != "method"}
        check_sample_options(run.sde, sampler["method"], **opts)
    outdir.mkdir(parents=True, exist_ok=True)
    log.info("output directory: %s", outdir)  # said first too: sampling and likelihoods can take long
    if c.config:
        _write_config(c.config, outdir)
    metrics = {"config": c.config, "run": str(run.run_dir), "checkpoint": str(run.checkpoint) if run.checkpoint else None}
    metrics.update(evaluate_run(run, sampler, c.eval, outdir, c.seed, device, dtype, progress, **evaluate_kwargs))
    check_finite_samples(metrics, getattr(c, "allow_nonfinite", False), outdir)
    write_json(outdir / METRICS_NAME, metrics)
    print_summary(metrics)
    log.info("output directory: %s", outdir)
    return metrics


def _score_sde_sampling_eps(sampler: dict, config) -> dict:
    """The score_sde config's ``sampling.sampling_eps`` as the sampler's ``eps`` unless ``sampler.eps`` is given
    (score_sde samples down to it; ignoring it silently sampled to another end time)."""
    from .interop.score_sde import load_config

    eps = (load_config(config).get("sampling") or {}).get("sampling_eps")
    if eps is None or sampler.get("eps") is not None:
        return sampler
    log.info("sampler.eps = %g: the score_sde config's sampling.sampling_eps", eps)
    return {**sampler, "eps": float(eps)}


def run_sample(c, outdir, progress: Optional[bool] = None) -> dict:
    """Samples from a trained run (``c.ckpt``) with ``c.sampler``: figure, ``samples.pt``, NFE and quality; conditioned
    and guided by ``c.guidance``, ``c.class_label``, ``c.classifier`` (``evaluate.GuidanceOptions``) where given."""
    from .evaluate import GuidanceOptions

    return _evaluate_saved_run(c, outdir, progress, c.sampler, do_nll=False, guidance=GuidanceOptions.of(c))


def run_nll(c, outdir, progress: Optional[bool] = None) -> dict:
    """Bits/dim of a trained run per split (``c.eval.splits``) with standard errors; DDPM ELBO with ``eval.elbo``."""
    return _evaluate_saved_run(c, outdir, progress, None, do_samples=False, do_nll=True)
