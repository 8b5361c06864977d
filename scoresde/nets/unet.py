"""U-Net score network for images in the DDPM++ style (Song et al. 2021, App. H; Ho et al. 2020).

Layout (``L = len(ch_mult)`` resolutions ``image_size / 2^l``)::

    x -> conv3x3 -> [level l: num_res_blocks x (ResBlock(-> ch*ch_mult[l]) [+ Attn if res in attn_resolutions]),
                     Down if l < L-1]
      -> ResBlock, Attn, ResBlock
      -> [level l reversed: (num_res_blocks + 1) x ResBlock(concat skip), [Attn], Up if l > 0]
      -> GroupNorm, SiLU, conv3x3 -> output (same shape as x)

Every output of the down path (including the first conv and the downsamplers) is a skip
connection consumed, last-in first-out, by one up-path ResBlock (DDPM / NCSN++ layout).
ResBlock: ``h = conv(SiLU(GN(x))); h += Dense(SiLU(temb)); h = conv(drop(SiLU(GN(h))));
out = (skip(x) + h) / sqrt(2)`` with ``skip_rescale`` (else ``skip(x) + h``); ``skip`` is a 1x1 conv
when channels or resolution change. Attention: single-head self-attention over the ``H W`` positions
with a residual connection (also rescaled by ``1/sqrt(2)`` with ``skip_rescale``).
Resampling: with ``resblock_updown`` (default; DDPM++ and NCSN++ use BigGAN-style blocks) a
ResBlock that average-pools / nearest-upsamples inside; otherwise DDPM's Downsample (stride-2 conv
if ``resamp_with_conv`` else 2x2 average pool) and Upsample (nearest, then conv3x3 if ``resamp_with_conv``).
Time embedding: ``temb = Dense(SiLU(Dense(emb(t_in))))`` with ``emb`` sinusoidal (``ch`` wide) or
Gaussian Fourier (``2 ch`` wide, as NCSN++), ``temb`` ``4 ch`` wide. Class conditioning (``num_classes = K``):
``temb <- temb + E[y]`` with ``E`` a ``layers.LabelEmbedding`` (``K + 1`` rows, the last the null class, zero at
initialisation), before every block's ``Dense(SiLU(temb))``.
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

__all__ = ["UNet"]


class ResBlock(nn.Module):
    """DDPM++ residual block with time injection, optionally up- or down-sampling (BigGAN style).

    ``forward(x (B, C_in, H, W), temb (B, temb_dim)) -> (B, C_out, H', W')`` with ``H' = 2H`` (up),
    ``H/2`` (down) or ``H``.
    """

    def __init__(self, in_ch, out_ch, temb_dim, dropout, skip_rescale, num_groups, g, up=False, down=False):
        super().__init__()
        self.up, self.down, self.skip_rescale = up, down, skip_rescale
        self.act = nn.SiLU()
        self.norm0 = nn.GroupNorm(group_count(in_ch, num_groups), in_ch, eps=1e-6)
        self.conv0 = conv2d(in_ch, out_ch, 3, g)
        self.temb_proj = dense(temb_dim, out_ch, g)
        self.norm1 = nn.GroupNorm(group_count(out_ch, num_groups), out_ch, eps=1e-6)
        self.drop = nn.Dropout(dropout)
        self.conv1 = conv2d(out_ch, out_ch, 3, g, scale=ZERO_INIT_SCALE)
        self.skip = conv2d(in_ch, out_ch, 1, g) if (in_ch != out_ch or up or down) else None

    def _resample(self, x: torch.Tensor) -> torch.Tensor:
        if self.up:
            return F.interpolate(x, scale_factor=2, mode="nearest")
        if self.down:
            return F.avg_pool2d(x, 2)
        return x

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.act(self.norm0(x))
        h = self._resample(h)
        x = self._resample(x)
        h = self.conv0(h)
        h = h + self.temb_proj(self.act(temb))[:, :, None, None]
        h = self.conv1(self.drop(self.act(self.norm1(h))))
        if self.skip is not None:
            x = self.skip(x)
        out = x + h
        return out / math.sqrt(2.0) if self.skip_rescale else out


class AttnBlock(nn.Module):
    """Self-attention over spatial positions: ``x + W_o softmax(q^T k / sqrt(C)) v`` (q, k, v 1x1 convs of GN(x)).

    ``forward(x (B, C, H, W)) -> (B, C, H, W)``.
    """

    def __init__(self, ch, skip_rescale, num_groups, g):
        super().__init__()
        self.skip_rescale = skip_rescale
        self.norm = nn.GroupNorm(group_count(ch, num_groups), ch, eps=1e-6)
        self.q = conv2d(ch, ch, 1, g)
        self.k = conv2d(ch, ch, 1, g)
        self.v = conv2d(ch, ch, 1, g)
        self.out = conv2d(ch, ch, 1, g, scale=ZERO_INIT_SCALE)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.norm(x)
        q, k, v = (proj(h).reshape(B, 1, C, H * W).transpose(2, 3) for proj in (self.q, self.k, self.v))  # (B, 1, HW, C)
        # softmax(q k^T / sqrt(C)) v; fused kernels (flash / memory-efficient) on GPU
        h = F.scaled_dot_product_attention(q, k, v).transpose(2, 3).reshape(B, C, H, W)
        out = x + self.out(h)
        return out / math.sqrt(2.0) if self.skip_rescale else out


class Downsample(nn.Module):
    """DDPM downsampling by 2: stride-2 conv3x3 (``with_conv``) or 2x2 average pool. ``(B,C,H,W) -> (B,C,H/2,W/2)``."""

    def __init__(self, ch, with_conv, g):
        super().__init__()
        self.conv = conv2d(ch, ch, 3, g, stride=2) if with_conv else None

    def forward(self, x, temb=None):
        return self.conv(x) if self.conv is not None else F.avg_pool2d(x, 2)


class Upsample(nn.Module):
    """DDPM upsampling by 2: nearest neighbour, then conv3x3 if ``with_conv``. ``(B,C,H,W) -> (B,C,2H,2W)``."""

    def __init__(self, ch, with_conv, g):
        super().__init__()
        self.conv = conv2d(ch, ch, 3, g) if with_conv else None

    def forward(self, x, temb=None):
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(x) if self.conv is not None else x


def _check_positive_tuple(name, value, allow_empty=False):
    try:
        vals = tuple(value)
    except TypeError:
        raise ValueError(f"{name} must be a sequence of positive integers; got {value!r}") from None
    if (not vals and not allow_empty) or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in vals):
        raise ValueError(f"{name} must be a {'possibly empty' if allow_empty else 'non-empty'} sequence of positive integers; got {value!r}")
    return vals


class UNet(nn.Module):
    """DDPM++-style U-Net ``f(x, t_in)`` for images (see the module docstring for the layout).

    Args:
        in_channels: image channels ``C`` (input and output).
        image_size: nominal side ``H = W``; fixes at which levels attention sits (levels whose side
            ``image_size / 2^l`` is in ``attn_resolutions``; sides not present are ignored). Must be
            divisible by ``2^(len(ch_mult) - 1)``. Inputs of other divisible sizes are accepted.
        ch: base channel count; level ``l`` has ``ch * ch_mult[l]`` channels.
        ch_mult: channel multipliers, one per resolution.
        num_res_blocks: ResBlocks per level on the way down (``+1`` on the way up).
        attn_resolutions: sides at which self-attention is applied.
        dropout: dropout rate inside ResBlocks (uses torch's global random state in training mode).
        time_embedding: ``"sinusoidal"`` (DDPM++, for ``t_in = 999 t`` or step ``i``) or ``"fourier"``
            (NCSN++, embeds ``log t_in``; for ``t_in = sigma``).
        fourier_scale: std of the Fourier frequencies.
        skip_rescale: divide residual sums by ``sqrt(2)``.
        resamp_with_conv: conv in DDPM-style resampling (only used when ``resblock_updown=False``).
        num_groups: maximum GroupNorm groups (adapted by ``group_count`` for small channel counts).
        resblock_updown: resample with BigGAN-style ResBlocks (DDPM++/NCSN++) instead of Down/Upsample.
        num_classes: ``None`` (unconditional: no table, no new parameters) or ``K``, the number of classes: a
            ``LabelEmbedding`` of ``K + 1`` rows of width ``4 ch`` (the last row, label ``K``, the null class).
        seed: weights are drawn from ``torch.Generator().manual_seed(seed)``.

    ``forward(x (B, C, H, W), t_in (B,), class_labels (B,) int in [0, K] or None) -> (B, C, H, W)``; ``H`` and ``W``
    divisible by ``2^(len(ch_mult)-1)``; ``class_labels=None`` is the null class.

    Sizes (parameters, 3 x 32 x 32, ch 128, ch_mult (1,2,2,2), attention at 16): num_res_blocks=4 (DDPM++ cont.)
    61.8M; 8 (deep) 106.6M; num_res_blocks=2 with ``resblock_updown=False`` (DDPM-like) 35.2M.
    1 x 8 x 8, ch 8, ch_mult (1, 2), num_res_blocks 1: 45.7k (ch 4: 11.8k).
    """

    def __init__(
        self,
        in_channels: int = 3,
        image_size: int = 32,
        ch: int = 128,
        ch_mult: Tuple[int, ...] = (1, 2, 2, 2),
        num_res_blocks: int = 2,
        attn_resolutions: Tuple[int, ...] = (16,),
        dropout: float = 0.1,
        time_embedding: str = "sinusoidal",
        fourier_scale: float = 16.0,
        skip_rescale: bool = True,
        resamp_with_conv: bool = True,
        num_groups: int = 32,
        resblock_updown: bool = True,
        num_classes: Optional[int] = None,
        seed: int = 0,
    ):
        super().__init__()
        self.in_channels = _check_dim("in_channels", in_channels)
        self.image_size = _check_dim("image_size", image_size)
        _check_dim("ch", ch)
        self.ch_mult = _check_positive_tuple("ch_mult", ch_mult)
        self.num_res_blocks = _check_dim("num_res_blocks", num_res_blocks)
        self.attn_resolutions = _check_positive_tuple("attn_resolutions", attn_resolutions, allow_empty=True)
        dropout = _check_dropout(dropout)
        _check_dim("num_groups", num_groups)
        for name, flag in (("skip_rescale", skip_rescale), ("resamp_with_conv", resamp_with_conv), ("resblock_updown", resblock_updown)):
            if not isinstance(flag, bool):
                raise TypeError(f"{name} must be a bool; got {flag!r}")
        self.num_classes = None if num_classes is None else _check_dim("num_classes", num_classes)
        self.factor = 2 ** (len(self.ch_mult) - 1)
        if image_size % self.factor:
            raise ValueError(
                f"image_size must be divisible by 2^(len(ch_mult)-1) = {self.factor} (ch_mult={self.ch_mult}); got {image_size}"
            )
        g = torch.Generator().manual_seed(int(seed))
        L = len(self.ch_mult)
        temb_dim = 4 * ch
        embed_dim = ch if time_embedding == "sinusoidal" else 2 * ch
        self.embed = make_time_embedding(time_embedding, embed_dim, fourier_scale, seed)
        self.temb = nn.Sequential(dense(embed_dim, temb_dim, g), nn.SiLU(), dense(temb_dim, temb_dim, g))
        if num_classes is not None:
            self.label_embed = LabelEmbedding(num_classes, temb_dim)

        def res(i, o, **kw):
            return ResBlock(i, o, temb_dim, dropout, skip_rescale, num_groups, g, **kw)

        def attn(c):
            return AttnBlock(c, skip_rescale, num_groups, g)

        self.conv_in = conv2d(in_channels, ch, 3, g)
        skip_ch = [ch]
        c = ch
        self.down = nn.ModuleList()
        for lvl in range(L):
            level = nn.Module()
            level.blocks = nn.ModuleList()
            level.attns = nn.ModuleList()
            use_attn = image_size // 2**lvl in self.attn_resolutions
            for _ in range(num_res_blocks):
                level.blocks.append(res(c, ch * self.ch_mult[lvl]))
                c = ch * self.ch_mult[lvl]
                level.attns.append(attn(c) if use_attn else nn.Identity())
                skip_ch.append(c)
            if lvl < L - 1:
                level.resample = res(c, c, down=True) if resblock_updown else Downsample(c, resamp_with_conv, g)
                skip_ch.append(c)
            self.down.append(level)
        self.mid = nn.ModuleList([res(c, c), attn(c), res(c, c)])
        self.up = nn.ModuleList()
        for lvl in reversed(range(L)):
            level = nn.Module()
            level.blocks = nn.ModuleList()
            for _ in range(num_res_blocks + 1):
                level.blocks.append(res(c + skip_ch.pop(), ch * self.ch_mult[lvl]))
                c = ch * self.ch_mult[lvl]
            level.attn = attn(c) if image_size // 2**lvl in self.attn_resolutions else nn.Identity()
            if lvl > 0:
                level.resample = res(c, c, up=True) if resblock_updown else Upsample(c, resamp_with_conv, g)
            self.up.append(level)
        assert not skip_ch
        self.norm_out = nn.GroupNorm(group_count(c, num_groups), c, eps=1e-6)
        self.conv_out = conv2d(c, in_channels, 3, g, scale=ZERO_INIT_SCALE)
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor, t_in: torch.Tensor, class_labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"x must have shape (B, C, H, W) with C = in_channels = {self.in_channels}; got {tuple(x.shape)}")
        if x.shape[2] % self.factor or x.shape[3] % self.factor:
            raise ValueError(
                f"x's height and width must be divisible by 2^(len(ch_mult)-1) = {self.factor}; got {tuple(x.shape[2:])}"
            )
        if not torch.is_tensor(t_in) or t_in.shape != (x.shape[0],):
            shape = tuple(t_in.shape) if torch.is_tensor(t_in) else type(t_in).__name__
            raise ValueError(f"t_in must have shape (B,) = ({x.shape[0]},); got {shape}")
        check_class_labels(class_labels, self.num_classes, x.shape[0], type(self).__name__)
        temb = self.temb(self.embed(t_in.to(x.dtype)))
        if self.num_classes is not None:
            temb = temb + self.label_embed(class_labels, x.shape[0])
        h = self.conv_in(x)
        hs = [h]
        for level in self.down:
            for block, attn in zip(level.blocks, level.attns):
                h = attn(block(h, temb))
                hs.append(h)
            if hasattr(level, "resample"):
                h = level.resample(h, temb)
                hs.append(h)
        h = self.mid[0](h, temb)
        h = self.mid[1](h)
        h = self.mid[2](h, temb)
        for level in self.up:
            for block in level.blocks:
                h = block(torch.cat([h, hs.pop()], dim=1), temb)
            h = level.attn(h)
            if hasattr(level, "resample"):
                h = level.resample(h, temb)
        return self.conv_out(self.act(self.norm_out(h)))
