"""Layers of score_sde's NCSN++ / DDPM++ / DDPM networks, with the reference's parameter names.

Every module here registers its parameters under the attribute names (``GroupNorm_0``, ``Conv_0``,
``Dense_0``, ``NIN_0`` with ``W`` / ``b``, ``Conv2d_0``, ...) and in the order that score_sde_pytorch's
``models/layers.py`` and ``models/layerspp.py`` use, so a reference state_dict loads with
``strict=True`` and ``parameters()`` comes in the reference's order (which its EMA ``shadow_params``
follow).

Initialisation follows the reference (``default_init``: variance scaling, ``fan_avg``, uniform, with
``init_scale = 0`` meaning ``1e-10``) but draws from an explicit ``torch.Generator``; building a layer
never touches torch's global random state. Layers built on the ``meta`` device (``with
torch.device("meta"):``) skip the initialisation, which makes shape-only builds of full-size
networks cheap.

Shapes: images are ``(B, C, H, W)``; time embeddings ``(B, D)``.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import fir as _fir
from .layers import ZERO_INIT_SCALE, variance_scaling_

__all__ = [
    "ACTIVATIONS",
    "make_act",
    "groupnorm_groups",
    "GroupNormError",
    "linear",
    "conv3x3",
    "conv1x1",
    "timestep_embedding",
    "NIN",
    "GaussianFourierProjection",
    "Combine",
    "AttnBlockpp",
    "FIRConv2d",
    "Upsample",
    "Downsample",
    "ResnetBlockDDPMpp",
    "ResnetBlockBigGANpp",
]

ACTIVATIONS = ("elu", "relu", "lrelu", "swish")
SQRT2 = math.sqrt(2.0)


def make_act(nonlinearity: str) -> nn.Module:
    """score_sde's ``get_act``: ``"elu"``, ``"relu"``, ``"lrelu"`` (slope 0.2) or ``"swish"`` (``x sigmoid(x)``)."""
    name = nonlinearity.lower() if isinstance(nonlinearity, str) else nonlinearity
    if name == "elu":
        return nn.ELU()
    if name == "relu":
        return nn.ReLU()
    if name == "lrelu":
        return nn.LeakyReLU(negative_slope=0.2)
    if name == "swish":
        return nn.SiLU()
    raise ValueError(f"nonlinearity must be one of {ACTIVATIONS}; got {nonlinearity!r}")


class GroupNormError(ValueError):
    """A GroupNorm's group count does not divide its channels (the networks re-raise it naming nf / ch_mult)."""


