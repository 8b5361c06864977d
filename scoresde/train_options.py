"""What a training run is configured with: ``TrainOptions`` and the pieces that turn its fields into numbers.

This module owns the options of ``scoresde.train.train`` (validated on construction), which of them define a
run's trajectory (a resumed run must keep them), the learning-rate schedule (``warmup_lr``, ``scheduled_lr``),
the seeds of a run's random streams (``derive_seed``) and the precision actually used (``resolve_amp``). It holds
no training state; the loop, checkpoints and RNG state are ``scoresde.train``, which re-exports every name here.

Learning rate of (0-based) step ``n``: ``lr_n = lr * min(1, (n + 1) / warmup) * d_n``, where ``d_n`` is the optional
decay after warm-up (``lr_schedule``): with ``p = (n - warmup) / (n_steps - warmup)`` clipped to [0, 1] and
``r = lr_final_ratio``, cosine ``r + (1 - r) (1 + cos(pi p)) / 2`` or linear ``r + (1 - r) (1 - p)``; the paper
keeps the rate constant (``d_n = 1``).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from ._validate import check_bool, check_choice, check_in_range, check_int, check_positive

__all__ = ["TrainOptions", "warmup_lr", "scheduled_lr", "LR_SCHEDULES", "resolve_amp", "derive_seed"]

_AMP_CHOICES = ("off", "bf16", "fp16", "auto")
LR_SCHEDULES = ("constant", "cosine", "linear")
# Options that define the trajectory: a resumed run must use the same values.
_RUN_DEFINING = ("batch_size", "lr", "beta1", "beta2", "adam_eps", "weight_decay", "warmup", "grad_clip",
                 "ema_rate", "ema_warmup", "amp", "seed", "lr_schedule", "lr_final_ratio")


# ----------------------------------------------------------------------------- options
@dataclass
class TrainOptions:
    """Options of ``train`` (validated on construction; ``ValueError`` names the field).

    Attributes:
        n_steps: total optimiser steps of the run (a resumed run continues up to this count).
        batch_size: global batch size (split evenly over DDP ranks).
        lr, beta1, beta2, adam_eps: Adam (paper: 2e-4, 0.9, 0.999, 1e-8).
        weight_decay: decoupled weight decay (AdamW) if > 0; 0 gives plain Adam.
        warmup: linear learning-rate warm-up steps (0 = none).
        lr_schedule: after warm-up, "constant" (the paper), or "cosine" / "linear" decay to ``lr_final_ratio * lr``
            at ``n_steps`` (then ``n_steps`` also defines the run: a resumed run must keep it).
        lr_final_ratio: the decayed rate at ``n_steps`` as a fraction of ``lr``, in [0, 1].
        grad_clip: max global gradient norm (``None`` = no clipping).
        ema_rate: EMA decay in [0, 1); ema_warmup: use ``min(rate, (1+n)/(10+n))``.
        amp: "off", "bf16" (CPU or CUDA), "fp16" (CUDA only, with a GradScaler) or "auto"
            (CUDA: bf16 where supported else fp16; CPU: off).
        seed: seeds every generator of the run (per rank).
        log_every: steps between metric-log lines / progress-bar updates.
        eval_every: steps between calls of ``eval_fn`` (0 = never; also called at the last step).
        checkpoint_every: steps between checkpoints (0 = only at the end).
        select_metric: key of ``eval_fn``'s dict used to keep ``best.pt`` (``None`` = no selection).
        select_mode: "min" or "max" for ``select_metric``.
        patience: stop after this many evaluations without improvement (0 = never stop early).
    """

    n_steps: int = 10_000
    batch_size: int = 128
    lr: float = 2e-4
    beta1: float = 0.9
    beta2: float = 0.999
    adam_eps: float = 1e-8
    weight_decay: float = 0.0
    warmup: int = 5000
    lr_schedule: str = "constant"
    lr_final_ratio: float = 0.0
    grad_clip: Optional[float] = 1.0
    ema_rate: float = 0.9999
    ema_warmup: bool = True
    amp: str = "off"
    seed: int = 0
    log_every: int = 100
    eval_every: int = 0
    checkpoint_every: int = 0
    select_metric: Optional[str] = None
    select_mode: str = "min"
    patience: int = 0

    def __post_init__(self):
        self.n_steps = check_int("n_steps", self.n_steps, 0)
        self.batch_size = check_int("batch_size", self.batch_size, 1)
        self.lr = check_positive("lr", self.lr)
        self.beta1 = check_in_range("beta1", self.beta1, 0, 1, high_closed=False)
        self.beta2 = check_in_range("beta2", self.beta2, 0, 1, high_closed=False)
        self.adam_eps = check_positive("adam_eps", self.adam_eps)
        self.weight_decay = check_positive("weight_decay", self.weight_decay, allow_zero=True)
        self.warmup = check_int("warmup", self.warmup, 0)
        check_choice("lr_schedule", self.lr_schedule, LR_SCHEDULES)
        self.lr_final_ratio = check_in_range("lr_final_ratio", self.lr_final_ratio, 0, 1)
        self.grad_clip = check_positive("grad_clip", self.grad_clip, optional=True)
        self.ema_rate = check_in_range("ema_rate", self.ema_rate, 0, 1, high_closed=False)
        check_bool("ema_warmup", self.ema_warmup)
        check_choice("amp", self.amp, _AMP_CHOICES)
        self.seed = check_int("seed", self.seed, 0)
        self.log_every = check_int("log_every", self.log_every, 1)
        self.eval_every = check_int("eval_every", self.eval_every, 0)
        self.checkpoint_every = check_int("checkpoint_every", self.checkpoint_every, 0)
        if self.select_metric is not None and not (isinstance(self.select_metric, str) and self.select_metric):
            raise ValueError(f"select_metric must be a non-empty string or None; got {self.select_metric!r}")
        check_choice("select_mode", self.select_mode, ("min", "max"))
        self.patience = check_int("patience", self.patience, 0)
        if self.patience > 0 and (self.select_metric is None or self.eval_every == 0):
            raise ValueError("patience > 0 needs select_metric and eval_every > 0 (early stopping watches an evaluated metric)")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------- learning rate, seeds, precision
def warmup_lr(step: int, base_lr: float, warmup: int) -> float:
    """Learning rate of (0-based) step ``n``: ``lr * min(1, (n + 1) / warmup)``; ``lr`` if ``warmup == 0``."""
    if warmup <= 0:
        return base_lr
    return base_lr * min(1.0, (step + 1) / warmup)


def scheduled_lr(step: int, base_lr: float, warmup: int, n_steps: int, schedule: str = "constant",
                 final_ratio: float = 0.0) -> float:
    """Learning rate of (0-based) step ``n``: ``warmup_lr(n) * d_n`` with the decay ``d_n`` of ``schedule``.

    ``p = clip((n - warmup) / (n_steps - warmup), 0, 1)``, ``r = final_ratio``: "constant" ``d = 1``; "cosine"
    ``d = r + (1 - r) (1 + cos(pi p)) / 2``; "linear" ``d = r + (1 - r) (1 - p)``. So ``d = 1`` to the end of
    warm-up and ``d = r`` at ``n = n_steps``.
    """
    lr = warmup_lr(step, base_lr, warmup)
    if schedule == "constant":
        return lr
    check_choice("schedule", schedule, LR_SCHEDULES)
    span = max(n_steps - warmup, 1)
    p = min(max((step - warmup) / span, 0.0), 1.0)
    shape = 0.5 * (1.0 + math.cos(math.pi * p)) if schedule == "cosine" else 1.0 - p
    return lr * (final_ratio + (1.0 - final_ratio) * shape)


def derive_seed(*keys: int, bits: int = 63) -> int:
    """A well-mixed ``bits``-bit seed for the stream named by the integers ``keys`` (numpy ``SeedSequence``).

    ``derive_seed(seed, rank, stream)`` seeds generator ``stream`` of ``rank`` in ``train`` (63 bits: the top
    63 bits of the first 64-bit word of ``SeedSequence(keys)``); ``bits=32`` gives the first 32-bit word
    ``SeedSequence(keys).generate_state(1, dtype=np.uint32)[0]``. In general: the first word of 32 bits
    (``bits <= 32``) or 64 bits (``bits > 32``), shifted right to keep its top ``bits`` bits.
    """
    if not keys:
        raise ValueError("derive_seed needs at least one key")
    keys = tuple(check_int(f"keys[{i}]", k, 0) for i, k in enumerate(keys))
    bits = check_int("bits", bits, 1)
    if bits > 64:
        raise ValueError(f"bits must be an integer in [1, 64]; got {bits!r}")
    word = 32 if bits <= 32 else 64
    state = np.random.SeedSequence(list(keys)).generate_state(1, dtype=np.uint32 if word == 32 else np.uint64)[0]
    return int(state) >> (word - bits)


def resolve_amp(amp: str, device: torch.device) -> str:
    """The precision actually used: "off", "bf16" or "fp16". Raises ``ValueError`` for fp16 off CUDA."""
    check_choice("amp", amp, _AMP_CHOICES)
    cuda = device.type == "cuda"
    if amp == "auto":
        if not cuda:
            return "off"
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if amp == "fp16" and not cuda:
        raise ValueError(f"amp='fp16' needs a CUDA device (a GradScaler); the model is on {device}. Use 'bf16' or 'off'.")
    if amp == "bf16" and cuda and not torch.cuda.is_bf16_supported():
        raise ValueError(f"amp='bf16' is not supported on {torch.cuda.get_device_name(device)}; use 'fp16' or 'off'")
    return amp
