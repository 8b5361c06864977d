"""Building blocks shared by the score networks: seeded initialisation, time embeddings and the class embedding.

Initialisation is explicit and seeded: every weight is drawn from a ``torch.Generator``
passed in by the network's constructor (``seed`` argument), so the same seed gives the same
network and building a network never touches torch's global random state. The scheme is
score_sde's ``default_init``: variance scaling, ``fan_avg``, uniform::

    W ~ U(-b, b),   b = sqrt(3 * scale / ((fan_in + fan_out) / 2)),   bias = 0

with ``scale = 1`` for ordinary layers and ``scale = 1e-10`` (score_sde's ``init_scale = 0``)
for the last layer of every residual branch and for the network's output layer, so that
residual blocks start as the identity and the network's output starts near zero.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

__all__ = [
    "variance_scaling_",
    "dense",
    "conv2d",
    "group_count",
    "SinusoidalEmbedding",
    "GaussianFourierEmbedding",
    "LabelEmbedding",
    "check_class_labels",
    "ZERO_INIT_SCALE",
]

ZERO_INIT_SCALE = 1e-10  # score_sde's replacement for init_scale = 0


def _fans(weight: torch.Tensor) -> tuple[int, int]:
    receptive = weight[0][0].numel() if weight.dim() > 2 else 1
    return weight.shape[1] * receptive, weight.shape[0] * receptive


@torch.no_grad()
def variance_scaling_(weight: torch.Tensor, scale: float, generator: torch.Generator) -> torch.Tensor:
    """In place: ``W ~ U(-b, b)``, ``b = sqrt(3 scale / fan_avg)``, ``fan_avg = (fan_in + fan_out) / 2``.

    ``weight`` is a Linear ``(out, in)`` or Conv ``(out, in, k, k)`` weight; returns it.
    """
    fan_in, fan_out = _fans(weight)
    bound = math.sqrt(3.0 * scale / ((fan_in + fan_out) / 2.0))
    return weight.uniform_(-bound, bound, generator=generator)


def dense(in_features: int, out_features: int, generator: torch.Generator, scale: float = 1.0) -> nn.Linear:
    """``nn.Linear(in, out)`` with variance-scaling weights (from ``generator``) and zero bias."""
    layer = nn.utils.skip_init(nn.Linear, in_features, out_features)
    variance_scaling_(layer.weight, scale, generator)
    nn.init.zeros_(layer.bias)
    return layer


def conv2d(
    in_channels: int, out_channels: int, kernel_size: int, generator: torch.Generator, scale: float = 1.0, stride: int = 1
) -> nn.Conv2d:
    """``nn.Conv2d`` with 'same' padding (``k // 2``), variance-scaling weights (from ``generator``) and zero bias."""
    layer = nn.utils.skip_init(
        nn.Conv2d, in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2
    )
    variance_scaling_(layer.weight, scale, generator)
    nn.init.zeros_(layer.bias)
    return layer


def group_count(channels: int, num_groups: int) -> int:
    """GroupNorm groups for ``channels``: ``gcd(channels, min(num_groups, max(channels // 4, 1)))``.

    At least 4 channels per group where possible (score_sde's ``min(channels // 4, 32)``), never
    more groups than ``num_groups``, and always a divisor of ``channels`` (e.g. 128 -> 32,
    8 -> 2, 12 -> 3, 3 -> 1).
    """
    return math.gcd(channels, min(num_groups, max(channels // 4, 1)))


def _check_dim(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}; got {value!r}")
    return value


def _check_t_in(t_in: torch.Tensor) -> torch.Tensor:
    if not torch.is_tensor(t_in) or t_in.dim() != 1:
        shape = tuple(t_in.shape) if torch.is_tensor(t_in) else type(t_in).__name__
        raise ValueError(f"t_in must be a 1-d tensor of shape (B,); got {shape}")
    return t_in


class SinusoidalEmbedding(nn.Module):
    """Transformer / DDPM positional embedding of a scalar time input.

    ``emb(t)_k = sin(t w_k)`` for ``k < h`` and ``cos(t w_{k-h})`` for ``h <= k < 2h``, with
    ``h = dim // 2`` and ``w_k = max_period^(-k / (h - 1))`` (so ``w_0 = 1``, ``w_{h-1} = 1 / max_period``;
    DDPM's ``get_timestep_embedding``). An odd ``dim`` gets one trailing zero.
    Meant for inputs on the scale of step indices (``999 t`` or ``i``). No parameters.

    ``forward(t_in (B,)) -> (B, dim)``, in ``t_in``'s floating dtype (integers become the default dtype).
    """

    def __init__(self, dim: int, max_period: float = 10000.0):
        super().__init__()
        self.dim = _check_dim("dim", dim, 2)
        if not (isinstance(max_period, (int, float)) and max_period > 1):
            raise ValueError(f"max_period must be a number > 1; got {max_period!r}")
        self.max_period = float(max_period)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, max_period={self.max_period}"

    def forward(self, t_in: torch.Tensor) -> torch.Tensor:
        t_in = _check_t_in(t_in)
        if not t_in.dtype.is_floating_point:
            t_in = t_in.to(torch.get_default_dtype())
        half = self.dim // 2
        k = torch.arange(half, device=t_in.device, dtype=t_in.dtype)
        freqs = torch.exp(-math.log(self.max_period) * k / max(half - 1, 1))
        args = t_in[:, None] * freqs[None, :]
        emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
        if self.dim % 2:
            emb = nn.functional.pad(emb, (0, 1))
        return emb


class GaussianFourierEmbedding(nn.Module):
    """Random Fourier features of a scalar time input (NCSN++; Tancik et al. 2020).

    ``emb(t) = [sin(2 pi v W), cos(2 pi v W)]`` with fixed ``W ~ N(0, scale^2)`` of size ``dim // 2``
    (a registered buffer: saved in the state dict, moved by ``.to()``, never trained) and
    ``v = log(max(t, LOG_FLOOR))`` if ``log_input`` (default, as NCSN++ embeds ``log sigma``) else ``v = t``.
    The floor (1e-8) only keeps ``t_in = 0`` (discrete step 0) finite. ``log_input`` suits inputs spanning
    orders of magnitude (``sigma(t)`` for VE, ``999 t`` for VP); without it, ``scale = 16`` is far too high a
    frequency for inputs larger than about 1. An odd ``dim`` gets one trailing zero.
    ``W`` is drawn from ``torch.Generator().manual_seed(seed)``.

    ``forward(t_in (B,)) -> (B, dim)``, in ``t_in``'s floating dtype.
    """

    LOG_FLOOR = 1e-8

    def __init__(self, dim: int, scale: float = 16.0, log_input: bool = True, seed: int = 0):
        super().__init__()
        self.dim = _check_dim("dim", dim, 2)
        if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
            raise ValueError(f"scale must be a finite number > 0; got {scale!r}")
        if not isinstance(log_input, bool):
            raise TypeError(f"log_input must be a bool; got {log_input!r}")
        self.scale = float(scale)
        self.log_input = log_input
        g = torch.Generator().manual_seed(int(seed))
        self.register_buffer("W", torch.randn(dim // 2, generator=g) * self.scale)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, scale={self.scale}, log_input={self.log_input}"

    def forward(self, t_in: torch.Tensor) -> torch.Tensor:
        t_in = _check_t_in(t_in)
        if not t_in.dtype.is_floating_point:
            t_in = t_in.to(torch.get_default_dtype())
        v = torch.log(t_in.clamp_min(self.LOG_FLOOR)) if self.log_input else t_in
        args = 2 * math.pi * v[:, None] * self.W.to(t_in.dtype)[None, :]
        emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
        if self.dim % 2:
            emb = nn.functional.pad(emb, (0, 1))
        return emb


def make_time_embedding(kind: str, dim: int, fourier_scale: float, seed: int) -> nn.Module:
    """``SinusoidalEmbedding(dim)`` for ``kind="sinusoidal"``, ``GaussianFourierEmbedding(dim, fourier_scale)`` for ``"fourier"``."""
    if kind == "sinusoidal":
        return SinusoidalEmbedding(dim)
    if kind == "fourier":
        return GaussianFourierEmbedding(dim, scale=fourier_scale, seed=seed)
    raise ValueError(f"time_embedding must be one of 'sinusoidal', 'fourier'; got {kind!r}")


def _integer_dtype(dtype: torch.dtype) -> bool:
    return not (dtype.is_floating_point or dtype.is_complex or dtype == torch.bool)


def check_class_labels(class_labels, num_classes: Optional[int], batch: int, owner: str) -> None:
    """Validate a network's ``class_labels`` input: ``None``, or an integer tensor of shape ``(batch,)`` with values in
    ``[0, num_classes]`` (``num_classes`` is the null label). ``ValueError`` naming ``num_classes`` when the network
    ``owner`` (its class name) is unconditional (``num_classes`` None), naming ``class_labels`` otherwise.

    The range check reads the labels' min and max (one device sync); it is skipped while tracing or compiling.
    """
    if class_labels is None:
        return
    if num_classes is None:
        raise ValueError(f"class_labels needs a network built with num_classes set (this {owner} is unconditional)")
    if not torch.is_tensor(class_labels) or class_labels.shape != (batch,) or not _integer_dtype(class_labels.dtype):
        got = (f"a {class_labels.dtype} tensor of shape {tuple(class_labels.shape)}" if torch.is_tensor(class_labels)
               else type(class_labels).__name__)
        raise ValueError(f"class_labels must be an integer tensor of shape (B,) = ({batch},); got {got}")
    if batch and not torch.jit.is_tracing() and not torch.compiler.is_compiling():
        lo, hi = (int(v) for v in torch.aminmax(class_labels))
        if lo < 0 or hi > num_classes:
            raise ValueError(f"class_labels must lie in [0, num_classes] = [0, {num_classes}] (label {num_classes} is the "
                             f"null class); got values in [{lo}, {hi}]")


class LabelEmbedding(nn.Embedding):
    """Learned class embedding with a null class, added to a network's time embedding (classifier-free guidance).

    A table ``E`` of ``num_classes + 1`` rows of width ``dim``: label ``k`` in ``[0, num_classes)`` is class ``k``, the
    last row (label ``num_classes``) is the *null class* (unconditional). ``forward(class_labels (B,) or None, batch)
    -> E[class_labels] (B, dim)``; ``None`` means the null class for every sample. Parameter name ``weight`` (an
    ``nn.Embedding``). Validate the labels first with ``check_class_labels``.

    Initialisation: ``std = 0`` (default) gives zero rows, so a fresh conditional network computes exactly the
    unconditional one (the table draws nothing from ``generator``, so every other weight is the same as without it);
    the table enters additively, so its gradient does not depend on its value and the rows train from the first step.
    ``std > 0`` draws ``N(0, std^2)`` from ``generator`` (DiT: 0.02).
    """

    def __init__(self, num_classes: int, dim: int, generator: Optional[torch.Generator] = None, std: float = 0.0):
        num_classes = _check_dim("num_classes", num_classes)
        _check_dim("dim", dim)
        if isinstance(std, bool) or not isinstance(std, (int, float)) or not (math.isfinite(std) and std >= 0):
            raise ValueError(f"std must be a finite number >= 0; got {std!r}")
        super().__init__(num_classes + 1, dim, _weight=torch.zeros(num_classes + 1, dim))
        self.num_classes = num_classes
        if std > 0:
            with torch.no_grad():
                self.weight.normal_(0.0, float(std), generator=generator)

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes} (+1 null), dim={self.embedding_dim}"

    def forward(self, class_labels: Optional[torch.Tensor], batch: Optional[int] = None) -> torch.Tensor:
        if class_labels is None:
            if batch is None:
                raise ValueError("batch must be given when class_labels is None (the null class for every sample)")
            class_labels = torch.full((batch,), self.num_classes, dtype=torch.long, device=self.weight.device)
        return super().forward(class_labels.long())