def groupnorm_groups(channels: int, cap: int | None = 32) -> int:
    """GroupNorm groups: ``min(channels // 4, 32)`` (NCSN++, ``cap=32``) or exactly 32 (DDPM, ``cap=None``).

    Raises ``GroupNormError`` (a ``ValueError``) if that count is 0 or does not divide ``channels`` (the
    reference would fail inside ``nn.GroupNorm``); the networks re-raise it naming the config fields.
    """
    groups = 32 if cap is None else min(channels // 4, cap)
    if groups < 1 or channels % groups:
        raise GroupNormError(f"{groups} groups for {channels} channels")
    return groups


def _group_norm(channels: int, cap: int | None = 32) -> nn.GroupNorm:
    return nn.GroupNorm(groupnorm_groups(channels, cap), channels, eps=1e-6)


def _default_init_(weight: torch.Tensor, scale: float, g: torch.Generator) -> None:
    """score_sde's ``default_init(scale)``: ``U(-b, b)``, ``b = sqrt(3 scale / fan_avg)``; ``scale = 0`` means 1e-10."""
    if weight.is_meta:
        return
    variance_scaling_(weight, ZERO_INIT_SCALE if scale == 0 else scale, g)


def _empty(cls, *args, **kwargs):
    """Build ``cls`` without running its own (global-RNG) initialisation, on the current default device."""
    return cls(*args, device="meta", **kwargs).to_empty(device=torch.get_default_device())


def linear(in_features: int, out_features: int, g: torch.Generator, init_scale: float = 1.0) -> nn.Linear:
    """``nn.Linear`` with ``default_init(init_scale)`` weights and zero bias: ``y = x W^T + b``, ``(B, in) -> (B, out)``."""
    layer = _empty(nn.Linear, in_features, out_features)
    _default_init_(layer.weight, init_scale, g)
    with torch.no_grad():
        layer.bias.zero_()
    return layer


def _conv(in_ch, out_ch, k, g, init_scale=1.0, stride=1, padding=0, bias=True) -> nn.Conv2d:
    layer = _empty(nn.Conv2d, in_ch, out_ch, k, stride=stride, padding=padding, bias=bias)
    _default_init_(layer.weight, init_scale, g)
    if bias:
        with torch.no_grad():
            layer.bias.zero_()
    return layer


def conv3x3(in_ch: int, out_ch: int, g: torch.Generator, init_scale: float = 1.0, stride: int = 1, padding: int = 1,
            bias: bool = True) -> nn.Conv2d:
    """score_sde's ``ddpm_conv3x3``: a 3x3 ``nn.Conv2d`` (default padding 1) with ``default_init`` weights, zero bias."""
    return _conv(in_ch, out_ch, 3, g, init_scale, stride, padding, bias)


def conv1x1(in_ch: int, out_ch: int, g: torch.Generator, init_scale: float = 1.0) -> nn.Conv2d:
    """score_sde's ``ddpm_conv1x1``: a 1x1 ``nn.Conv2d`` with ``default_init`` weights, zero bias."""
    return _conv(in_ch, out_ch, 1, g, init_scale)


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_positions: float = 10000.0, dtype=None) -> torch.Tensor:
    """DDPM's sinusoidal embedding: ``[sin(t w_k), cos(t w_k)]``, ``w_k = max_positions^(-k / (h - 1))``, ``h = dim // 2``.

    ``timesteps``: ``(B,)`` (any real dtype; computed in ``dtype``, default the default dtype).
    Returns ``(B, dim)``; an odd ``dim`` gets a trailing zero.
    """
    if timesteps.dim() != 1:
        raise ValueError(f"labels must be a 1-d tensor of shape (B,); got {tuple(timesteps.shape)}")
    dtype = dtype or torch.get_default_dtype()
    half = dim // 2
    step = math.log(max_positions) / (half - 1)
    freqs = torch.exp(torch.arange(half, dtype=dtype, device=timesteps.device) * -step)
    args = timesteps.to(dtype)[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    if dim % 2 == 1:
        emb = F.pad(emb, (0, 1))
    return emb


class NIN(nn.Module):
    """Network-in-network: a per-pixel linear map over channels, ``y[b, :, i, j] = W^T x[b, :, i, j] + b``.

    Parameters ``W`` ``(in_dim, num_units)`` (``default_init(init_scale)``) and ``b`` ``(num_units,)``.
    ``(B, in_dim, H, W) -> (B, num_units, H, W)``.
    """

    def __init__(self, in_dim: int, num_units: int, g: torch.Generator, init_scale: float = 0.1):
        super().__init__()
        self.W = nn.Parameter(torch.empty(in_dim, num_units))
        _default_init_(self.W.data, init_scale, g)
        self.b = nn.Parameter(torch.zeros(num_units))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.W.t()[:, :, None, None], self.b)


class GaussianFourierProjection(nn.Module):
    """Random Fourier features ``[sin(2 pi v W), cos(2 pi v W)]`` with fixed ``W ~ N(0, scale^2)``.

    ``W`` ``(embedding_size,)`` is a parameter with ``requires_grad=False`` (as in the reference, so it is
    in the state_dict and counted in ``parameters()``, but not in the EMA shadow). NCSN++ feeds
    ``v = log sigma``. ``(B,) -> (B, 2 embedding_size)``.
    """

    def __init__(self, embedding_size: int, scale: float, g: torch.Generator):
        super().__init__()
        W = torch.empty(embedding_size)
        if not W.is_meta:
            W = torch.randn(embedding_size, generator=g, device=W.device) * scale
        self.W = nn.Parameter(W, requires_grad=False)

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        proj = v[:, None] * self.W[None, :] * 2 * math.pi
        return torch.cat([torch.sin(proj), torch.cos(proj)], dim=-1)


