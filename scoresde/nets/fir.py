"""FIR up- and down-sampling of images in plain PyTorch (StyleGAN2's ``upfirdn2d``, no CUDA extension).

``upfirdn2d(x, k, up, down, pad)`` is, per channel and along each spatial axis,

    u[n] = x[n / up] if n % up == 0 else 0              (zero insertion, length H up)
    v    = u padded with pad[0] zeros before, pad[1] after (negative pads crop)
    w[o] = sum_j v[o + j] k[K - 1 - j]                   (true convolution with the K x K kernel k)
    y    = w[::down]

so ``H_out = (H up + pad[0] + pad[1] - K) // down + 1``. The resampling helpers below are the
special cases used by NCSN++ (score_sde's ``up_or_down_sampling``): a 1-d FIR kernel ``k`` becomes
``outer(k, k) / sum(k)^2`` (unit DC gain; times ``factor^2`` when upsampling, which keeps a constant
image constant), and the padding centres the filter so that ``H_out = H factor`` or ``H / factor``.

The common cases run as one depthwise ``conv2d`` (down) or ``conv_transpose2d`` (up) with the fixed
kernel; ``upfirdn2d`` itself is the direct (slower, fully general) definition and the tests check the
fast paths against it. Kernels follow the input's dtype and device.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "setup_kernel",
    "upfirdn2d",
    "upsample_2d",
    "downsample_2d",
    "upsample_conv_2d",
    "conv_downsample_2d",
    "naive_upsample_2d",
    "naive_downsample_2d",
]


def setup_kernel(k: Sequence[float] | torch.Tensor, dtype=None, device=None) -> torch.Tensor:
    """The normalised 2-d FIR kernel: ``outer(k, k) / sum(outer(k, k))`` for a 1-d ``k`` (a 2-d ``k`` is only normalised).

    ``k``: a non-empty 1-d sequence (separable filter) or a square 2-d array of finite numbers with a
    nonzero sum. Returns a ``(K, K)`` tensor summing to 1. Raises ``ValueError`` otherwise.
    """
    kt = torch.as_tensor(k, dtype=torch.float64)
    if kt.dim() == 1:
        kt = torch.outer(kt, kt)
    if kt.dim() != 2 or kt.shape[0] != kt.shape[1] or kt.numel() == 0:
        raise ValueError(f"fir_kernel must be a non-empty 1-d sequence or a square 2-d array; got shape {tuple(kt.shape)}")
    total = kt.sum()
    if not torch.isfinite(kt).all() or total == 0:
        raise ValueError(f"fir_kernel must hold finite numbers with a nonzero sum; got {k!r}")
    return (kt / total).to(dtype=dtype or torch.get_default_dtype(), device=device)


def _check_factor(factor) -> int:
    if isinstance(factor, bool) or not isinstance(factor, int) or factor < 1:
        raise ValueError(f"factor must be an integer >= 1; got {factor!r}")
    return factor


def _depthwise(k: torch.Tensor, channels: int) -> torch.Tensor:
    """``(K, K)`` kernel -> ``(C, 1, K, K)`` weight of a depthwise convolution."""
    return k[None, None].expand(channels, 1, *k.shape)


def upfirdn2d(x: torch.Tensor, k: torch.Tensor, up: int = 1, down: int = 1, pad: tuple[int, int] = (0, 0)) -> torch.Tensor:
    """Upsample by zero insertion, pad, convolve with ``k``, downsample (the module docstring's definition).

    ``x``: ``(B, C, H, W)``; ``k``: ``(K, K)``; ``pad = (before, after)`` for both axes (negative crops).
    Returns ``(B, C, (H up + pad[0] + pad[1] - K) // down + 1, ...)``. Direct, unfused implementation.
    """
    up, down = _check_factor(up), _check_factor(down)
    B, C, H, W = x.shape
    if up > 1:
        u = x.new_zeros(B, C, H, up, W, up)
        u[:, :, :, 0, :, 0] = x
        x = u.reshape(B, C, H * up, W * up)
    p0, p1 = pad
    x = F.pad(x, (max(p0, 0), max(p1, 0), max(p0, 0), max(p1, 0)))
    if p0 < 0 or p1 < 0:
        Hp, Wp = x.shape[2:]
        x = x[:, :, max(-p0, 0) : Hp - max(-p1, 0), max(-p0, 0) : Wp - max(-p1, 0)]
    kf = torch.flip(k, (0, 1)).to(x)
    y = F.conv2d(x, _depthwise(kf, C), groups=C)
    return y[:, :, ::down, ::down]


def _fir_down(x: torch.Tensor, k: torch.Tensor, down: int, p0: int, p1: int) -> torch.Tensor:
    """``upfirdn2d(x, k, down=down, pad=(p0, p1))`` as one strided depthwise conv2d."""
    C = x.shape[1]
    kf = torch.flip(k, (0, 1)).to(x)
    if p0 == p1 and p0 >= 0:
        return F.conv2d(x, _depthwise(kf, C), stride=down, padding=p0, groups=C)
    if p0 < 0 or p1 < 0:
        return upfirdn2d(x, k, down=down, pad=(p0, p1))
    return F.conv2d(F.pad(x, (p0, p1, p0, p1)), _depthwise(kf, C), stride=down, groups=C)


def _fir_up(x: torch.Tensor, k: torch.Tensor, up: int, p0: int, p1: int) -> torch.Tensor:
    """``upfirdn2d(x, k, up=up, pad=(p0, p1))`` as one depthwise conv_transpose2d.

    Zero insertion followed by a true convolution is a transposed convolution with the unflipped
    kernel: ``y[o] = sum_i x[i] k[o + P - up i]`` with ``P = K - 1 - p0`` and output padding
    ``up + p1 - p0 - 1``; falls back to ``upfirdn2d`` where these leave conv_transpose2d's range.
    """
    C = x.shape[1]
    K = k.shape[0]
    P = K - 1 - p0
    out_pad = up + p1 - p0 - 1
    if P < 0 or not 0 <= out_pad < up:
        return upfirdn2d(x, k, up=up, pad=(p0, p1))
    return F.conv_transpose2d(x, _depthwise(k.to(x), C), stride=up, padding=P, output_padding=out_pad, groups=C)


def upsample_2d(x: torch.Tensor, k: Sequence[float] = (1, 3, 3, 1), factor: int = 2) -> torch.Tensor:
    """FIR upsampling ``(B, C, H, W) -> (B, C, H factor, W factor)``.

    ``upfirdn2d(x, factor^2 setup_kernel(k), up=factor, pad=((p+1)//2 + factor - 1, p//2))`` with
    ``p = K - factor``; a constant image stays constant away from the border.
    """
    factor = _check_factor(factor)
    kk = setup_kernel(k, dtype=x.dtype, device=x.device) * factor**2
    p = kk.shape[0] - factor
    return _fir_up(x, kk, factor, (p + 1) // 2 + factor - 1, p // 2)


def downsample_2d(x: torch.Tensor, k: Sequence[float] = (1, 3, 3, 1), factor: int = 2) -> torch.Tensor:
    """FIR downsampling ``(B, C, H, W) -> (B, C, H / factor, W / factor)``.

    ``upfirdn2d(x, setup_kernel(k), down=factor, pad=((p+1)//2, p//2))`` with ``p = K - factor``;
    ``k = (1, 1)`` is 2x2 average pooling.
    """
    factor = _check_factor(factor)
    kk = setup_kernel(k, dtype=x.dtype, device=x.device)
    p = kk.shape[0] - factor
    return _fir_down(x, kk, factor, (p + 1) // 2, p // 2)


def upsample_conv_2d(x: torch.Tensor, w: torch.Tensor, k: Sequence[float] = (1, 3, 3, 1), factor: int = 2) -> torch.Tensor:
    """Upsample by ``factor`` and convolve with ``w`` ``(C_out, C_in, kh, kw)`` (odd, square) in one pass.

    A stride-``factor`` transposed convolution with the spatially flipped, in/out-swapped ``w``
    (``(B, C_in, H, W) -> (B, C_out, (H-1) factor + kh, ...)``), then
    ``upfirdn2d(., factor^2 setup_kernel(k), pad=((p+1)//2 + factor - 1, p//2 + 1))`` with
    ``p = K - factor - (kw - 1)``. Returns ``(B, C_out, H factor, W factor)``; no bias.
    """
    factor = _check_factor(factor)
    c_out, c_in, kh, kw = w.shape
    if kh != kw:
        raise ValueError(f"upsample_conv_2d needs a square kernel; got {kh}x{kw}")
    kk = setup_kernel(k, dtype=x.dtype, device=x.device) * factor**2
    p = (kk.shape[0] - factor) - (kw - 1)
    wt = torch.flip(w, (2, 3)).transpose(0, 1)  # (C_in, C_out, kh, kw)
    y = F.conv_transpose2d(x, wt, stride=factor)
    return _fir_down(y, kk, 1, (p + 1) // 2 + factor - 1, p // 2 + 1)


def conv_downsample_2d(x: torch.Tensor, w: torch.Tensor, k: Sequence[float] = (1, 3, 3, 1), factor: int = 2) -> torch.Tensor:
    """FIR-filter, then convolve with ``w`` ``(C_out, C_in, kh, kw)`` at stride ``factor``.

    ``conv2d(upfirdn2d(x, setup_kernel(k), pad=((p+1)//2, p//2)), w, stride=factor)`` with
    ``p = K - factor + kw - 1``: ``(B, C_in, H, W) -> (B, C_out, H / factor, W / factor)``; no bias.
    """
    factor = _check_factor(factor)
    kw = w.shape[-1]
    kk = setup_kernel(k, dtype=x.dtype, device=x.device)
    p = (kk.shape[0] - factor) + (kw - 1)
    return F.conv2d(_fir_down(x, kk, 1, (p + 1) // 2, p // 2), w, stride=factor)


def naive_upsample_2d(x: torch.Tensor, factor: int = 2) -> torch.Tensor:
    """Nearest-neighbour upsampling: every pixel repeated ``factor x factor`` times; ``(B, C, H, W) -> (B, C, H f, W f)``."""
    factor = _check_factor(factor)
    return F.interpolate(x, scale_factor=float(factor), mode="nearest")


def naive_downsample_2d(x: torch.Tensor, factor: int = 2) -> torch.Tensor:
    """Mean over non-overlapping ``factor x factor`` blocks; ``(B, C, H, W) -> (B, C, H / f, W / f)``."""
    factor = _check_factor(factor)
    return F.avg_pool2d(x, factor, stride=factor)
