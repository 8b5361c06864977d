"""Noise-conditional classifiers ``f(x_t, t_in) -> (B, K)`` logits of ``p_t(y | x_t)``, for classifier guidance.

Song et al. (2021), Section 5 and Appendix I.1, guide a score model with ``grad_x log p_t(y | x)`` of a classifier
trained on perturbed data ``x_t = m(t) x_0 + s(t) z`` at every ``t``; Dhariwal & Nichol (2021) do the same with the
encoder half of their U-Net. These are small networks of that kind, sized for CPU training:

* ``ConvClassifier`` (images ``(B, C, H, W)``)::

      temb = SiLU(Dense(SiLU(Dense(emb(t_in)))))
      h = conv3x3(x)  (C -> ch)
      level l = 0..L-1: (avgpool 2x2 if l > 0), num_res_blocks x ResBlock(c_l),   c_l = ch * ch_mult[l]
      logits = Dense(mean_{H,W} SiLU(GN(h)))                                  (c_{L-1} -> K)

  with ResBlock ``h = conv3x3(SiLU(GN(x))) + Dense(temb)``; ``h = conv3x3(drop(SiLU(GN(h))))``;
  ``out = (skip(x) + h) / sqrt(2)`` (``skip`` a 1x1 conv when the width changes; the branch's last conv starts near
  zero, so each block starts as the identity);
* ``MLPClassifier`` (vectors ``(B, D)``, or any ``(B, *dims)`` with ``prod(dims) = D``, flattened)::

      temb = Dense(SiLU(Dense(emb(t_in))));  h = Dense(x)
      depth x  h <- h + W_2 drop(SiLU(W_1 SiLU(h) + D SiLU(temb)))
      logits = Dense(SiLU(h))                                                 (hidden -> K)

Time input ``t_in`` (the score networks' convention, ``ScoreModel.net_time``): ``999 t`` for continuous VP / sub-VP
(``time_embedding="sinusoidal"``), ``sigma(t)`` for VE (``"fourier"``: Gaussian Fourier features of ``log sigma``).
``scoresde.classifier.NoiseConditionalClassifier`` computes it (and scales the input) from ``t`` and the SDE.
Weights are drawn from ``torch.Generator().manual_seed(seed)`` (``layers``' variance-scaling initialisation).
"""

from __future__ import annotations

import math
from typing import Tuple

import torch
from torch import nn
from torch.nn import functional as F

from .layers import ZERO_INIT_SCALE, _check_dim, conv2d, dense, group_count, make_time_embedding
from .mlp import _check_dropout

__all__ = ["ConvClassifier", "MLPClassifier", "CLASSIFIER_TIME_EMBEDDINGS"]

CLASSIFIER_TIME_EMBEDDINGS = ("sinusoidal", "fourier")


def _check_embedding(time_embedding, fourier_scale) -> float:
    if time_embedding not in CLASSIFIER_TIME_EMBEDDINGS:
        raise ValueError(f"time_embedding must be one of {CLASSIFIER_TIME_EMBEDDINGS}; got {time_embedding!r}")
    if isinstance(fourier_scale, bool) or not isinstance(fourier_scale, (int, float)) or not (
            math.isfinite(fourier_scale) and fourier_scale > 0):
        raise ValueError(f"fourier_scale must be a finite number > 0; got {fourier_scale!r}")
    return float(fourier_scale)


def _check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0; got {seed!r}")
    return seed


def _check_t_in(t_in, B: int) -> None:
    if not torch.is_tensor(t_in) or t_in.shape != (B,):
        shape = tuple(t_in.shape) if torch.is_tensor(t_in) else type(t_in).__name__
        raise ValueError(f"t_in must have shape (B,) = ({B},); got {shape}")


