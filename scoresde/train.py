"""The training loop: Adam with warm-up and clipping, EMA, mixed precision, checkpoint/resume, DDP.

One step ``n = 0, 1, ...`` (paper defaults in brackets, Song et al. 2021, App. D)::

    lr_n     = lr * min(1, (n + 1) / warmup) * d_n                 (lr 2e-4, warmup 5000, d_n = 1)
    batch    = data[idx_n],   x0 = prepare(batch, g_noise)          (e.g. dequantise + flip)
    L        = loss_fn(model, x0, g_noise)
    g        = clip(grad L, max_norm = grad_clip)                   (1.0)
    theta    = Adam(theta, g; lr_n, beta1, beta2, eps)              (0.9, 0.999, 1e-8)
    theta_ema = d theta_ema + (1 - d) theta,  d = min(rate, (1 + n') / (10 + n'))   (rate 0.9999 VP, 0.999 VE)

``d_n`` is the optional decay after warm-up (``lr_schedule``, ``scheduled_lr``); the paper keeps the rate constant
(``d_n = 1``). The options, the schedule, the seeds and the precision choice are ``scoresde.train_options``
(re-exported here); this module owns the loop, the checkpoint / RNG-state plumbing and the reporting.

``train`` knows nothing about SDEs or networks: it takes any ``nn.Module``, a
``loss_fn(model, x0, generator) -> scalar`` and the training set as a tensor (with ``labels``, the class labels of
its rows, the loss is ``loss_fn(model, x0, generator, y)``).

Randomness. Each rank owns two generators seeded from ``(seed, rank)``: an index generator
(CPU; draws an epoch permutation of the data) and a noise generator (on the training device;
passed to ``prepare`` and ``loss_fn``). The global torch RNG (used by dropout) is seeded from
``(seed, rank)`` at the start of a fresh run. Checkpoints store all of them (and the CUDA RNG
states) for every rank, so a run stopped and resumed ends bitwise equal to an uninterrupted run
on CPU.

Distributed. Under ``torchrun`` (``WORLD_SIZE > 1`` in the environment) ``train`` initialises the
process group (gloo on CPU, nccl on CUDA, device ``cuda:LOCAL_RANK``) unless one exists, wraps
the loss in ``DistributedDataParallel`` (so gradients are averaged whatever methods of the model
``loss_fn`` calls), draws ``batch_size / world_size`` examples per rank, and writes checkpoints
and logs from rank 0 only.

Files in ``workdir``: ``checkpoint.pt`` (latest full state), ``best.pt`` (best EMA weights by
``select_metric``; with the ``step`` that wrote it and the ``run_hash`` of the run, also in ``checkpoint.pt``),
``metrics.jsonl`` (one JSON object per log or evaluation). A model with a ``spec``
attribute (``ScoreModel`` built by ``scoresde.build``: how to rebuild it) has it stored in both
checkpoints under ``"spec"``, so ``scoresde.load(path)`` needs nothing else.

Reporting. Rank 0 shows a tqdm bar (``progress=False`` turns it off), appends every record to
``metrics.jsonl``, logs it through the ``logging`` logger ``"scoresde.train"`` (INFO; silent unless the
application configures logging) and hands a copy to ``callback(record)``, the hook for TensorBoard, W&B and
the like. A record is ``{"step", "loss", "lr", "steps_per_s", "ema_decay"[, "grad_norm_max", "loss_scale"]}``
every ``log_every`` steps, or ``{"step", "eval": {...}[, "best_value", "best_step"]}`` after an evaluation.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from .checkpoint import check_state_dict, load_checkpoint, save_checkpoint
from .ema import EMA
# the options, the schedule, the seeds and the precision: defined in train_options, public here too (__all__)
from .train_options import _RUN_DEFINING, LR_SCHEDULES, TrainOptions, derive_seed, resolve_amp, scheduled_lr, warmup_lr

__all__ = ["TrainOptions", "TrainResult", "train", "warmup_lr", "scheduled_lr", "LR_SCHEDULES", "resolve_amp", "derive_seed", "CHECKPOINT_NAME", "BEST_NAME", "METRICS_NAME"]

CHECKPOINT_NAME = "checkpoint.pt"
BEST_NAME = "best.pt"
METRICS_NAME = "metrics.jsonl"
_FORMAT = "scoresde-train-1"

LossFn = Callable[[nn.Module, torch.Tensor, torch.Generator], torch.Tensor]
PrepareFn = Callable[[torch.Tensor, torch.Generator], torch.Tensor]
EvalFn = Callable[[nn.Module, int], dict]
Callback = Callable[[dict], None]

logger = logging.getLogger(__name__)  # "scoresde.train"


# ----------------------------------------------------------------------------- result
@dataclass
class TrainResult:
    """What ``train`` returns.

    ``step``: optimiser steps done in total; ``loss``: mean loss over the last log window (nan if no
    step ran); ``best_step`` / ``best_value``: the selected EMA checkpoint; ``stopped_early``: early
    stopping fired; ``history``: the log records of this call; ``ema``: the ``EMA`` (its ``module``
    holds the final EMA weights); paths of the files written (``None`` off rank 0 / when absent).
    """

    step: int
    loss: float
    best_step: Optional[int]
    best_value: Optional[float]
    stopped_early: bool
    history: list
    ema: EMA
    workdir: Path
    checkpoint_path: Optional[Path]
    best_path: Optional[Path]
    metrics_path: Optional[Path]
    amp: str = "off"
    world_size: int = 1
    extra: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------- small pieces
class _IndexSampler:
    """Batches of indices from successive random permutations of ``range(n)`` (epochs)."""

    def __init__(self, n: int, generator: torch.Generator):
        self.n, self.generator = n, generator
        self.perm = torch.randperm(n, generator=generator)
        self.pos = 0

    def next(self, k: int) -> torch.Tensor:
        out = []
        while k > 0:
            if self.pos == self.n:
                self.perm = torch.randperm(self.n, generator=self.generator)
                self.pos = 0
            take = min(k, self.n - self.pos)
            out.append(self.perm[self.pos:self.pos + take])
            self.pos += take
            k -= take
        return torch.cat(out)

    def state(self) -> dict:
        return {"perm": self.perm.clone(), "pos": self.pos}

    def load(self, state: dict) -> None:
        if state["perm"].numel() != self.n:
            raise ValueError(f"the checkpoint's data permutation has {state['perm'].numel()} entries but the data has {self.n} examples")
        self.perm, self.pos = state["perm"].clone(), int(state["pos"])


class _LossModule(nn.Module):
    """``forward(x0, generator[, y]) = loss_fn(model, x0, generator[, y])``: lets DDP see every parameter ``loss_fn``
    uses."""

    def __init__(self, model: nn.Module, loss_fn: LossFn):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, x0, generator, y=None):
        if y is None:
            return self.loss_fn(self.model, x0, generator)
        return self.loss_fn(self.model, x0, generator, y)


def _dist_env() -> tuple[int, int, int]:
    """``(world_size, rank, local_rank)`` from an initialised process group or the torchrun environment."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank(), int(os.environ.get("LOCAL_RANK", 0))
    try:
        ws = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError as e:
        raise ValueError(f"WORLD_SIZE / RANK / LOCAL_RANK must be integers: {e}") from e
    return ws, rank, local


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    raise ValueError("model has no parameters to train")