class Combine(nn.Module):
    """NCSN++'s input-skip combiner: ``Conv(x)`` (1x1, ``dim1 -> dim2``) concatenated with (``"cat"``) or added to (``"sum"``) ``y``.

    ``x`` ``(B, dim1, H, W)``, ``y`` ``(B, dim2, H, W)`` -> ``(B, 2 dim2, H, W)`` or ``(B, dim2, H, W)``.
    """

    def __init__(self, dim1: int, dim2: int, method: str, g: torch.Generator):
        super().__init__()
        self.Conv = conv1x1(dim1, dim2, g)
        self.method = method

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.Conv(x)
        return torch.cat([h, y], dim=1) if self.method == "cat" else h + y


class AttnBlockpp(nn.Module):
    """Self-attention over the ``H W`` positions (DDPM's block; NCSN++ adds ``skip_rescale``).

    ``q, k, v = NIN_0..2(GroupNorm_0(x))``; ``A = softmax_j(q_i . k_j / sqrt(C))``; ``h = NIN_3(sum_j A_ij v_j)``;
    output ``x + h`` (or ``(x + h) / sqrt(2)`` with ``skip_rescale``). ``NIN_3`` starts at ``init_scale``
    (0 -> 1e-10). ``num_groups_cap=None`` gives DDPM's fixed 32 groups. ``(B, C, H, W) -> (B, C, H, W)``.
    """

    def __init__(self, channels: int, g: torch.Generator, skip_rescale: bool = False, init_scale: float = 0.0,
                 num_groups_cap: int | None = 32):
        super().__init__()
        self.GroupNorm_0 = _group_norm(channels, num_groups_cap)
        self.NIN_0 = NIN(channels, channels, g)
        self.NIN_1 = NIN(channels, channels, g)
        self.NIN_2 = NIN(channels, channels, g)
        self.NIN_3 = NIN(channels, channels, g, init_scale=init_scale)
        self.skip_rescale = skip_rescale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.GroupNorm_0(x)
        q = self.NIN_0(h).reshape(B, C, H * W)
        k = self.NIN_1(h).reshape(B, C, H * W)
        v = self.NIN_2(h).reshape(B, C, H * W)
        w = torch.bmm(q.transpose(1, 2), k) * (C ** (-0.5))  # (B, HW_i, HW_j)
        w = torch.softmax(w, dim=-1)
        h = torch.bmm(v, w.transpose(1, 2)).reshape(B, C, H, W)
        h = self.NIN_3(h)
        return (x + h) / SQRT2 if self.skip_rescale else x + h


