"""NCSN++ / DDPM++ (Song et al., ICLR 2021) with score_sde_pytorch's module layout and parameter names.

One class builds both families from the reference's model config, exactly as ``models/ncsnpp.py``
does: every layer lives in one flat ``nn.ModuleList`` ``all_modules`` (state_dict keys
``all_modules.N.<Name>_k.<param>``), plus the buffer ``sigmas`` (the reference's SMLD noise levels,
``exp(linspace(log sigma_max, log sigma_min, num_scales))``, float64). A reference checkpoint's
``state_dict`` (after stripping DataParallel's ``module.``) loads with ``strict=True``; see
``scoresde.interop.score_sde.load``.

The network time input ``labels`` ``(B,)`` is the reference's: ``999 t`` (continuous VP / sub-VP,
``embedding_type="positional"``) or ``sigma(t)`` (VE, ``embedding_type="fourier"``, which embeds
``log sigma``). With ``scale_by_sigma`` the output is divided by ``sigma`` (``labels`` itself with the
Fourier embedding, ``sigmas[labels.long()]`` with the positional one), making the raw output a score.

Class conditioning (``num_classes = K``, not in the reference, whose ``conditional`` means conditioning on the noise
level): ``temb <- temb + E[class_labels]`` after the two Dense layers of the noise embedding, with ``E`` a
``layers.LabelEmbedding`` (``K + 1`` rows of width ``4 nf``, the last the null class, zero at initialisation) kept
outside ``all_modules`` as ``label_embed.weight``, so the reference's keys and parameter order are unchanged.

Layout (``L = len(ch_mult)`` levels, side ``image_size / 2^l`` at level ``l``)::

    [Fourier W] [Dense, Dense]                time embedding (if conditional)
    conv3x3                                   stem
    per level: num_res_blocks x (ResBlock [Attn])  [Down] [input-pyramid module]
    ResBlock, Attn, ResBlock                  middle
    per level (reversed): (num_res_blocks + 1) x ResBlock [Attn] [output-pyramid modules] [Up]
    GroupNorm, conv3x3                        head (absent with progressive="output_skip")
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import torch
from torch import nn

from .._validate import check_choice, check_int, check_positive
from . import fir as _fir
from . import layerspp as L
from .layers import LabelEmbedding, _check_dim, check_class_labels

__all__ = ["NCSNpp"]

RESBLOCK_TYPES = ("ddpm", "biggan")
PROGRESSIVE = ("none", "output_skip", "residual")
PROGRESSIVE_INPUT = ("none", "input_skip", "residual")
PROGRESSIVE_COMBINE = ("sum", "cat")
EMBEDDING_TYPES = ("positional", "fourier")
ATTENTION_TYPES = ("ddpm",)
CONV_SIZES = (3,)

# constructor argument -> where score_sde's config keeps it
_DATA_FIELDS = ("image_size", "num_channels", "centered")


def _check_bool(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be a bool (True or False); got {value!r}")
    return value


def _check_int_tuple(name: str, value, allow_empty: bool = False) -> tuple[int, ...]:
    try:
        out = tuple(value)
    except TypeError:
        out = None
    if out is None or (not out and not allow_empty) or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in out):
        need = "a" if allow_empty else "a non-empty"
        raise ValueError(f"{name} must be {need} sequence of positive integers; got {value!r}")
    return out


def _check_choice_ci(name: str, value, allowed) -> str:
    """Case-insensitive choice (score_sde lower-cases these strings); returns the lower-cased value."""
    low = value.lower() if isinstance(value, str) else value
    return check_choice(name, low, allowed)


def _check_dropout(value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"dropout must be a number in [0, 1); got {value!r}")
    return float(value)


def _check_fir_kernel(value) -> tuple[float, ...]:
    try:
        k = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"fir_kernel must be a non-empty sequence of numbers with a nonzero sum, e.g. (1, 3, 3, 1); got {value!r}") from None
    if not k or not all(math.isfinite(v) for v in k) or sum(k) == 0:
        raise ValueError(f"fir_kernel must be a non-empty sequence of numbers with a nonzero sum, e.g. (1, 3, 3, 1); got {value!r}")
    return k


def _config_field(config, section: str, name: str, default: Any = ...):
    """``config.<section>.<name>`` for an ml_collections ConfigDict (or nested dict / namespace)."""
    sec = config.get(section, None) if isinstance(config, dict) else getattr(config, section, None)
    if sec is None:
        if default is not ...:
            return default
        raise ValueError(f"config.{section} is missing; a score_sde config has config.{section}.{name}")
    try:
        return sec[name] if isinstance(sec, dict) else getattr(sec, name)
    except (KeyError, AttributeError):
        if default is not ...:
            return default
        raise ValueError(f"config.{section}.{name} is missing (score_sde's network reads it)") from None


def _prefix_config_error(err: ValueError, fields: Sequence[str]) -> ValueError:
    """Turn ``"nf must be ..."`` into ``"config.model.nf must be ..."`` (``config.data.`` for data fields)."""
    msg = str(err)
    for f in sorted(fields, key=len, reverse=True):
        if msg.startswith(f + " "):
            section = "data" if f in _DATA_FIELDS else "model"
            return ValueError(f"config.{section}.{msg}")
    return ValueError(f"config.model: {msg}")


def sigma_levels(sigma_min: float, sigma_max: float, num_scales: int) -> torch.Tensor:
    """The reference's ``get_sigmas``: ``exp(linspace(log sigma_max, log sigma_min, num_scales))`` (descending, float64)."""
    return torch.exp(torch.linspace(math.log(sigma_max), math.log(sigma_min), num_scales, dtype=torch.float64))


