"""Noise-conditional classifiers ``p_t(y | x_t)`` for classifier guidance (Song et al. 2021, §5 and App. I;
Dhariwal & Nichol 2021), for any SDE with ``x_t = m(t) x_0 + s(t) z`` (``sde.marginal_coef``).

Guidance samples ``p_t(x | y)`` with any sampler through its score::

    grad_x log p_t(x | y) = grad_x log p_t(x) + grad_x log p_t(y | x)        (w = 1; w != 1 sharpens / flattens)

``NoiseConditionalClassifier(net, sde).log_prob_fn()`` is the ``log p_t(y | x)`` that
``scoresde.samplers.guidance.classifier_guided_score_fn(score_fn, log_prob_fn, y, w)`` differentiates.

Training (App. I.1) minimises the cross-entropy of the classifier on perturbed data at a uniform time::

    L = E_{t ~ U(eps, T), (x_0, y), z ~ N(0, I)} [ -log p_t(y | m(t) x_0 + s(t) z) ]          (``classifier_loss``)

whose minimiser is the exact posterior ``p_t(y | x_t)`` of the perturbed data at every ``t``.

The classifier sees ``f = net(c_in(t) x_t, t_in(t))``: the network time of the score networks (``ScoreModel.net_time``:
``999 t`` for VP / sub-VP, ``sigma(t)`` for VE) and the input scaled by ``c_in = 1 / sqrt(m(t)^2 + s(t)^2)`` (1 for VP;
for VE it keeps inputs of order one where ``x_t`` reaches ``sigma_max``); gradients with respect to ``x`` flow through
the scaling. Networks: ``scoresde.nets.ConvClassifier`` (images), ``scoresde.nets.MLPClassifier`` (vectors).

A classifier's checkpoint describes itself (``spec``, format ``CLASSIFIER_SPEC_FORMAT``)::

    {"format": "scoresde-classifier-1", "sde": {"name": "vp", "kwargs": {...}}, "net": {"name": "conv", "kwargs": {...}},
     "data_shape": [1, 8, 8], "num_classes": 10, "data": {"name": "digits", "centered": true, "levels": 17}, "seed": 0}

so ``load_classifier(path)`` rebuilds it from the checkpoint alone. ``run_train_classifier(ClassifierOptions(...))`` is
the app: it trains with ``scoresde.train.train(..., labels=...)`` (checkpoint, exact resume, EMA), then writes
``metrics.json`` (test accuracy and cross-entropy at several ``t``, training time).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.nn import functional as F

from ._validate import check_bool, check_choice, check_in_range, check_int, check_positive
from .model import VP_TIME_SCALE
from .data.datasets import NUM_CLASSES
from .nets.classifier import CLASSIFIER_TIME_EMBEDDINGS, ConvClassifier, MLPClassifier
from .sde import SDE, VESDE, as_time, batch_broadcast

__all__ = ["CLASSIFIER_SPEC_FORMAT", "CLASSIFIER_NETS", "NoiseConditionalClassifier", "classifier_net_time",
           "classifier_loss", "classifier_spec", "build_classifier", "classifier_accuracy", "load_classifier",
           "ClassifierOptions", "run_train_classifier", "LABELLED_DATASETS", "METRICS_FILE"]

CLASSIFIER_SPEC_FORMAT = "scoresde-classifier-1"
CLASSIFIER_NETS = {"conv": ConvClassifier, "mlp": MLPClassifier}
METRICS_FILE = "metrics.json"
LABELLED_DATASETS = tuple(NUM_CLASSES)  # the data sets that carry class labels (scoresde.data.NUM_CLASSES)
LogProbFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


# --- the model ---------------------------------------------------------------------------------------------
def classifier_net_time(sde: SDE, t: torch.Tensor) -> torch.Tensor:
    """The network time of ``t`` ``(B,)``: ``sigma(t)`` for a VE SDE, ``999 t`` otherwise (``ScoreModel.net_time``)."""
    return sde.sigma(t) if isinstance(sde, VESDE) else VP_TIME_SCALE * t


class NoiseConditionalClassifier(nn.Module):
    """``p_t(y | x)`` from ``logits = net(c_in x, t_in)``, ``c_in = 1 / sqrt(m(t)^2 + s(t)^2)``, ``t_in`` of
    ``classifier_net_time`` (module docstring).

    Args:
        net: ``net(x (B, ...), t_in (B,)) -> (B, K)`` logits, e.g. ``ConvClassifier`` / ``MLPClassifier``.
        sde: the SDE whose perturbed data ``x_t`` the classifier is trained on (``VPSDE``, ``SubVPSDE``, ``VESDE``).

    ``forward(x, t)``: logits ``(B, K)``; ``log_prob(x, t)``: ``log_softmax`` of them; ``x (B, ...)``, ``t (B,)``
    or a scalar in ``[0, T]``.
    """

    def __init__(self, net: nn.Module, sde: SDE):
        super().__init__()
        if not isinstance(net, nn.Module):
            raise TypeError(f"net must be a torch.nn.Module; got {type(net).__name__}")
        if not isinstance(sde, SDE):
            raise TypeError(f"sde must be a scoresde.sde.SDE (VPSDE, SubVPSDE, VESDE); got {type(sde).__name__}")
        self.net, self.sde = net, sde

    @property
    def num_classes(self) -> Optional[int]:
        """``K`` (``None`` if the network does not say)."""
        return getattr(self.net, "num_classes", None)

    def extra_repr(self) -> str:
        return f"sde={self.sde!r}"

    def forward(self, x: torch.Tensor, t) -> torch.Tensor:
        t = as_time(t, x, self.sde.T)
        m, s = self.sde.marginal_coef(t)
        c_in = torch.rsqrt(m * m + s * s)
        return self.net(batch_broadcast(c_in, x) * x, classifier_net_time(self.sde, t))

    def log_prob(self, x: torch.Tensor, t) -> torch.Tensor:
        """``log p_t(y | x)`` for every class ``y``: ``(B, K)``, ``log_softmax`` of the logits."""
        return F.log_softmax(self(x, t), dim=-1)

    def log_prob_fn(self) -> LogProbFn:
        """``log_prob_fn(x, t) -> (B, K)`` for classifier guidance (``classifier_guided_score_fn``).

        ``x`` is cast to the classifier's device and dtype (a float64 sampler can use a float32 classifier) and the
        result back to ``x``'s, differentiably: ``grad_x`` of it is the gradient with respect to the caller's ``x``.
        The caller decides about autograd (``torch.enable_grad()`` inside a sampler's ``no_grad``).
        """
        def log_prob_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            p = next(self.parameters())
            t = as_time(t, x, self.sde.T)
            out = self.log_prob(x.to(device=p.device, dtype=p.dtype), t.to(device=p.device, dtype=p.dtype))
            return out.to(device=x.device, dtype=x.dtype)

        return log_prob_fn


# --- the loss ------------------------------------------------------------------------------------------------
def classifier_loss(sde: SDE, eps: float = 1e-5):
    """``loss_fn(model, x0, generator, y) -> scalar``: the cross-entropy of ``p_t(y | x_t)`` on perturbed data
    (Song et al. 2021, App. I.1), for ``scoresde.train.train(..., labels=...)``::

        u ~ U(0, 1),  t = eps + (T - eps) u          (B,)        drawn first from ``generator``
        z ~ N(0, I)                                  like x0     drawn second
        x_t = m(t) x0 + s(t) z,   L = mean_b [ -log_softmax(model(x_t, t))[b, y_b] ]

    ``model``: a ``NoiseConditionalClassifier`` (or any ``model(x, t) -> (B, K)`` logits); ``x0 (B, ...)``;
    ``y (B,)`` integer labels in ``[0, K)``. ``eps`` in ``(0, T)``.
    """
    if not isinstance(sde, SDE):
        raise TypeError(f"sde must be a scoresde.sde.SDE (VPSDE, SubVPSDE, VESDE); got {type(sde).__name__}")
    T = float(sde.T)
    eps = check_in_range("eps", eps, 0.0, T, low_closed=False, high_closed=False)

    def loss_fn(model: nn.Module, x0: torch.Tensor, generator: torch.Generator, y: Optional[torch.Tensor] = None) -> torch.Tensor:
        if y is None:
            raise ValueError("classifier_loss needs the labels y of the batch: train(..., labels=<(N,) long>)")
        B = x0.shape[0]
        u = torch.rand(B, generator=generator, device=x0.device, dtype=x0.dtype)
        t = eps + (T - eps) * u
        z = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        m, s = sde.marginal_coef(t)
        x_t = batch_broadcast(m, x0) * x0 + batch_broadcast(s, x0) * z
        return F.cross_entropy(model(x_t, t), y.to(device=x0.device, dtype=torch.long))

    return loss_fn


# --- specs: build and load -------------------------------------------------------------------------------------
def classifier_spec(sde: SDE, net_name: str, net_kwargs: dict, data_shape: Sequence[int], num_classes: int,
                    data: Optional[dict] = None, seed: int = 0) -> dict:
    """A classifier's build spec (module docstring). ``net_kwargs``: the network's own arguments (the data-dependent
    ``in_channels`` / ``image_size`` / ``dim``, ``num_classes`` and ``seed`` are filled in by ``build_classifier``)."""
    from .build import sde_spec

    check_choice("net", net_name, tuple(CLASSIFIER_NETS))
    for k in ("in_channels", "image_size", "dim", "num_classes", "seed"):
        if k in net_kwargs:
            raise ValueError(f"net_kwargs must not set {k!r}: it comes from the data / num_classes / seed")
    return {"format": CLASSIFIER_SPEC_FORMAT, "sde": sde_spec(sde), "net": {"name": net_name, "kwargs": dict(net_kwargs)},
            "data_shape": [int(v) for v in data_shape], "num_classes": check_int("num_classes", num_classes, 2),
            "data": dict(data or {}), "seed": check_int("seed", seed, 0)}


def build_classifier(spec: dict, device=None, dtype=None) -> NoiseConditionalClassifier:
    """``NoiseConditionalClassifier(net, sde)`` from a spec, with ``.spec`` set (so training checkpoints carry it);
    initial weights from ``spec["seed"]``. ``conv`` takes ``(C, H, W)`` data, ``mlp`` any shape (flattened)."""
    from .build import build_sde

    if not isinstance(spec, dict) or spec.get("format") != CLASSIFIER_SPEC_FORMAT:
        got = spec.get("format") if isinstance(spec, dict) else type(spec).__name__
        raise ValueError(f"spec must be a dict with format {CLASSIFIER_SPEC_FORMAT!r}; got {got!r}")
    sde = build_sde(spec["sde"]["name"], **spec["sde"]["kwargs"])
    name, kwargs, shape = spec["net"]["name"], dict(spec["net"]["kwargs"]), tuple(spec["data_shape"])
    check_choice("net", name, tuple(CLASSIFIER_NETS))
    if name == "conv":
        if len(shape) != 3 or shape[1] != shape[2]:
            raise ValueError(f"net 'conv' needs square images: data_shape (C, H, H); got {shape}")
        kwargs.update(in_channels=shape[0], image_size=shape[1])
    else:
        kwargs.update(dim=math.prod(shape))
    net = CLASSIFIER_NETS[name](num_classes=spec["num_classes"], seed=spec.get("seed", 0), **kwargs)
    model = NoiseConditionalClassifier(net, sde)
    model.spec = spec
    return model.to(device=device, dtype=dtype)


def load_classifier(path, ema: bool = True, device=None, dtype=None) -> NoiseConditionalClassifier:
    """Rebuild a trained classifier from a checkpoint file or a ``run_train_classifier`` directory (its
    ``checkpoint.pt``), from the checkpoint alone (its ``spec``). ``ema``: the EMA weights (default) or the raw ones.
    Returned in eval mode with ``requires_grad`` off (guidance differentiates with respect to ``x`` only).
    ``ValueError`` naming the file when it is not a classifier checkpoint or does not fit its spec."""
    from .build import find_checkpoint
    from .checkpoint import check_state_dict, load_checkpoint

    check_bool("ema", ema)
    file = find_checkpoint(path)
    state = load_checkpoint(file, map_location="cpu", required_keys=("ema",))
    spec = state.get("spec")
    if not isinstance(spec, dict) or spec.get("format") != CLASSIFIER_SPEC_FORMAT:
        got = spec.get("format") if isinstance(spec, dict) else None
        raise ValueError(f"checkpoint file {str(file)!r} is not a noise-conditional classifier's: its spec format is "
                         f"{got!r}, expected {CLASSIFIER_SPEC_FORMAT!r} (score models load with scoresde.load)")
    if not ema and "model" not in state:
        raise ValueError(f"checkpoint file {str(file)!r} holds only EMA weights (ema=True)")
    model = build_classifier(spec)
    sd = state["ema"]["module"] if ema else state["model"]
    check_state_dict(model, sd, source=f"checkpoint file {str(file)!r}")
    model.load_state_dict(sd)
    model.requires_grad_(False).eval()
    return model.to(device=device, dtype=dtype)


# --- evaluation ----------------------------------------------------------------------------------------------------
@torch.no_grad()
def classifier_accuracy(classifier: nn.Module, x0: torch.Tensor, y: torch.Tensor, times: Sequence[float], sde: SDE,
                        generator: Optional[torch.Generator] = None, batch_size: int = 1000) -> dict:
    """Accuracy and cross-entropy (nats) of ``classifier(x, t) -> logits`` on ``x_t = m(t) x0 + s(t) z`` at each
    ``t`` of ``times``: ``{t: {"accuracy", "nll"}}``. ``x0 (N, ...)``, ``y (N,)``; ``z`` drawn from ``generator``,
    time by time in the order of ``times`` (one draw of ``x0``'s shape each)."""
    check_int("batch_size", batch_size)
    if y.shape != (x0.shape[0],):
        raise ValueError(f"y must have shape (N,) = ({x0.shape[0]},); got {tuple(y.shape)}")
    out = {}
    for t in times:
        t = check_in_range("times", t, 0.0, float(sde.T))
        z = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        m, s = sde.marginal_coef(torch.tensor([t], dtype=torch.float64))
        x_t = float(m) * x0 + float(s) * z
        correct, nll = 0, 0.0
        for i in range(0, x0.shape[0], batch_size):
            xb, yb = x_t[i:i + batch_size], y[i:i + batch_size]
            logits = classifier(xb, torch.full((xb.shape[0],), t, device=xb.device, dtype=xb.dtype))
            correct += int((logits.argmax(-1) == yb).sum())
            nll += float(F.cross_entropy(logits, yb, reduction="sum"))
        out[t] = {"accuracy": correct / x0.shape[0], "nll": nll / x0.shape[0]}
    return out


# --- the app ----------------------------------------------------------------------------------------------------------
SDE_NAMES = ("vp", "subvp", "ve")
NET_CHOICES = ("auto", "conv", "mlp")
TIME_EMBEDDING_CHOICES = ("auto",) + CLASSIFIER_TIME_EMBEDDINGS


@dataclass
class ClassifierOptions:
    """``run_train_classifier``'s options (plain values; ``scoresde-train-classifier``'s schema).

    Data: ``dataset``, a labelled set of ``LABELLED_DATASETS`` (``scoresde.data.NUM_CLASSES``: the 2-D ``gmm`` with
    its 5 components as classes, ``digits``, ``mnist``, ``cifar10``), on the score model's scale (images: ``centered``
    [-1, 1], else [0, 1], uniformly dequantised each step; continuous data as it is), its first ``n_train`` training
    examples (``None``: all);
    accuracy on its first ``n_eval`` test examples (``None``: all) at each time of ``eval_times`` (in ``(0, T]``).
    ``sde``: ``"vp"``, ``"subvp"`` or ``"ve"`` (default parameters); training times ``t ~ U(eps, T)``.
    Network: ``net`` ``"conv"`` (``ConvClassifier``: ``ch``, ``ch_mult``, ``num_res_blocks``), ``"mlp"``
    (``MLPClassifier``: ``hidden``, ``depth``) or ``"auto"`` (conv for images, mlp for vectors); ``time_embedding``
    ``"auto"`` (sinusoidal of ``999 t`` for VP / sub-VP, Fourier of ``log sigma`` for VE), ``fourier_scale``,
    ``dropout``. Training (``scoresde.train.TrainOptions``): ``n_steps``, ``batch_size``, ``lr``, ``warmup``,
    ``grad_clip``, ``ema_rate``, ``seed`` (also the network's initial weights and the evaluation noise), ``device``.
    ``workdir``: the run directory (``checkpoint.pt``, ``metrics.jsonl``, ``metrics.json``, ``options.json``), resumed
    exactly when it holds a checkpoint and ``resume``.

    The defaults (VP, ``ConvClassifier`` ch 32: 110,570 parameters, 1000 steps of 128) are sized for a CPU: on digits
    about 70 s of CPU time on one thread (``train_cpu_seconds`` in ``metrics.json``).
    """

    dataset: str = "digits"
    centered: bool = True
    n_train: Optional[int] = None
    sde: str = "vp"
    eps: float = 1e-5
    net: str = "auto"
    ch: int = 32
    ch_mult: Tuple[int, ...] = (1, 2)
    num_res_blocks: int = 1
    hidden: int = 128
    depth: int = 2
    time_embedding: str = "auto"
    fourier_scale: float = 16.0
    dropout: float = 0.0
    n_steps: int = 1000
    batch_size: int = 128
    lr: float = 2e-3
    warmup: int = 100
    grad_clip: Optional[float] = 1.0
    ema_rate: float = 0.999
    seed: int = 0
    device: str = "cpu"
    workdir: str = "outputs/classifier"
    resume: bool = True
    eval_times: Tuple[float, ...] = (0.01, 0.1, 0.3, 0.5, 0.8)
    n_eval: Optional[int] = None
    progress: bool = True

    def __post_init__(self):
        check_choice("dataset", self.dataset, LABELLED_DATASETS)
        check_bool("centered", self.centered)
        if self.n_train is not None:
            check_int("n_train", self.n_train, 1)
        check_choice("sde", self.sde, SDE_NAMES)
        check_in_range("eps", self.eps, 0.0, 1.0, low_closed=False, high_closed=False)
        check_choice("net", self.net, NET_CHOICES)
        for name in ("ch", "num_res_blocks", "hidden"):
            check_int(name, getattr(self, name), 1)
        check_int("depth", self.depth, 0)
        mult = self.ch_mult
        if isinstance(mult, (str, bytes)) or not isinstance(mult, Sequence) or not mult or any(
                isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in mult):
            raise ValueError(f"ch_mult must be a non-empty sequence of positive integers, e.g. [1, 2]; got {mult!r}")
        self.ch_mult = tuple(int(v) for v in mult)
        check_choice("time_embedding", self.time_embedding, TIME_EMBEDDING_CHOICES)
        check_positive("fourier_scale", self.fourier_scale)
        check_in_range("dropout", self.dropout, 0.0, 1.0, high_closed=False)
        check_int("n_steps", self.n_steps, 1)
        check_int("batch_size", self.batch_size, 1)
        check_positive("lr", self.lr)
        check_int("warmup", self.warmup, 0)
        check_positive("grad_clip", self.grad_clip, optional=True)
        check_in_range("ema_rate", self.ema_rate, 0.0, 1.0, high_closed=False)
        check_int("seed", self.seed, 0)
        try:
            torch.device(self.device)
        except (RuntimeError, TypeError) as e:
            raise ValueError(f"device must be a torch device string such as 'cpu', 'cuda', 'cuda:0'; got {self.device!r}") from e
        if not isinstance(self.workdir, (str, Path)) or not str(self.workdir):
            raise ValueError(f"workdir must be a non-empty path; got {self.workdir!r}")
        check_bool("resume", self.resume)
        times = self.eval_times
        if isinstance(times, (str, bytes)) or not isinstance(times, Sequence) or not times or any(
                isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 < v <= 1.0 for v in times):
            raise ValueError(f"eval_times must be a non-empty sequence of times in (0, T] = (0, 1]; got {times!r}")
        self.eval_times = tuple(float(v) for v in times)
        if self.n_eval is not None:
            check_int("n_eval", self.n_eval, 1)
        check_bool("progress", self.progress)

    def net_spec(self, data_shape: Sequence[int]) -> tuple[str, dict]:
        """``(net name, its keyword arguments)`` for per-sample ``data_shape`` (``"auto"`` resolved)."""
        name = self.net if self.net != "auto" else ("conv" if len(data_shape) == 3 else "mlp")
        emb = self.time_embedding if self.time_embedding != "auto" else ("fourier" if self.sde == "ve" else "sinusoidal")
        common = dict(time_embedding=emb, fourier_scale=float(self.fourier_scale), dropout=float(self.dropout))
        if name == "conv":
            return name, dict(ch=self.ch, ch_mult=list(self.ch_mult), num_res_blocks=self.num_res_blocks, **common)
        return name, dict(hidden=self.hidden, depth=self.depth, **common)


def run_train_classifier(options: ClassifierOptions) -> dict:
    """Train a noise-conditional classifier on ``options.dataset`` perturbed by ``options.sde`` (``classifier_loss``)
    with ``scoresde.train.train(..., labels=...)`` in ``options.workdir`` (resumed exactly from its checkpoint), then
    evaluate the EMA classifier on the test split at each of ``eval_times``. Returns (and writes to ``metrics.json``)::

        {"dataset", "sde", "net", "parameters", "train_steps", "steps_this_call", "train_seconds", "train_cpu_seconds",
         "threads", "steps_per_s", "final_loss", "n_test", "accuracy": {"0.01": ..., ...}, "nll": {...}, "checkpoint"}

    ``train_seconds`` / ``train_cpu_seconds``: this call's training time, wall clock and CPU time of the process
    (about 0 when the run was already finished); ``steps_per_s`` is on the wall clock. ``load_classifier(workdir)``
    rebuilds the classifier from the checkpoint alone.
    """
    from .build import build_sde
    from .data import load_dataset
    from .runs import DataOptions, make_prepare
    from .train import TrainOptions, train

    if not isinstance(options, ClassifierOptions):
        raise TypeError(f"options must be a ClassifierOptions; got {type(options).__name__}")
    o = options
    device = torch.device(o.device)
    sde = build_sde(o.sde)
    train_ds = load_dataset(o.dataset, "train", n=o.n_train)
    test_ds = load_dataset(o.dataset, "test", n=o.n_eval)
    K = NUM_CLASSES[o.dataset]
    for ds in (train_ds, test_ds):
        if ds.labels is None or int(ds.labels.min()) < 0 or int(ds.labels.max()) >= K:
            raise ValueError(f"data set {o.dataset!r} ({ds.split}) must carry labels in [0, {K - 1}]")
    net_name, net_kwargs = o.net_spec(train_ds.shape)
    data = {"name": o.dataset, "centered": o.centered, "levels": train_ds.levels}
    spec = classifier_spec(sde, net_name, net_kwargs, train_ds.shape, K, data, o.seed)
    clf = build_classifier(spec, device=device)
    prepare = make_prepare(DataOptions(name=o.dataset, centered=o.centered), train_ds.levels, torch.float32)
    tr = TrainOptions(n_steps=o.n_steps, batch_size=o.batch_size, lr=o.lr, warmup=o.warmup, grad_clip=o.grad_clip,
                      ema_rate=o.ema_rate, seed=o.seed, log_every=max(1, o.n_steps // 20))
    workdir = Path(o.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "options.json").write_text(json.dumps(dataclasses.asdict(o), indent=1))

    start = _checkpoint_step(workdir) if o.resume else 0
    t0, c0 = time.perf_counter(), time.process_time()
    result = train(clf, classifier_loss(sde, o.eps), train_ds.x, tr, workdir, prepare=prepare, resume=o.resume,
                   progress=o.progress, labels=train_ds.labels)
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
    ema = result.ema.module.eval()

    g = torch.Generator().manual_seed(o.seed + 1)
    x_test = test_ds.model_scale(centered=o.centered, dequantize=True, generator=g, dtype=torch.float32).to(device)
    acc = classifier_accuracy(ema, x_test, test_ds.labels.to(device), o.eval_times, sde,
                              generator=torch.Generator(device=device).manual_seed(o.seed + 2))
    steps_now = result.step - start
    metrics = {
        "dataset": o.dataset, "sde": o.sde, "net": net_name, "parameters": sum(p.numel() for p in clf.parameters()),
        "train_steps": result.step, "steps_this_call": steps_now, "train_seconds": round(seconds, 2),
        "train_cpu_seconds": round(cpu_seconds, 2), "threads": torch.get_num_threads(),
        "steps_per_s": round(steps_now / seconds, 2) if steps_now else None, "final_loss": result.loss,
        "n_test": int(x_test.shape[0]),
        "accuracy": {f"{t:g}": round(v["accuracy"], 4) for t, v in acc.items()},
        "nll": {f"{t:g}": round(v["nll"], 4) for t, v in acc.items()},
        "checkpoint": str(result.checkpoint_path),
    }
    (workdir / METRICS_FILE).write_text(json.dumps(metrics, indent=1))
    return metrics


def _checkpoint_step(workdir: Path) -> int:
    """The step of ``workdir/checkpoint.pt`` (0 when there is none)."""
    from .checkpoint import load_checkpoint

    p = workdir / "checkpoint.pt"
    return int(load_checkpoint(p, map_location="cpu", mmap=True)["step"]) if p.is_file() else 0
