"""The DDPM baseline network (Ho et al. 2020) as score_sde_pytorch builds it (``models/ddpm.py``).

Same parameter names as the reference (``all_modules.N....`` and the buffer ``sigmas``), so a reference
state_dict loads with ``strict=True``. Layout (``L = len(ch_mult)`` levels)::

    Dense, Dense                               sinusoidal time embedding -> 4 nf
    conv3x3                                    stem
    per level: num_res_blocks x (ResBlock [Attn])  [Downsample]
    ResBlock, Attn, ResBlock                   middle
    per level (reversed): (num_res_blocks + 1) x ResBlock [Attn] [Upsample]
    GroupNorm(32), conv3x3                     head

Residual blocks and attention use 32 GroupNorm groups, no skip rescaling, and start their last
layer at scale 1e-10. The time input ``labels`` is embedded as is: ``999 t`` for continuous VP, the
(possibly fractional) step ``t (N - 1)`` for discrete DDPM. Class conditioning (``num_classes = K``, not in the
reference): ``temb <- temb + E[class_labels]`` after the two Dense layers, ``E`` a ``layers.LabelEmbedding`` (``K + 1``
rows of width ``4 nf``, the last the null class, zero at initialisation) stored as ``label_embed.weight`` outside
``all_modules`` (the reference's keys are unchanged).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from .._validate import check_int, check_positive
from . import layerspp as L
from .layers import LabelEmbedding, _check_dim, check_class_labels
from .ncsnpp import _check_bool, _check_dropout, _check_int_tuple, _config_field, _prefix_config_error, sigma_levels

__all__ = ["DDPM"]


class DDPM(nn.Module):
    """DDPM U-Net ``net(x, labels) -> (B, C, H, W)`` with score_sde's parameter names.

    Keyword arguments are score_sde's config fields; defaults are its CIFAR-10 DDPM (``vp/ddpm``)
    config, 35,218,947 parameters.

    Args:
        image_size, num_channels, centered: ``config.data.*``; if not ``centered`` the input is taken to
            lie in ``[0, 1]`` and mapped by ``2x - 1``.
        nf, ch_mult, num_res_blocks, attn_resolutions, dropout, resamp_with_conv: the U-Net's shape
            (every channel count ``nf * ch_mult[l]`` must be a multiple of 32).
        conditional: must be True (the reference's DDPM does not build without its time embedding).
        scale_by_sigma: divide the output by ``sigmas[labels.long()]`` (integer ``labels`` only).
        nonlinearity: ``"swish"``, ``"elu"``, ``"relu"`` or ``"lrelu"``.
        sigma_min, sigma_max, num_scales: the ``sigmas`` buffer (``exp(linspace(log sigma_max, log sigma_min, N))``).
        num_classes: ``None`` (unconditional, the reference's network) or ``K``, the number of classes (module docstring).
        seed: weights are drawn from ``torch.Generator().manual_seed(seed)``.

    ``forward(x (B, num_channels, H, W), labels (B,), class_labels (B,) int in [0, K] or None) -> (B, num_channels,
    H, W)``; ``labels`` is the time input (the reference's name), ``class_labels=None`` the null class.
    """

    def __init__(
        self,
        image_size: int = 32,
        num_channels: int = 3,
        centered: bool = True,
        nf: int = 128,
        ch_mult: Sequence[int] = (1, 2, 2, 2),
        num_res_blocks: int = 2,
        attn_resolutions: Sequence[int] = (16,),
        dropout: float = 0.1,
        resamp_with_conv: bool = True,
        conditional: bool = True,
        scale_by_sigma: bool = False,
        nonlinearity: str = "swish",
        sigma_min: float = 0.01,
        sigma_max: float = 50.0,
        num_scales: int = 1000,
        num_classes: Optional[int] = None,
        seed: int = 0,
    ):
        super().__init__()
        self.image_size = check_int("image_size", image_size)
        self.num_channels = C = check_int("num_channels", num_channels)
        self.centered = _check_bool("centered", centered)
        self.nf = nf = check_int("nf", nf)
        self.ch_mult = ch_mult = _check_int_tuple("ch_mult", ch_mult)
        self.num_res_blocks = check_int("num_res_blocks", num_res_blocks)
        self.attn_resolutions = _check_int_tuple("attn_resolutions", attn_resolutions, allow_empty=True)
        dropout = _check_dropout(dropout)
        resamp_with_conv = _check_bool("resamp_with_conv", resamp_with_conv)
        if _check_bool("conditional", conditional) is not True:
            raise ValueError("conditional must be True: score_sde's DDPM network always embeds the time "
                             "(its conditional=False branch does not build); got False")
        self.conditional = True
        self.scale_by_sigma = _check_bool("scale_by_sigma", scale_by_sigma)
        L.make_act(nonlinearity)
        sigma_min, sigma_max = check_positive("sigma_min", sigma_min), check_positive("sigma_max", sigma_max)
        if not sigma_min < sigma_max:
            raise ValueError(f"sigma_min must be < sigma_max; got sigma_min={sigma_min}, sigma_max={sigma_max}")
        num_scales = check_int("num_scales", num_scales)
        self.num_classes = None if num_classes is None else _check_dim("num_classes", num_classes)
        for m in ch_mult:
            if (nf * m) % 32:
                raise ValueError(
                    f"nf * ch_mult[l] must be a multiple of 32 (DDPM's GroupNorm has 32 groups); got nf={nf}, ch_mult={ch_mult}"
                )
        self.num_resolutions = n_res = len(ch_mult)
        self.factor = 2 ** (n_res - 1)
        if image_size % self.factor:
            raise ValueError(
                f"image_size must be divisible by 2^(len(ch_mult)-1) = {self.factor} (ch_mult={ch_mult}); got {image_size}"
            )
        self.all_resolutions = [image_size // 2**i for i in range(n_res)]

        g = torch.Generator().manual_seed(int(seed))
        self.act = act = L.make_act(nonlinearity)
        self.register_buffer("sigmas", sigma_levels(sigma_min, sigma_max, num_scales))
        temb_dim = 4 * nf

        def resblock(in_ch, out_ch=None):
            return L.ResnetBlockDDPMpp(act, in_ch, g, out_ch=out_ch, temb_dim=temb_dim, dropout=dropout,
                                       skip_rescale=False, init_scale=0.0, num_groups_cap=None)

        def attn(c):
            return L.AttnBlockpp(c, g, skip_rescale=False, init_scale=0.0, num_groups_cap=None)

        modules: list[nn.Module] = [L.linear(nf, temb_dim, g), L.linear(temb_dim, temb_dim, g)]
        modules.append(L.conv3x3(C, nf, g))
        hs_c = [nf]
        in_ch = nf
        for i_level in range(n_res):
            for _ in range(self.num_res_blocks):
                out_ch = nf * ch_mult[i_level]
                modules.append(resblock(in_ch, out_ch))
                in_ch = out_ch
                if self.all_resolutions[i_level] in self.attn_resolutions:
                    modules.append(attn(in_ch))
                hs_c.append(in_ch)
            if i_level != n_res - 1:
                modules.append(L.Downsample(in_ch, g, with_conv=resamp_with_conv))
                hs_c.append(in_ch)
        in_ch = hs_c[-1]
        modules += [resblock(in_ch), attn(in_ch), resblock(in_ch)]
        for i_level in reversed(range(n_res)):
            for _ in range(self.num_res_blocks + 1):
                out_ch = nf * ch_mult[i_level]
                modules.append(resblock(in_ch + hs_c.pop(), out_ch))
                in_ch = out_ch
            if self.all_resolutions[i_level] in self.attn_resolutions:
                modules.append(attn(in_ch))
            if i_level != 0:
                modules.append(L.Upsample(in_ch, g, with_conv=resamp_with_conv))
        assert not hs_c
        modules.append(nn.GroupNorm(32, in_ch, eps=1e-6))
        modules.append(L.conv3x3(in_ch, C, g, init_scale=0.0))
        self.all_modules = nn.ModuleList(modules)
        if num_classes is not None:
            self.label_embed = LabelEmbedding(num_classes, temb_dim)

    @classmethod
    def from_config(cls, config, seed: int = 0) -> "DDPM":
        """Build from score_sde's ConfigDict: ``config.model.*`` and ``config.data.{image_size, num_channels, centered}``.

        Errors name the config field (``config.model.nf ...``).
        """
        name = _config_field(config, "model", "name", "ddpm")
        if str(name).lower() != "ddpm":
            raise ValueError(f"config.model.name must be 'ddpm' for DDPM; got {name!r}")
        kwargs = {f: _config_field(config, "data", f) for f in ("image_size", "num_channels", "centered")}
        for f in ("nf", "ch_mult", "num_res_blocks", "attn_resolutions", "dropout", "resamp_with_conv", "conditional",
                  "scale_by_sigma", "nonlinearity", "sigma_min", "sigma_max", "num_scales"):
            kwargs[f] = _config_field(config, "model", f)
        for f in ("ch_mult", "attn_resolutions"):
            if isinstance(kwargs[f], list):
                kwargs[f] = tuple(kwargs[f])
        for f in ("sigma_min", "sigma_max", "dropout"):
            if isinstance(kwargs[f], int) and not isinstance(kwargs[f], bool):
                kwargs[f] = float(kwargs[f])
        try:
            return cls(**kwargs, seed=seed)
        except ValueError as err:
            raise _prefix_config_error(err, list(kwargs)) from None

    def extra_repr(self) -> str:
        return f"image_size={self.image_size}, nf={self.nf}, ch_mult={self.ch_mult}, num_res_blocks={self.num_res_blocks}"

    def forward(self, x: torch.Tensor, labels: torch.Tensor, class_labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Raw network output for ``x`` ``(B, C, H, W)`` at time inputs ``labels`` ``(B,)`` and classes ``class_labels``
        ``(B,)`` (``None``: the null class); shape of ``x``."""
        if x.dim() != 4 or x.shape[1] != self.num_channels:
            raise ValueError(f"x must have shape (B, C, H, W) with C = num_channels = {self.num_channels}; got {tuple(x.shape)}")
        if x.shape[2] % self.factor or x.shape[3] % self.factor:
            raise ValueError(f"x's height and width must be divisible by 2^(len(ch_mult)-1) = {self.factor}; got {tuple(x.shape[2:])}")
        if not torch.is_tensor(labels) or labels.shape != (x.shape[0],):
            shape = tuple(labels.shape) if torch.is_tensor(labels) else type(labels).__name__
            raise ValueError(f"labels must have shape (B,) = ({x.shape[0]},); got {shape}")
        check_class_labels(class_labels, self.num_classes, x.shape[0], type(self).__name__)
        mods = iter(self.all_modules)
        nxt = lambda: next(mods)  # noqa: E731
        act = self.act
        temb = L.timestep_embedding(labels, self.nf, dtype=x.dtype)
        temb = nxt()(temb)
        temb = nxt()(act(temb))
        if self.num_classes is not None:
            temb = temb + self.label_embed(class_labels, x.shape[0])
        h = x if self.centered else 2 * x - 1.0
        hs = [nxt()(h)]
        n_res = self.num_resolutions
        for i_level in range(n_res):
            attn_here = self.all_resolutions[i_level] in self.attn_resolutions
            for _ in range(self.num_res_blocks):
                h = nxt()(hs[-1], temb)
                if attn_here:
                    h = nxt()(h)
                hs.append(h)
            if i_level != n_res - 1:
                hs.append(nxt()(hs[-1]))
        h = hs[-1]
        h = nxt()(h, temb)
        h = nxt()(h)
        h = nxt()(h, temb)
        for i_level in reversed(range(n_res)):
            for _ in range(self.num_res_blocks + 1):
                h = nxt()(torch.cat([h, hs.pop()], dim=1), temb)
            if self.all_resolutions[i_level] in self.attn_resolutions:
                h = nxt()(h)
            if i_level != 0:
                h = nxt()(h)
        assert not hs
        h = act(nxt()(h))
        h = nxt()(h)
        if self.scale_by_sigma:
            h = h / self.sigmas[labels.long()].to(h.dtype).reshape(-1, 1, 1, 1)
        return h