class _ResBlock(nn.Module):
    """``(B, c_in, H, W), temb (B, T) -> (B, c_out, H, W)``; the time embedding is added after the first conv."""

    def __init__(self, c_in: int, c_out: int, temb_dim: int, dropout: float, num_groups: int, g: torch.Generator):
        super().__init__()
        self.act = nn.SiLU()
        self.norm0 = nn.GroupNorm(group_count(c_in, num_groups), c_in, eps=1e-6)
        self.conv0 = conv2d(c_in, c_out, 3, g)
        self.temb_proj = dense(temb_dim, c_out, g)
        self.norm1 = nn.GroupNorm(group_count(c_out, num_groups), c_out, eps=1e-6)
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv1 = conv2d(c_out, c_out, 3, g, scale=ZERO_INIT_SCALE)
        self.skip = conv2d(c_in, c_out, 1, g) if c_in != c_out else None

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv0(self.act(self.norm0(x))) + self.temb_proj(temb)[:, :, None, None]
        h = self.conv1(self.drop(self.act(self.norm1(h))))
        if self.skip is not None:
            x = self.skip(x)
        return (x + h) * (1 / math.sqrt(2.0))


class ConvClassifier(nn.Module):
    """Convolutional noise-conditional classifier (layout in the module docstring).

    Args:
        in_channels: image channels ``C``.
        image_size: nominal side ``H = W``; must be divisible by ``2^(len(ch_mult) - 1)`` (so must the inputs').
        num_classes: ``K``, the number of logits.
        ch: base width; level ``l`` has ``ch * ch_mult[l]`` channels.
        ch_mult: channel multipliers, one per level (a 2x2 average pool between levels).
        num_res_blocks: ResBlocks per level.
        dropout: dropout rate in the ResBlocks, in [0, 1) (torch's global random state in training mode).
        time_embedding: ``"sinusoidal"`` (``t_in = 999 t``; VP / sub-VP) or ``"fourier"`` (``log t_in``; VE).
        fourier_scale: std of the Fourier frequencies (``"fourier"`` only).
        num_groups: maximum GroupNorm groups (``group_count`` adapts it to small widths).
        seed: weights from ``torch.Generator().manual_seed(seed)``.

    ``forward(x (B, C, H, W), t_in (B,)) -> logits (B, K)``.
    """

    def __init__(self, in_channels: int = 1, image_size: int = 8, num_classes: int = 10, ch: int = 32,
                 ch_mult: Tuple[int, ...] = (1, 2), num_res_blocks: int = 1, dropout: float = 0.0,
                 time_embedding: str = "sinusoidal", fourier_scale: float = 16.0, num_groups: int = 8, seed: int = 0):
        super().__init__()
        self.in_channels = _check_dim("in_channels", in_channels)
        self.image_size = _check_dim("image_size", image_size)
        self.num_classes = _check_dim("num_classes", num_classes, 2)
        _check_dim("ch", ch)
        try:
            self.ch_mult = tuple(ch_mult)
        except TypeError:
            self.ch_mult = ()
        if not self.ch_mult or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in self.ch_mult):
            raise ValueError(f"ch_mult must be a non-empty sequence of positive integers; got {ch_mult!r}")
        _check_dim("num_res_blocks", num_res_blocks)
        dropout = _check_dropout(dropout)
        fourier_scale = _check_embedding(time_embedding, fourier_scale)
        _check_dim("num_groups", num_groups)
        _check_seed(seed)
        self.factor = 2 ** (len(self.ch_mult) - 1)
        if image_size % self.factor:
            raise ValueError(f"image_size must be divisible by 2^(len(ch_mult)-1) = {self.factor} (ch_mult={self.ch_mult}); "
                             f"got {image_size}")
        g = torch.Generator().manual_seed(int(seed))
        temb_dim = 4 * ch
        embed_dim = ch if time_embedding == "sinusoidal" else 2 * ch
        self.embed = make_time_embedding(time_embedding, embed_dim, fourier_scale, seed)
        self.temb = nn.Sequential(dense(embed_dim, temb_dim, g), nn.SiLU(), dense(temb_dim, temb_dim, g), nn.SiLU())
        self.conv_in = conv2d(in_channels, ch, 3, g)
        widths = [ch * m for m in self.ch_mult]
        self.levels = nn.ModuleList()
        c_prev = ch
        for c in widths:
            blocks = nn.ModuleList(_ResBlock(c_prev if i == 0 else c, c, temb_dim, dropout, num_groups, g)
                                   for i in range(num_res_blocks))
            self.levels.append(blocks)
            c_prev = c
        self.norm_out = nn.GroupNorm(group_count(widths[-1], num_groups), widths[-1], eps=1e-6)
        self.act = nn.SiLU()
        self.head = dense(widths[-1], self.num_classes, g)

    def forward(self, x: torch.Tensor, t_in: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"x must have shape (B, C, H, W) with C = in_channels = {self.in_channels}; got {tuple(x.shape)}")
        if x.shape[2] % self.factor or x.shape[3] % self.factor:
            raise ValueError(f"x's height and width must be divisible by 2^(len(ch_mult)-1) = {self.factor}; "
                             f"got {tuple(x.shape[2:])}")
        _check_t_in(t_in, x.shape[0])
        temb = self.temb(self.embed(t_in.to(x.dtype)))
        h = self.conv_in(x)
        for lvl, blocks in enumerate(self.levels):
            if lvl:
                h = F.avg_pool2d(h, 2)
            for block in blocks:
                h = block(h, temb)
        return self.head(self.act(self.norm_out(h)).mean(dim=(2, 3)))