class NCSNpp(nn.Module):
    """NCSN++ / DDPM++ score network ``net(x, labels) -> (B, C, H, W)`` with the reference's parameter names.

    Keyword arguments are score_sde's config fields (``config.model.*`` unless noted); defaults are its
    CIFAR-10 DDPM++ cont. (VP) config, 61,804,419 parameters:

    Args:
        image_size: ``config.data.image_size``; attention sits at levels whose side is in ``attn_resolutions``.
        num_channels: ``config.data.num_channels`` (input and output channels).
        centered: ``config.data.centered``; if False the input is taken to lie in ``[0, 1]`` and mapped by ``2x - 1``.
        nf: base channel count; level ``l`` has ``nf * ch_mult[l]`` channels.
        ch_mult, num_res_blocks, attn_resolutions, dropout, resamp_with_conv: the U-Net's shape.
        conditional: embed the time input (``False``: no embedding, the blocks ignore time).
        fir, fir_kernel: FIR resampling (StyleGAN2) with the given 1-d kernel instead of nearest / mean.
        skip_rescale: divide residual and skip sums by ``sqrt(2)``.
        resblock_type: ``"ddpm"`` (separate Up/Downsample layers) or ``"biggan"`` (resampling ResBlocks).
        progressive: output pyramid, ``"none"``, ``"output_skip"`` or ``"residual"``.
        progressive_input: input pyramid, ``"none"``, ``"input_skip"`` or ``"residual"``.
        progressive_combine: ``"sum"`` or ``"cat"`` (how ``input_skip`` merges the pyramid).
        attention_type: ``"ddpm"`` (the only kind the PyTorch reference builds).
        embedding_type: ``"positional"`` (sinusoidal, of ``labels``) or ``"fourier"`` (Gaussian Fourier
            features of ``log labels``; ``labels`` must then be positive noise levels).
        fourier_scale: std of the Fourier frequencies.
        init_scale: initial scale of the last conv of each residual branch and of the output (0 -> 1e-10).
        scale_by_sigma: divide the output by the noise level (makes the output the score for VE).
        conv_size: 3 (the only size the reference builds).
        nonlinearity: ``"swish"``, ``"elu"``, ``"relu"`` or ``"lrelu"``.
        sigma_min, sigma_max, num_scales: the ``sigmas`` buffer (positional ``scale_by_sigma`` looks up
            ``sigmas[labels.long()]``).
        num_classes: ``None`` (unconditional, the reference's network) or ``K``, the number of classes (module
            docstring); needs ``conditional=True``.
        seed: weights are drawn from ``torch.Generator().manual_seed(seed)`` (the global RNG is untouched).

    ``forward(x (B, num_channels, H, W), labels (B,), class_labels (B,) int in [0, K] or None) -> (B, num_channels,
    H, W)``, with ``H``, ``W`` divisible by ``2^(len(ch_mult) - 1)``; ``labels`` is the time input (the reference's
    name), ``class_labels=None`` the null class. Build on ``with torch.device("meta"):`` for a free shape-only copy.
    """

    def __init__(
        self,
        image_size: int = 32,
        num_channels: int = 3,
        centered: bool = True,
        nf: int = 128,
        ch_mult: Sequence[int] = (1, 2, 2, 2),
        num_res_blocks: int = 4,
        attn_resolutions: Sequence[int] = (16,),
        dropout: float = 0.1,
        resamp_with_conv: bool = True,
        conditional: bool = True,
        fir: bool = False,
        fir_kernel: Sequence[float] = (1, 3, 3, 1),
        skip_rescale: bool = True,
        resblock_type: str = "biggan",
        progressive: str = "none",
        progressive_input: str = "none",
        progressive_combine: str = "sum",
        attention_type: str = "ddpm",
        embedding_type: str = "positional",
        fourier_scale: float = 16.0,
        init_scale: float = 0.0,
        scale_by_sigma: bool = False,
        conv_size: int = 3,
        nonlinearity: str = "swish",
        sigma_min: float = 0.01,
        sigma_max: float = 50.0,
        num_scales: int = 1000,
        num_classes: Optional[int] = None,
        seed: int = 0,
    ):
        super().__init__()
        # --- validation (before any allocation) ---------------------------------------------
        self.image_size = check_int("image_size", image_size)
        self.num_channels = check_int("num_channels", num_channels)
        self.centered = _check_bool("centered", centered)
        self.nf = nf = check_int("nf", nf)
        self.ch_mult = ch_mult = _check_int_tuple("ch_mult", ch_mult)
        self.num_res_blocks = check_int("num_res_blocks", num_res_blocks)
        self.attn_resolutions = _check_int_tuple("attn_resolutions", attn_resolutions, allow_empty=True)
        dropout = _check_dropout(dropout)
        resamp_with_conv = _check_bool("resamp_with_conv", resamp_with_conv)
        self.conditional = _check_bool("conditional", conditional)
        fir = _check_bool("fir", fir)
        fir_kernel = _check_fir_kernel(fir_kernel)
        self.skip_rescale = skip_rescale = _check_bool("skip_rescale", skip_rescale)
        self.resblock_type = _check_choice_ci("resblock_type", resblock_type, RESBLOCK_TYPES)
        self.progressive = _check_choice_ci("progressive", progressive, PROGRESSIVE)
        self.progressive_input = _check_choice_ci("progressive_input", progressive_input, PROGRESSIVE_INPUT)
        self.progressive_combine = _check_choice_ci("progressive_combine", progressive_combine, PROGRESSIVE_COMBINE)
        _check_choice_ci("attention_type", attention_type, ATTENTION_TYPES)
        self.embedding_type = _check_choice_ci("embedding_type", embedding_type, EMBEDDING_TYPES)
        fourier_scale = check_positive("fourier_scale", fourier_scale)
        init_scale = check_positive("init_scale", init_scale, allow_zero=True)
        self.scale_by_sigma = _check_bool("scale_by_sigma", scale_by_sigma)
        check_choice("conv_size", conv_size, CONV_SIZES)
        L.make_act(nonlinearity)  # validates
        sigma_min, sigma_max = check_positive("sigma_min", sigma_min), check_positive("sigma_max", sigma_max)
        if not sigma_min < sigma_max:
            raise ValueError(f"sigma_min must be < sigma_max; got sigma_min={sigma_min}, sigma_max={sigma_max}")
        num_scales = check_int("num_scales", num_scales)
        self.num_classes = None if num_classes is None else _check_dim("num_classes", num_classes)
        if num_classes is not None and not conditional:
            raise ValueError(f"num_classes needs conditional=True (the class embedding is added to the noise embedding "
                             f"temb, which conditional=False does not build); got num_classes={num_classes}")
        self.num_resolutions = n_res = len(ch_mult)
        self.factor = 2 ** (n_res - 1)
        if image_size % self.factor:
            raise ValueError(
                f"image_size must be divisible by 2^(len(ch_mult)-1) = {self.factor} (ch_mult={ch_mult}); got {image_size}"
            )
        self.all_resolutions = [image_size // 2**i for i in range(n_res)]
        self.fir, self.fir_kernel = fir, fir_kernel

        # --- build, in the reference's module order ------------------------------------------
        try:
            self._build(nonlinearity, dropout, resamp_with_conv, init_scale, fourier_scale, sigma_min, sigma_max,
                        num_scales, seed)
        except L.GroupNormError as err:
            raise ValueError(
                f"nf and ch_mult give a layer whose GroupNorm cannot split its channels ({err}); NCSN++ uses "
                f"min(C // 4, 32) groups, so use e.g. nf a multiple of 16; got nf={nf}, ch_mult={ch_mult}"
            ) from None
        if num_classes is not None:
            self.label_embed = LabelEmbedding(num_classes, 4 * nf)

    def _build(self, nonlinearity, dropout, resamp_with_conv, init_scale, fourier_scale, sigma_min, sigma_max,
               num_scales, seed) -> None:
        nf, ch_mult, n_res = self.nf, self.ch_mult, self.num_resolutions
        fir, fir_kernel, skip_rescale = self.fir, self.fir_kernel, self.skip_rescale
        g = torch.Generator().manual_seed(int(seed))
        self.act = act = L.make_act(nonlinearity)
        self.register_buffer("sigmas", sigma_levels(sigma_min, sigma_max, num_scales))
        temb_dim = nf * 4
        modules: list[nn.Module] = []
        if self.embedding_type == "fourier":
            modules.append(L.GaussianFourierProjection(nf, fourier_scale, g))
            embed_dim = 2 * nf
        else:
            embed_dim = nf
        if self.conditional:
            modules += [L.linear(embed_dim, temb_dim, g), L.linear(temb_dim, temb_dim, g)]

        def attn(c):
            return L.AttnBlockpp(c, g, skip_rescale=skip_rescale, init_scale=init_scale)

        def resblock(in_ch, out_ch=None, up=False, down=False):
            if self.resblock_type == "ddpm":
                return L.ResnetBlockDDPMpp(act, in_ch, g, out_ch=out_ch, temb_dim=temb_dim, dropout=dropout,
                                           skip_rescale=skip_rescale, init_scale=init_scale)
            return L.ResnetBlockBigGANpp(act, in_ch, g, out_ch=out_ch, temb_dim=temb_dim, up=up, down=down,
                                         dropout=dropout, fir=fir, fir_kernel=fir_kernel,
                                         skip_rescale=skip_rescale, init_scale=init_scale)

        def gnorm(c):
            return nn.GroupNorm(L.groupnorm_groups(c), c, eps=1e-6)

        C = self.num_channels
        pyramid_in_ch = C
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
                if self.resblock_type == "ddpm":
                    modules.append(L.Downsample(in_ch, g, with_conv=resamp_with_conv, fir=fir, fir_kernel=fir_kernel))
                else:
                    modules.append(resblock(in_ch, down=True))
                if self.progressive_input == "input_skip":
                    modules.append(L.Combine(pyramid_in_ch, in_ch, self.progressive_combine, g))
                    if self.progressive_combine == "cat":
                        in_ch *= 2
                elif self.progressive_input == "residual":
                    modules.append(L.Downsample(pyramid_in_ch, g, out_ch=in_ch, with_conv=True, fir=fir, fir_kernel=fir_kernel))
                    pyramid_in_ch = in_ch
                hs_c.append(in_ch)

        in_ch = hs_c[-1]
        modules += [resblock(in_ch), attn(in_ch), resblock(in_ch)]

        pyramid_ch = 0
        for i_level in reversed(range(n_res)):
            for _ in range(self.num_res_blocks + 1):
                out_ch = nf * ch_mult[i_level]
                modules.append(resblock(in_ch + hs_c.pop(), out_ch))
                in_ch = out_ch
            if self.all_resolutions[i_level] in self.attn_resolutions:
                modules.append(attn(in_ch))
            if self.progressive != "none":
                if i_level == n_res - 1:
                    modules.append(gnorm(in_ch))
                    if self.progressive == "output_skip":
                        modules.append(L.conv3x3(in_ch, C, g, init_scale=init_scale))
                        pyramid_ch = C
                    else:
                        modules.append(L.conv3x3(in_ch, in_ch, g))
                        pyramid_ch = in_ch
                elif self.progressive == "output_skip":
                    modules.append(gnorm(in_ch))
                    modules.append(L.conv3x3(in_ch, C, g, init_scale=init_scale))
                    pyramid_ch = C
                else:
                    modules.append(L.Upsample(pyramid_ch, g, out_ch=in_ch, with_conv=True, fir=fir, fir_kernel=fir_kernel))
                    pyramid_ch = in_ch
            if i_level != 0:
                if self.resblock_type == "ddpm":
                    modules.append(L.Upsample(in_ch, g, with_conv=resamp_with_conv, fir=fir, fir_kernel=fir_kernel))
                else:
                    modules.append(resblock(in_ch, up=True))
        assert not hs_c

        if self.progressive != "output_skip":
            modules.append(gnorm(in_ch))
            modules.append(L.conv3x3(in_ch, C, g, init_scale=init_scale))
        self.all_modules = nn.ModuleList(modules)

    # --- helpers ------------------------------------------------------------------------------
    @classmethod
    def from_config(cls, config, seed: int = 0) -> "NCSNpp":
        """Build from score_sde's ConfigDict: ``config.model.*`` and ``config.data.{image_size, num_channels, centered}``.

        ``embedding_type="fourier"`` needs ``config.training.continuous`` true (as in the reference).
        Errors name the config field (``config.model.progressive must be one of ...``).
        """
        model = lambda name, default=...: _config_field(config, "model", name, default)  # noqa: E731
        name = model("name", "ncsnpp")
        if str(name).lower() != "ncsnpp":
            raise ValueError(f"config.model.name must be 'ncsnpp' for NCSNpp; got {name!r}")
        norm = model("normalization", "GroupNorm")
        if str(norm).lower() != "groupnorm":
            raise ValueError(f"config.model.normalization must be 'GroupNorm' (the only one NCSN++ builds); got {norm!r}")
        kwargs = dict(
            image_size=_config_field(config, "data", "image_size"),
            num_channels=_config_field(config, "data", "num_channels"),
            centered=_config_field(config, "data", "centered"),
        )
        required = ("nf", "ch_mult", "num_res_blocks", "attn_resolutions", "dropout", "resamp_with_conv", "conditional",
                    "fir", "fir_kernel", "skip_rescale", "resblock_type", "progressive", "progressive_input",
                    "progressive_combine", "embedding_type", "init_scale", "scale_by_sigma", "nonlinearity",
                    "sigma_min", "sigma_max", "num_scales")
        for f in required:
            kwargs[f] = model(f)
        for f in ("attention_type", "conv_size", "fourier_scale"):
            v = model(f, None)
            if v is not None:
                kwargs[f] = v
        if str(kwargs["embedding_type"]).lower() == "fourier":
            if "fourier_scale" not in kwargs:
                raise ValueError("config.model.fourier_scale is missing (needed by embedding_type='fourier')")
            if not _config_field(config, "training", "continuous", True):
                raise ValueError("config.model.embedding_type='fourier' needs config.training.continuous=True (as in score_sde)")
        for f in ("ch_mult", "attn_resolutions", "fir_kernel"):
            if isinstance(kwargs[f], (list, tuple)):
                kwargs[f] = tuple(kwargs[f])
        for f in ("sigma_min", "sigma_max", "dropout", "init_scale", "fourier_scale"):
            if f in kwargs and isinstance(kwargs[f], int) and not isinstance(kwargs[f], bool):
                kwargs[f] = float(kwargs[f])
        try:
            return cls(**kwargs, seed=seed)
        except ValueError as err:
            raise _prefix_config_error(err, list(kwargs)) from None

    def extra_repr(self) -> str:
        return (f"image_size={self.image_size}, nf={self.nf}, ch_mult={self.ch_mult}, num_res_blocks={self.num_res_blocks}, "
                f"resblock_type={self.resblock_type!r}, embedding_type={self.embedding_type!r}, "
                f"progressive={self.progressive!r}, progressive_input={self.progressive_input!r}, "
                f"scale_by_sigma={self.scale_by_sigma}")

    def _check_inputs(self, x: torch.Tensor, labels: torch.Tensor, class_labels: Optional[torch.Tensor]) -> None:
        if x.dim() != 4 or x.shape[1] != self.num_channels:
            raise ValueError(f"x must have shape (B, C, H, W) with C = num_channels = {self.num_channels}; got {tuple(x.shape)}")
        if x.shape[2] % self.factor or x.shape[3] % self.factor:
            raise ValueError(f"x's height and width must be divisible by 2^(len(ch_mult)-1) = {self.factor}; got {tuple(x.shape[2:])}")
        if not torch.is_tensor(labels) or labels.shape != (x.shape[0],):
            shape = tuple(labels.shape) if torch.is_tensor(labels) else type(labels).__name__
            raise ValueError(f"labels must have shape (B,) = ({x.shape[0]},); got {shape}")
        check_class_labels(class_labels, self.num_classes, x.shape[0], type(self).__name__)

    # --- forward --------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, labels: torch.Tensor, class_labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Raw network output for images ``x`` ``(B, C, H, W)`` at time inputs ``labels`` ``(B,)`` and classes
        ``class_labels`` ``(B,)`` (``None``: the null class); shape of ``x``."""
        self._check_inputs(x, labels, class_labels)
        mods = iter(self.all_modules)
        nxt = lambda: next(mods)  # noqa: E731
        act = self.act
        if self.embedding_type == "fourier":
            used_sigmas = labels
            temb = nxt()(torch.log(labels.to(x.dtype)))
        else:
            used_sigmas = None
            temb = L.timestep_embedding(labels, self.nf, dtype=x.dtype)
        if self.conditional:
            temb = nxt()(temb)
            temb = nxt()(act(temb))
            if self.num_classes is not None:
                temb = temb + self.label_embed(class_labels, x.shape[0])
        else:
            temb = None
        if not self.centered:
            x = 2 * x - 1.0

        input_pyramid = x if self.progressive_input != "none" else None
        hs = [nxt()(x)]
        n_res = self.num_resolutions
        for i_level in range(n_res):
            attn_here = self.all_resolutions[i_level] in self.attn_resolutions
            for _ in range(self.num_res_blocks):
                h = nxt()(hs[-1], temb)
                if attn_here:
                    h = nxt()(h)
                hs.append(h)
            if i_level != n_res - 1:
                h = nxt()(hs[-1]) if self.resblock_type == "ddpm" else nxt()(hs[-1], temb)
                if self.progressive_input == "input_skip":
                    input_pyramid = _fir.downsample_2d(input_pyramid, self.fir_kernel) if self.fir else self._pool(input_pyramid)
                    h = nxt()(input_pyramid, h)
                elif self.progressive_input == "residual":
                    input_pyramid = nxt()(input_pyramid)
                    input_pyramid = (input_pyramid + h) / L.SQRT2 if self.skip_rescale else input_pyramid + h
                    h = input_pyramid
                hs.append(h)

        h = hs[-1]
        h = nxt()(h, temb)
        h = nxt()(h)
        h = nxt()(h, temb)

        pyramid = None
        for i_level in reversed(range(n_res)):
            for _ in range(self.num_res_blocks + 1):
                h = nxt()(torch.cat([h, hs.pop()], dim=1), temb)
            if self.all_resolutions[i_level] in self.attn_resolutions:
                h = nxt()(h)
            if self.progressive != "none":
                if i_level == n_res - 1:
                    pyramid = act(nxt()(h))
                    pyramid = nxt()(pyramid)
                elif self.progressive == "output_skip":
                    pyramid = _fir.upsample_2d(pyramid, self.fir_kernel) if self.fir else self._nearest(pyramid)
                    pyramid_h = act(nxt()(h))
                    pyramid = pyramid + nxt()(pyramid_h)
                else:
                    pyramid = nxt()(pyramid)
                    pyramid = (pyramid + h) / L.SQRT2 if self.skip_rescale else pyramid + h
                    h = pyramid
            if i_level != 0:
                h = nxt()(h) if self.resblock_type == "ddpm" else nxt()(h, temb)
        assert not hs

        if self.progressive == "output_skip":
            h = pyramid
        else:
            h = act(nxt()(h))
            h = nxt()(h)
        if next(mods, None) is not None:  # pragma: no cover - structural invariant
            raise RuntimeError("NCSNpp.forward did not use every module")

        if self.scale_by_sigma:
            if used_sigmas is None:
                used_sigmas = self.sigmas[labels.long()]
            h = h / used_sigmas.to(h.dtype).reshape(-1, *([1] * (h.dim() - 1)))
        return h

    # parameter-free pyramid resamplers (the reference's self.pyramid_upsample / pyramid_downsample)
    @staticmethod
    def _nearest(x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.interpolate(x, scale_factor=2.0, mode="nearest")

    @staticmethod
    def _pool(x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.avg_pool2d(torch.nn.functional.pad(x, (0, 1, 0, 1)), 2, stride=2)