class FIRConv2d(nn.Module):
    """score_sde's ``up_or_down_sampling.Conv2d``: a ``kernel x kernel`` conv fused with FIR up- or down-sampling.

    Parameters ``weight`` ``(out_ch, in_ch, kernel, kernel)`` and ``bias`` ``(out_ch,)``. ``up``:
    ``fir.upsample_conv_2d`` (``(B, in, H, W) -> (B, out, 2H, 2W)``); ``down``: ``fir.conv_downsample_2d``
    (``-> (B, out, H/2, W/2)``); neither: a same-padded conv.
    """

    def __init__(self, in_ch: int, out_ch: int, kernel: int, g: torch.Generator, up: bool = False, down: bool = False,
                 resample_kernel: Sequence[float] = (1, 3, 3, 1), use_bias: bool = True):
        super().__init__()
        if up and down:
            raise ValueError("FIRConv2d: up and down cannot both be set")
        if kernel < 1 or kernel % 2 == 0:
            raise ValueError(f"FIRConv2d: kernel must be an odd integer >= 1; got {kernel}")
        self.weight = nn.Parameter(torch.empty(out_ch, in_ch, kernel, kernel))
        _default_init_(self.weight.data, 1.0, g)
        if use_bias:
            self.bias = nn.Parameter(torch.zeros(out_ch))
        self.up, self.down, self.kernel, self.use_bias = up, down, kernel, use_bias
        self.resample_kernel = tuple(resample_kernel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.up:
            x = _fir.upsample_conv_2d(x, self.weight, k=self.resample_kernel)
        elif self.down:
            x = _fir.conv_downsample_2d(x, self.weight, k=self.resample_kernel)
        else:
            x = F.conv2d(x, self.weight, padding=self.kernel // 2)
        if self.use_bias:
            x = x + self.bias.reshape(1, -1, 1, 1)
        return x


class Upsample(nn.Module):
    """2x upsampling ``(B, in_ch, H, W) -> (B, out_ch, 2H, 2W)`` (``out_ch`` defaults to ``in_ch``).

    Without ``fir``: nearest neighbour, then (``with_conv``) ``Conv_0`` 3x3. With ``fir``: FIR upsampling
    (``fir.upsample_2d``), or (``with_conv``) the fused ``Conv2d_0`` (``FIRConv2d`` with ``up``).
    ``out_ch != in_ch`` needs ``with_conv``. Also DDPM's ``Upsample`` (``fir=False``).
    """

    def __init__(self, in_ch: int, g: torch.Generator, out_ch: int | None = None, with_conv: bool = False,
                 fir: bool = False, fir_kernel: Sequence[float] = (1, 3, 3, 1)):
        super().__init__()
        out_ch = out_ch or in_ch
        if with_conv:
            if fir:
                self.Conv2d_0 = FIRConv2d(in_ch, out_ch, 3, g, up=True, resample_kernel=fir_kernel)
            else:
                self.Conv_0 = conv3x3(in_ch, out_ch, g)
        self.fir, self.with_conv, self.fir_kernel, self.out_ch = fir, with_conv, tuple(fir_kernel), out_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fir:
            return self.Conv2d_0(x) if self.with_conv else _fir.upsample_2d(x, self.fir_kernel, factor=2)
        h = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return self.Conv_0(h) if self.with_conv else h


class Downsample(nn.Module):
    """2x downsampling ``(B, in_ch, H, W) -> (B, out_ch, H/2, W/2)`` (``out_ch`` defaults to ``in_ch``).

    Without ``fir``: pad one zero row/column at the bottom/right (TF's 'SAME'), then ``Conv_0`` 3x3 at
    stride 2 (``with_conv``) or 2x2 average pooling. With ``fir``: FIR downsampling
    (``fir.downsample_2d``), or (``with_conv``) the fused ``Conv2d_0`` (``FIRConv2d`` with ``down``).
    Also DDPM's ``Downsample`` (``fir=False``).
    """

    def __init__(self, in_ch: int, g: torch.Generator, out_ch: int | None = None, with_conv: bool = False,
                 fir: bool = False, fir_kernel: Sequence[float] = (1, 3, 3, 1)):
        super().__init__()
        out_ch = out_ch or in_ch
        if with_conv:
            if fir:
                self.Conv2d_0 = FIRConv2d(in_ch, out_ch, 3, g, down=True, resample_kernel=fir_kernel)
            else:
                self.Conv_0 = conv3x3(in_ch, out_ch, g, stride=2, padding=0)
        self.fir, self.with_conv, self.fir_kernel, self.out_ch = fir, with_conv, tuple(fir_kernel), out_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fir:
            return self.Conv2d_0(x) if self.with_conv else _fir.downsample_2d(x, self.fir_kernel, factor=2)
        x = F.pad(x, (0, 1, 0, 1))
        return self.Conv_0(x) if self.with_conv else F.avg_pool2d(x, 2, stride=2)


class ResnetBlockDDPMpp(nn.Module):
    """DDPM's residual block (NCSN++ ``resblock_type="ddpm"``, and the DDPM network with ``num_groups_cap=None``).

    ``h = Conv_0(act(GroupNorm_0(x))) + Dense_0(act(temb))``; ``h = Conv_1(Dropout_0(act(GroupNorm_1(h))))``;
    shortcut ``x`` (``NIN_0(x)``, or ``Conv_2(x)`` with ``conv_shortcut``, when ``in_ch != out_ch``);
    output ``x + h`` or ``(x + h) / sqrt(2)`` (``skip_rescale``). ``Conv_1`` starts at ``init_scale``.
    ``(B, in_ch, H, W), (B, temb_dim) -> (B, out_ch, H, W)``.
    """

    def __init__(self, act: nn.Module, in_ch: int, g: torch.Generator, out_ch: int | None = None,
                 temb_dim: int | None = None, conv_shortcut: bool = False, dropout: float = 0.1,
                 skip_rescale: bool = False, init_scale: float = 0.0, num_groups_cap: int | None = 32):
        super().__init__()
        out_ch = out_ch or in_ch
        self.GroupNorm_0 = _group_norm(in_ch, num_groups_cap)
        self.Conv_0 = conv3x3(in_ch, out_ch, g)
        if temb_dim is not None:
            self.Dense_0 = linear(temb_dim, out_ch, g)
        self.GroupNorm_1 = _group_norm(out_ch, num_groups_cap)
        self.Dropout_0 = nn.Dropout(dropout)
        self.Conv_1 = conv3x3(out_ch, out_ch, g, init_scale=init_scale)
        if in_ch != out_ch:
            if conv_shortcut:
                self.Conv_2 = conv3x3(in_ch, out_ch, g)
            else:
                self.NIN_0 = NIN(in_ch, out_ch, g)
        self.act, self.in_ch, self.out_ch = act, in_ch, out_ch
        self.conv_shortcut, self.skip_rescale = conv_shortcut, skip_rescale

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        h = self.Conv_0(self.act(self.GroupNorm_0(x)))
        if temb is not None:
            h = h + self.Dense_0(self.act(temb))[:, :, None, None]
        h = self.Conv_1(self.Dropout_0(self.act(self.GroupNorm_1(h))))
        if self.in_ch != self.out_ch:
            x = self.Conv_2(x) if self.conv_shortcut else self.NIN_0(x)
        return (x + h) / SQRT2 if self.skip_rescale else x + h


class ResnetBlockBigGANpp(nn.Module):
    """BigGAN-style residual block of DDPM++ / NCSN++, optionally resampling (``up`` or ``down``) inside.

    ``h = act(GroupNorm_0(x))``; ``h, x = R(h), R(x)`` with ``R`` 2x up/down-sampling (FIR with ``fir``,
    else nearest / mean pooling); ``h = Conv_0(h) + Dense_0(act(temb))``;
    ``h = Conv_1(Dropout_0(act(GroupNorm_1(h))))``; shortcut ``Conv_2(x)`` (1x1) when the channels change
    or it resamples; output ``(x + h) / sqrt(2)`` (``skip_rescale``) or ``x + h``.
    ``(B, in_ch, H, W), (B, temb_dim) -> (B, out_ch, H', W')``.
    """

    def __init__(self, act: nn.Module, in_ch: int, g: torch.Generator, out_ch: int | None = None,
                 temb_dim: int | None = None, up: bool = False, down: bool = False, dropout: float = 0.1,
                 fir: bool = False, fir_kernel: Sequence[float] = (1, 3, 3, 1), skip_rescale: bool = True,
                 init_scale: float = 0.0):
        super().__init__()
        out_ch = out_ch or in_ch
        self.GroupNorm_0 = _group_norm(in_ch)
        self.up, self.down, self.fir, self.fir_kernel = up, down, fir, tuple(fir_kernel)
        self.Conv_0 = conv3x3(in_ch, out_ch, g)
        if temb_dim is not None:
            self.Dense_0 = linear(temb_dim, out_ch, g)
        self.GroupNorm_1 = _group_norm(out_ch)
        self.Dropout_0 = nn.Dropout(dropout)
        self.Conv_1 = conv3x3(out_ch, out_ch, g, init_scale=init_scale)
        self.shortcut = in_ch != out_ch or up or down
        if self.shortcut:
            self.Conv_2 = conv1x1(in_ch, out_ch, g)
        self.skip_rescale, self.act, self.in_ch, self.out_ch = skip_rescale, act, in_ch, out_ch

    def _resample(self, x: torch.Tensor) -> torch.Tensor:
        if self.up:
            return _fir.upsample_2d(x, self.fir_kernel) if self.fir else _fir.naive_upsample_2d(x)
        if self.down:
            return _fir.downsample_2d(x, self.fir_kernel) if self.fir else _fir.naive_downsample_2d(x)
        return x

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        h = self.act(self.GroupNorm_0(x))
        if self.up or self.down:
            h, x = self._resample(h), self._resample(x)
        h = self.Conv_0(h)
        if temb is not None:
            h = h + self.Dense_0(self.act(temb))[:, :, None, None]
        h = self.Conv_1(self.Dropout_0(self.act(self.GroupNorm_1(h))))
        if self.shortcut:
            x = self.Conv_2(x)
        return (x + h) / SQRT2 if self.skip_rescale else x + h