class _MLPBlock(nn.Module):
    """``h + W_2 drop(SiLU(W_1 SiLU(h) + D SiLU(temb)))``; ``W_2`` starts near zero (block ~ identity)."""

    def __init__(self, hidden: int, dropout: float, g: torch.Generator):
        super().__init__()
        self.act = nn.SiLU()
        self.lin0 = dense(hidden, hidden, g)
        self.temb_proj = dense(hidden, hidden, g)
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lin1 = dense(hidden, hidden, g, scale=ZERO_INIT_SCALE)

    def forward(self, h: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        return h + self.lin1(self.drop(self.act(self.lin0(self.act(h)) + self.temb_proj(self.act(temb)))))


class MLPClassifier(nn.Module):
    """Residual-MLP noise-conditional classifier for vectors (layout in the module docstring).

    Args:
        dim: input dimension ``D`` (inputs ``(B, D)`` or ``(B, *dims)`` with ``prod(dims) = D``).
        num_classes: ``K``.
        hidden, depth: width and number of residual blocks.
        time_embedding: ``"sinusoidal"`` (``t_in = 999 t``) or ``"fourier"`` (``log t_in``, for ``t_in = sigma``).
        embed_dim: width of the time embedding before its MLP.
        fourier_scale: std of the Fourier frequencies (``"fourier"`` only).
        dropout: in [0, 1).
        seed: weights from ``torch.Generator().manual_seed(seed)``.

    ``forward(x (B, ...), t_in (B,)) -> logits (B, K)``.
    """

    def __init__(self, dim: int, num_classes: int = 10, hidden: int = 128, depth: int = 2,
                 time_embedding: str = "sinusoidal", embed_dim: int = 64, fourier_scale: float = 16.0,
                 dropout: float = 0.0, seed: int = 0):
        super().__init__()
        self.dim = _check_dim("dim", dim)
        self.num_classes = _check_dim("num_classes", num_classes, 2)
        _check_dim("hidden", hidden)
        _check_dim("depth", depth, 0)
        _check_dim("embed_dim", embed_dim, 2)
        dropout = _check_dropout(dropout)
        fourier_scale = _check_embedding(time_embedding, fourier_scale)
        _check_seed(seed)
        g = torch.Generator().manual_seed(int(seed))
        self.embed = make_time_embedding(time_embedding, embed_dim, fourier_scale, seed)
        self.temb = nn.Sequential(dense(embed_dim, hidden, g), nn.SiLU(), dense(hidden, hidden, g))
        self.inp = dense(dim, hidden, g)
        self.blocks = nn.ModuleList(_MLPBlock(hidden, dropout, g) for _ in range(depth))
        self.out = nn.Sequential(nn.SiLU(), dense(hidden, self.num_classes, g))

    def forward(self, x: torch.Tensor, t_in: torch.Tensor) -> torch.Tensor:
        if x.dim() < 2 or x[0].numel() != self.dim:
            raise ValueError(f"x must have shape (B, D) or (B, *dims) with prod(dims) = D = {self.dim}; got {tuple(x.shape)}")
        _check_t_in(t_in, x.shape[0])
        temb = self.temb(self.embed(t_in.to(x.dtype)))
        h = self.inp(x.reshape(x.shape[0], self.dim))
        for block in self.blocks:
            h = block(h, temb)
        return self.out(h)
