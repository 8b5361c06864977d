"""A small convolutional U-Net score network sized for a laptop CPU (8x8 digits; 28x28 MNIST, 32x32 CIFAR-10 wider).

Layout (``L = len(ch_mult)`` levels, level ``l`` at side ``image_size / 2^l`` with ``c_l = ch * ch_mult[l]`` channels)::

    x -> conv3x3 (C -> ch)
      -> level 0: num_res_blocks x ResBlock(c_0)                              -> skip_0
      -> level l = 1..L-1: avgpool 2x2, num_res_blocks x ResBlock(c_l)        -> skip_l
         (ResBlocks at a side in attn_resolutions are followed by self-attention)
      -> level l = L-2..0: nearest 2x, concat skip_l, num_res_blocks x ResBlock(c_l) (the first one takes c_{l+1} + c_l)
      -> GroupNorm, SiLU, conv3x3 (ch -> C)

One skip connection per level (not one per block as in DDPM's U-Net) and parameter-free resampling: on a CPU
the cost is the 3x3 convolutions, and this layout spends them where they pay (about half of ``UNet``'s
convolutions at the same widths). ResBlock (BigGAN / DDPM++ with scale-shift time conditioning)::

    h = conv3x3(SiLU(GN(x)));  h = GN(h) * (1 + scale(temb)) + shift(temb);  h = conv3x3(drop(SiLU(h)))
    out = (skip(x) + h) / sqrt(2)          (skip a 1x1 conv when the channel count changes)

with the last conv of every branch and the output conv starting near zero (``layers.ZERO_INIT_SCALE``), so the
network starts as ``f ~ 0``. Time: ``temb = SiLU(Dense(SiLU(Dense(emb(t_in)))))``, ``emb`` sinusoidal (for
``t_in = 999 t``) or Gaussian Fourier of ``log t_in`` (for ``t_in = sigma``), ``4 ch`` wide. Class conditioning
(``num_classes = K``): ``temb = SiLU(Dense(SiLU(Dense(emb(t_in)))) + E[y])`` with ``E`` a ``layers.LabelEmbedding``
(``K + 1`` rows, the last the null class, zero at initialisation), i.e. added after the time MLP and before the
SiLU that every block's ``scale, shift`` projection would otherwise apply.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import nn
from torch.nn import functional as F

from .layers import (ZERO_INIT_SCALE, LabelEmbedding, _check_dim, check_class_labels, conv2d, dense, group_count,
                     make_time_embedding)
from .mlp import _check_dropout

__all__ = ["ConvScoreNet"]

TIME_EMBEDDINGS = ("sinusoidal", "fourier")
SKIP_MODES = ("add", "cat")


class _ResBlock(nn.Module):
    """``(B, c_in, H, W), temb (B, T) -> (B, c_out, H, W)``; see the module docstring."""

    def __init__(self, c_in: int, c_out: int, temb_dim: int, dropout: float, num_groups: int, g: torch.Generator):
        super().__init__()
        self.act = nn.SiLU()
        self.norm0 = nn.GroupNorm(group_count(c_in, num_groups), c_in, eps=1e-6)
        self.conv0 = conv2d(c_in, c_out, 3, g)
        self.temb_proj = dense(temb_dim, 2 * c_out, g)
        self.norm1 = nn.GroupNorm(group_count(c_out, num_groups), c_out, eps=1e-6)
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv1 = conv2d(c_out, c_out, 3, g, scale=ZERO_INIT_SCALE)
        self.skip = conv2d(c_in, c_out, 1, g) if c_in != c_out else None

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv0(self.act(self.norm0(x)))
        scale, shift = self.temb_proj(temb)[:, :, None, None].chunk(2, dim=1)
        h = torch.addcmul(shift, self.norm1(h), 1 + scale)
        h = self.conv1(self.drop(self.act(h)))
        if self.skip is not None:
            x = self.skip(x)
        return (x + h) * (1 / math.sqrt(2.0))


class _AttnBlock(nn.Module):
    """Single-head self-attention over the ``H W`` positions with a residual connection. ``(B, C, H, W) -> same``."""

    def __init__(self, c: int, num_groups: int, g: torch.Generator):
        super().__init__()
        self.norm = nn.GroupNorm(group_count(c, num_groups), c, eps=1e-6)
        self.qkv = conv2d(c, 3 * c, 1, g)
        self.out = conv2d(c, c, 1, g, scale=ZERO_INIT_SCALE)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(B, 3, C, H * W).transpose(2, 3).unbind(1)  # (B, HW, C) each
        h = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, C, H, W)
        return (x + self.out(h)) * (1 / math.sqrt(2.0))


class _Stage(nn.Module):
    """``num_res_blocks`` ResBlocks, each followed by attention when ``attn``."""

    def __init__(self, c_in: int, c_out: int, n: int, attn: bool, temb_dim: int, dropout: float, num_groups: int, g):
        super().__init__()
        self.blocks = nn.ModuleList(_ResBlock(c_in if i == 0 else c_out, c_out, temb_dim, dropout, num_groups, g) for i in range(n))
        self.attns = nn.ModuleList(_AttnBlock(c_out, num_groups, g) if attn else nn.Identity() for _ in range(n))

    def forward(self, h: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        for block, attn in zip(self.blocks, self.attns):
            h = attn(block(h, temb))
        return h


def _check_tuple(name: str, value, allow_empty: bool = False) -> Tuple[int, ...]:
    try:
        vals = tuple(value)
    except TypeError:
        vals = None
    if vals is None or (not vals and not allow_empty) or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in vals):
        kind = "a possibly empty" if allow_empty else "a non-empty"
        raise ValueError(f"{name} must be {kind} sequence of positive integers; got {value!r}")
    return vals


class ConvScoreNet(nn.Module):
    """Small convolutional U-Net ``f(x, t_in)`` for images, sized for CPU training (layout in the module docstring).

    Args:
        in_channels: image channels ``C`` (input and output).
        image_size: nominal side ``H = W``; fixes which levels get attention. Must be divisible by
            ``2^(len(ch_mult) - 1)``; inputs of other sides divisible by it are accepted.
        ch: base width; level ``l`` has ``ch * ch_mult[l]`` channels.
        ch_mult: channel multipliers, one per level (resolution).
        num_res_blocks: ResBlocks per level on the way down and on the way up.
        attn_resolutions: sides at which every ResBlock is followed by self-attention (``()``: none).
        dropout: dropout rate inside ResBlocks, in [0, 1) (torch's global random state in training mode).
        time_embedding: ``"sinusoidal"`` (for ``t_in = 999 t``, VP / sub-VP) or ``"fourier"`` (embeds
            ``log t_in``; for ``t_in = sigma``, VE).
        fourier_scale: std of the Fourier frequencies (``time_embedding="fourier"`` only).
        num_groups: maximum GroupNorm groups (``group_count`` adapts it to small channel counts).
        skip: ``"add"`` (1x1 projection added to the skip) or ``"cat"`` (concatenated) on the way up.
        aug_cond: take an augmentation level ``aug_level (B,)`` (``>= 0``; 0 = not augmented) as an extra input.
        num_classes: ``None`` (unconditional: no table, no new parameters) or ``K``, the number of classes: a
            ``LabelEmbedding`` of ``K + 1`` rows of width ``4 ch`` (the last row, label ``K``, the null class).
        seed: weights are drawn from ``torch.Generator().manual_seed(seed)``.

    ``forward(x (B, C, H, W), t_in (B,), aug_level (B,) or None, class_labels (B,) int in [0, K] or None)
    -> (B, C, H, W)``, ``t_in`` the network time of ``ScoreModel.net_time`` (``999 t`` for VP, ``sigma(t)`` for VE);
    ``class_labels=None`` is the null class.
    """

    def __init__(
        self,
        in_channels: int = 1,
        image_size: int = 8,
        ch: int = 32,
        ch_mult: Tuple[int, ...] = (1, 2),
        num_res_blocks: int = 1,
        attn_resolutions: Tuple[int, ...] = (),
        dropout: float = 0.1,
        time_embedding: str = "sinusoidal",
        fourier_scale: float = 16.0,
        num_groups: int = 8,
        skip: str = "add",
        aug_cond: bool = False,
        num_classes: Optional[int] = None,
        seed: int = 0,
    ):
        super().__init__()
        self.in_channels = _check_dim("in_channels", in_channels)
        self.image_size = _check_dim("image_size", image_size)
        _check_dim("ch", ch)
        self.ch_mult = _check_tuple("ch_mult", ch_mult)
        _check_dim("num_res_blocks", num_res_blocks)
        self.attn_resolutions = _check_tuple("attn_resolutions", attn_resolutions, allow_empty=True)
        dropout = _check_dropout(dropout)
        if time_embedding not in TIME_EMBEDDINGS:
            raise ValueError(f"time_embedding must be one of {TIME_EMBEDDINGS}; got {time_embedding!r}")
        if isinstance(fourier_scale, bool) or not isinstance(fourier_scale, (int, float)) or not (math.isfinite(fourier_scale) and fourier_scale > 0):
            raise ValueError(f"fourier_scale must be a finite number > 0; got {fourier_scale!r}")
        _check_dim("num_groups", num_groups)
        if skip not in SKIP_MODES:
            raise ValueError(f"skip must be one of {SKIP_MODES}; got {skip!r}")
        self.num_classes = None if num_classes is None else _check_dim("num_classes", num_classes)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an integer; got {seed!r}")
        L = len(self.ch_mult)
        self.factor = 2 ** (L - 1)
        if image_size % self.factor:
            raise ValueError(
                f"image_size must be divisible by 2^(len(ch_mult)-1) = {self.factor} (ch_mult={self.ch_mult}); got {image_size}"
            )
        g = torch.Generator().manual_seed(int(seed))
        temb_dim = 4 * ch
        embed_dim = ch if time_embedding == "sinusoidal" else 2 * ch
        self.embed = make_time_embedding(time_embedding, embed_dim, float(fourier_scale), seed)
        self.aug_cond = aug_cond
        if aug_cond:
            self.aug_embed = make_time_embedding("fourier", embed_dim, 1.0, seed + 1)
            self.aug_map = dense(embed_dim, embed_dim, g)
        self.temb = nn.Sequential(dense(embed_dim, temb_dim, g), nn.SiLU(), dense(temb_dim, temb_dim, g), nn.SiLU())
        if num_classes is not None:
            self.label_embed = LabelEmbedding(num_classes, temb_dim)
        widths = [ch * m for m in self.ch_mult]
        self.conv_in = conv2d(in_channels, ch, 3, g)
        stage = lambda c_in, c_out, lvl: _Stage(c_in, c_out, num_res_blocks, image_size // 2**lvl in self.attn_resolutions,
                                                temb_dim, dropout, num_groups, g)
        self.down = nn.ModuleList(stage(widths[l - 1] if l else ch, widths[l], l) for l in range(L))
        self.skip_mode = skip
        if skip == "add":
            self.proj = nn.ModuleList(conv2d(widths[l + 1], widths[l], 1, g) for l in reversed(range(L - 1)))
            self.up = nn.ModuleList(stage(widths[l], widths[l], l) for l in reversed(range(L - 1)))
        else:
            self.up = nn.ModuleList(stage(widths[l + 1] + widths[l], widths[l], l) for l in reversed(range(L - 1)))
        self.norm_out = nn.GroupNorm(group_count(widths[0], num_groups), widths[0], eps=1e-6)
        self.conv_out = conv2d(widths[0], in_channels, 3, g, scale=ZERO_INIT_SCALE)
        self.act = nn.SiLU()

    def _time_embedding(self, emb: torch.Tensor, class_labels: Optional[torch.Tensor]) -> torch.Tensor:
        """``SiLU(Dense(SiLU(Dense(emb))) [+ E[class_labels or the null class]])``: ``(B, embed_dim) -> (B, 4 ch)``."""
        if self.num_classes is None:
            return self.temb(emb)
        *mlp, act = self.temb
        for layer in mlp:
            emb = layer(emb)
        return act(emb + self.label_embed(class_labels, emb.shape[0]))

    def forward(self, x: torch.Tensor, t_in: torch.Tensor, aug_level: Optional[torch.Tensor] = None,
                class_labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"x must have shape (B, C, H, W) with C = in_channels = {self.in_channels}; got {tuple(x.shape)}")
        if x.shape[2] % self.factor or x.shape[3] % self.factor:
            raise ValueError(f"x's height and width must be divisible by 2^(len(ch_mult)-1) = {self.factor}; got {tuple(x.shape[2:])}")
        if not torch.is_tensor(t_in) or t_in.shape != (x.shape[0],):
            shape = tuple(t_in.shape) if torch.is_tensor(t_in) else type(t_in).__name__
            raise ValueError(f"t_in must have shape (B,) = ({x.shape[0]},); got {shape}")
        check_class_labels(class_labels, self.num_classes, x.shape[0], type(self).__name__)
        emb = self.embed(t_in.to(x.dtype))
        if aug_level is not None:
            if not self.aug_cond:
                raise ValueError("aug_level needs a network built with aug_cond=True")
            a = aug_level.to(x.dtype)
            emb = emb + (a > 0).to(x.dtype)[:, None] * self.aug_map(self.aug_embed(a))
        temb = self._time_embedding(emb, class_labels)
        h = self.conv_in(x)
        skips = []
        for lvl, stage in enumerate(self.down):
            if lvl:
                h = F.avg_pool2d(h, 2)
            h = stage(h, temb)
            skips.append(h)
        skips.pop()
        for i, stage in enumerate(self.up):
            if self.skip_mode == "add":
                h = (F.interpolate(self.proj[i](h), scale_factor=2, mode="nearest") + skips.pop()) * (1 / math.sqrt(2.0))
                h = stage(h, temb)
            else:
                h = F.interpolate(h, scale_factor=2, mode="nearest")
                h = stage(torch.cat([h, skips.pop()], dim=1), temb)
        return self.conv_out(self.act(self.norm_out(h)))