def _rng_state(index_gen, noise_gen, sampler, device) -> dict:
    return {
        "index_gen": index_gen.get_state(),
        "noise_gen": noise_gen.get_state(),
        "torch_cpu": torch.get_rng_state(),
        "torch_cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        "sampler": sampler.state(),
    }


def _set_rng_state(state: dict, index_gen, noise_gen, sampler, device) -> None:
    index_gen.set_state(state["index_gen"].cpu())
    noise_gen.set_state(state["noise_gen"].cpu())
    torch.set_rng_state(state["torch_cpu"].cpu())
    if device.type == "cuda" and state.get("torch_cuda") is not None:
        torch.cuda.set_rng_state(state["torch_cuda"].cpu(), device)
    sampler.load(state["sampler"])


def run_hash(options: TrainOptions, spec: Optional[dict]) -> str:
    """A short hash of what defines a run: the trajectory-defining options (``_RUN_DEFINING``) and the model's spec.
    ``checkpoint.pt`` and ``best.pt`` both record it, so a ``best.pt`` of another run is recognised."""
    import hashlib

    spec = copy.deepcopy(spec)
    opts = (spec or {}).get("data", {}).get("options") if isinstance(spec, dict) else None
    if isinstance(opts, dict):  # where the data lives and how much is evaluated do not define the run
        for k in ("n_eval", "root", "download"):
            opts.pop(k, None)
    d = {"options": {k: getattr(options, k) for k in _RUN_DEFINING}, "spec": spec}
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _append_jsonl(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def _truncate_log(path: Path, step: int) -> None:
    """Drop records after ``step`` (written by a run that crashed after its last checkpoint)."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                keep.append(line)
        except json.JSONDecodeError:
            continue
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(s + "\n" for s in keep))
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- the loop
def train(
    model: nn.Module,
    loss_fn: LossFn,
    data: torch.Tensor,
    options: TrainOptions,
    workdir,
    prepare: Optional[PrepareFn] = None,
    eval_fn: Optional[EvalFn] = None,
    resume: bool = True,
    progress: bool = True,
    callback: Optional[Callback] = None,
    labels: Optional[torch.Tensor] = None,
) -> TrainResult:
    """Train ``model`` in place for ``options.n_steps`` steps (see the module docstring for the update).

    Args:
        model: any ``nn.Module``; trained on the device its parameters live on (under DDP with CUDA:
            moved to ``cuda:LOCAL_RANK``).
        loss_fn: ``loss_fn(model, x0, generator) -> 0-d tensor``; ``x0`` is ``(b, *dims)`` with
            ``b = batch_size / world_size``.
        data: training set ``(N, *dims)`` (CPU or the device); rows are drawn epoch by epoch.
        options: ``TrainOptions``.
        workdir: directory for ``checkpoint.pt``, ``best.pt`` and ``metrics.jsonl``.
        prepare: ``prepare(batch, generator) -> x0`` applied to each raw batch on the device
            (dequantisation, flips); required when ``data`` is not floating point.
        eval_fn: ``eval_fn(ema_module, step) -> dict of floats``, called every ``eval_every`` steps
            and at the last step under a forked RNG (it cannot change the training trajectory).
        resume: continue from ``workdir/checkpoint.pt`` if it exists (same run-defining options required).
        progress: show a tqdm bar with the loss and steps/s (rank 0).
        callback: ``callback(record)``, called on rank 0 with a copy of each record written to ``metrics.jsonl``
            (the module docstring lists the keys), under a forked RNG like ``eval_fn``; e.g. a TensorBoard
            ``SummaryWriter.add_scalar`` per key. Other ranks never call it.
        labels: optional class labels ``(N,)`` (integer) of ``data``'s rows; then each step's labels ``y`` ``(b,)``
            of the batch rows (the same indices) are passed on: ``loss_fn(model, x0, generator, y)``
            (e.g. ``losses.class_conditional``). Drawing them consumes no random numbers, so a run with labels
            follows the same data order as one without.

    Returns:
        ``TrainResult``.
    """
    # ---- validate everything before any work
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
    if not callable(loss_fn):
        raise TypeError("loss_fn must be callable as loss_fn(model, x0, generator)")
    if not isinstance(options, TrainOptions):
        raise TypeError(f"options must be a TrainOptions; got {type(options).__name__}")
    if not torch.is_tensor(data) or data.dim() < 1 or data.shape[0] < 1:
        raise ValueError(f"data must be a tensor (N, *dims) with N >= 1; got {getattr(data, 'shape', type(data).__name__)}")
    if prepare is None and not data.dtype.is_floating_point:
        raise ValueError(f"data has dtype {data.dtype}: pass prepare(batch, generator) to turn it into model inputs")
    if prepare is not None and not callable(prepare):
        raise TypeError("prepare must be callable as prepare(batch, generator)")
    if eval_fn is not None and not callable(eval_fn):
        raise TypeError("eval_fn must be callable as eval_fn(ema_model, step)")
    if callback is not None and not callable(callback):
        raise TypeError("callback must be callable as callback(record)")
    if labels is not None:
        if not torch.is_tensor(labels) or labels.dtype.is_floating_point or labels.dtype == torch.bool \
                or labels.shape != (data.shape[0],):
            desc = f"{labels.dtype} {tuple(labels.shape)}" if torch.is_tensor(labels) else type(labels).__name__
            raise ValueError(f"labels must be an integer tensor of shape (N,) = ({data.shape[0]},), one per row of data; "
                             f"got {desc}")
    if options.select_metric is not None and eval_fn is None:
        raise ValueError("options.select_metric is set but no eval_fn was given")

    world_size, rank, local_rank = _dist_env()
    if options.batch_size % world_size:
        raise ValueError(f"batch_size ({options.batch_size}) must be divisible by the world size ({world_size})")
    workdir = Path(workdir)
    ckpt_path, best_path, log_path = workdir / CHECKPOINT_NAME, workdir / BEST_NAME, workdir / METRICS_NAME

    # ---- devices, process group
    own_group = False
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend)
        own_group = True
    distributed = world_size > 1
    if distributed and dist.get_backend() == "nccl":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        model.to(device)
    else:
        device = _model_device(model)
    try:
        return _train(model, loss_fn, data, options, workdir, ckpt_path, best_path, log_path, prepare, eval_fn,
                      resume, progress, callback, device, world_size, rank, distributed, labels)
    finally:
        if own_group:
            dist.destroy_process_group()


def _train(model, loss_fn, data, options, workdir, ckpt_path, best_path, log_path, prepare, eval_fn, resume, progress,
           callback, device, world_size, rank, distributed, labels=None) -> TrainResult:
    amp = resolve_amp(options.amp, device)
    rhash = run_hash(options, getattr(model, "spec", None))
    local_batch = options.batch_size // world_size
    is_main = rank == 0

    # ---- checkpoint to resume from (read and checked before building anything expensive)
    ckpt = None
    if resume and ckpt_path.exists():
        ckpt = load_checkpoint(ckpt_path, map_location="cpu",
                               required_keys=("format", "step", "model", "ema", "optimizer", "options", "rank_states"))
        if ckpt["format"] != _FORMAT:
            raise ValueError(f"checkpoint file {str(ckpt_path)!r} has format {ckpt['format']!r}, expected {_FORMAT!r}")
        check_state_dict(model, ckpt["model"], source=f"checkpoint file {str(ckpt_path)!r}")
        old = ckpt["options"]
        defaults = TrainOptions()
        # options added later than a checkpoint take their defaults; a decaying rate makes n_steps part of the run
        defining = _RUN_DEFINING + (("n_steps",) if options.lr_schedule != "constant" else ())
        for name in defining:
            was = old.get(name, getattr(defaults, name))
            if was != getattr(options, name):
                raise ValueError(f"cannot resume from {str(ckpt_path)!r}: option {name} was {was!r}, now "
                                 f"{getattr(options, name)!r} (use the same value, another workdir, or resume=False)")
        if len(ckpt["rank_states"]) != world_size:
            raise ValueError(f"cannot resume exactly from {str(ckpt_path)!r}: it was written by {len(ckpt['rank_states'])} "
                             f"rank(s), this run has world size {world_size}")

    # ---- generators and global RNG (fresh run: seeded; resumed: restored below)
    index_gen = torch.Generator(device="cpu").manual_seed(derive_seed(options.seed, rank, 0))
    noise_gen = torch.Generator(device=device).manual_seed(derive_seed(options.seed, rank, 1))
    if ckpt is None:
        torch.manual_seed(derive_seed(options.seed, rank, 2))
    sampler = _IndexSampler(data.shape[0], index_gen)

    # ---- model replicas, optimiser, EMA, scaler
    model.train()
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
    runner = _LossModule(model, loss_fn)
    if distributed:
        from torch.nn.parallel import DistributedDataParallel as DDP

        runner = DDP(runner, device_ids=[device.index] if device.type == "cuda" else None)  # broadcasts rank 0's weights
    params = [p for p in model.parameters() if p.requires_grad]
    if options.weight_decay > 0:
        opt = torch.optim.AdamW(params, lr=options.lr, betas=(options.beta1, options.beta2), eps=options.adam_eps,
                                weight_decay=options.weight_decay)
    else:
        opt = torch.optim.Adam(params, lr=options.lr, betas=(options.beta1, options.beta2), eps=options.adam_eps)
    ema = EMA(model, options.ema_rate, options.ema_warmup)
    scaler = torch.amp.GradScaler("cuda") if amp == "fp16" else None
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)) \
        if amp != "off" else contextlib.nullcontext

    step = 0
    resumed = ckpt is not None
    sel = {"best_value": None, "best_step": None, "bad_evals": 0, "stopped_early": False}
    if ckpt is not None:
        ema.load_state_dict(ckpt["ema"])
        opt.load_state_dict(ckpt["optimizer"])
        if scaler is not None and ckpt.get("scaler") is not None:
            scaler.load_state_dict(ckpt["scaler"])
        _set_rng_state(ckpt["rank_states"][rank], index_gen, noise_gen, sampler, device)
        step = int(ckpt["step"])
        sel.update(ckpt.get("selection") or {})
        if is_main:
            _truncate_log(log_path, step)
        del ckpt
    if is_main:
        workdir.mkdir(parents=True, exist_ok=True)
        logger.info("%s in %s at step %d of %d (world size %d, device %s, amp %s)",
                    "resuming" if resumed else "training", workdir, step, options.n_steps, world_size, device, amp)

    def report(record: dict) -> None:
        """Rank 0: append ``record`` to metrics.jsonl, log it, hand a copy to the callback."""
        if not is_main:
            return
        _append_jsonl(log_path, record)
        logger.info("%s", json.dumps(record))
        if callback is not None:
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                callback(copy.deepcopy(record))

    def checkpoint():
        states = _rng_state(index_gen, noise_gen, sampler, device)
        if distributed:
            gathered = [None] * world_size
            dist.all_gather_object(gathered, states)
        else:
            gathered = [states]
        if is_main:
            save_checkpoint(ckpt_path, {
                "format": _FORMAT, "step": step, "model": model.state_dict(), "ema": ema.state_dict(),
                "optimizer": opt.state_dict(), "scaler": scaler.state_dict() if scaler is not None else None,
                "options": options.to_dict(), "amp": amp, "world_size": world_size, "rank_states": gathered,
                "selection": dict(sel), "spec": getattr(model, "spec", None), "run_hash": rhash,
            })
            logger.debug("checkpoint at step %d written to %s", step, ckpt_path)

    def evaluate():
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            metrics = eval_fn(ema.module, step)
        if not isinstance(metrics, dict):
            raise TypeError(f"eval_fn must return a dict of metrics; got {type(metrics).__name__}")
        if distributed:  # every rank follows rank 0's metrics, so selection / stopping agree
            box = [metrics]
            dist.broadcast_object_list(box, src=0)
            metrics = box[0]
        metrics = {k: float(v) for k, v in metrics.items()}
        record = {"step": step, "eval": metrics}
        if options.select_metric is not None:
            if options.select_metric not in metrics:
                raise ValueError(f"select_metric {options.select_metric!r} is not among eval_fn's metrics {sorted(metrics)}")
            v = metrics[options.select_metric]
            best = sel["best_value"]
            better = math.isfinite(v) and (best is None or (v < best if options.select_mode == "min" else v > best))
            if better:
                sel.update(best_value=v, best_step=step, bad_evals=0)
                if is_main:
                    save_checkpoint(best_path, {"format": _FORMAT, "step": step, "ema": ema.state_dict(),
                                                "metrics": metrics, "options": options.to_dict(),
                                                "spec": getattr(model, "spec", None), "run_hash": rhash})
            else:
                sel["bad_evals"] += 1
                if options.patience and sel["bad_evals"] >= options.patience:
                    sel["stopped_early"] = True
                    if is_main:
                        logger.info("early stop at step %d: %s has not improved in %d evaluations (best %s at step %s)",
                                    step, options.select_metric, sel["bad_evals"], sel["best_value"], sel["best_step"])
            record.update(best_value=sel["best_value"], best_step=sel["best_step"])
        history.append(record)
        report(record)

    history: list = []
    bar = tqdm(total=options.n_steps, initial=step, disable=not (progress and is_main), dynamic_ncols=True, desc="train")
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    gn_max = torch.zeros((), device=device, dtype=torch.float64)
    window, last_loss = 0, float("nan")
    t_window = time.perf_counter()
    start_step = step
    checked_scalar = False
    try:
        while step < options.n_steps and not sel["stopped_early"]:
            lr = scheduled_lr(step, options.lr, options.warmup, options.n_steps, options.lr_schedule, options.lr_final_ratio)
            for group in opt.param_groups:
                group["lr"] = lr
            idx = sampler.next(local_batch)
            batch = data[idx.to(data.device)].to(device, non_blocking=True)
            x0 = prepare(batch, noise_gen) if prepare is not None else batch
            y = None if labels is None else labels[idx.to(labels.device)].to(device)
            with autocast():
                loss = runner(x0, noise_gen, y)
            if not checked_scalar:
                if not torch.is_tensor(loss) or loss.dim() != 0:
                    raise ValueError(f"loss_fn must return a 0-d tensor; got {getattr(loss, 'shape', type(loss).__name__)}")
                checked_scalar = True
            opt.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.unscale_(opt)
            else:
                loss.backward()
            if options.grad_clip is not None:
                gn = torch.nn.utils.clip_grad_norm_(params, options.grad_clip)
                gn_max = torch.maximum(gn_max, gn.detach().to(gn_max.dtype))
            if scaler is not None:
                scaler.step(opt)
                scaler.update()
            else:
                opt.step()
            ema.update(model)
            step += 1
            loss_sum += loss.detach().to(loss_sum.dtype)
            window += 1
            bar.update(1)

            last = step == options.n_steps
            if step % options.log_every == 0 or last:
                if distributed:
                    dist.all_reduce(loss_sum)
                    loss_sum /= world_size
                last_loss = float(loss_sum) / window
                if not math.isfinite(last_loss):
                    raise FloatingPointError(f"non-finite training loss {last_loss} in the steps up to {step}")
                dt = time.perf_counter() - t_window
                rec = {"step": step, "loss": last_loss, "lr": lr, "steps_per_s": window / dt if dt > 0 else float("nan"),
                       "ema_decay": ema.next_decay()}
                if options.grad_clip is not None:
                    rec["grad_norm_max"] = float(gn_max)
                if scaler is not None:
                    rec["loss_scale"] = float(scaler.get_scale())
                history.append(rec)
                report(rec)
                bar.set_postfix(loss=f"{last_loss:.4g}", steps_s=f"{rec['steps_per_s']:.1f}")
                loss_sum.zero_(); gn_max.zero_()
                window, t_window = 0, time.perf_counter()
            if eval_fn is not None and options.eval_every and (step % options.eval_every == 0 or last):
                evaluate()
            if options.checkpoint_every and step % options.checkpoint_every == 0 and not last:
                checkpoint()
        if step > start_step or not resumed:  # same decision on every rank
            checkpoint()
    finally:
        bar.close()
    if is_main:
        logger.info("finished at step %d: loss %.6g%s", step, last_loss,
                    "" if sel["best_step"] is None else f", best {options.select_metric} {sel['best_value']:.6g} at step {sel['best_step']}")
    return TrainResult(
        step=step, loss=last_loss, best_step=sel["best_step"], best_value=sel["best_value"],
        stopped_early=bool(sel["stopped_early"]), history=history, ema=ema, workdir=workdir,
        checkpoint_path=ckpt_path if is_main else None,
        best_path=best_path if (is_main and best_path.exists()) else None,
        metrics_path=log_path if is_main else None, amp=amp, world_size=world_size,
    )
