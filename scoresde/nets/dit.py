"""DiT: a diffusion transformer score network (Peebles & Xie 2023, "Scalable Diffusion Models with Transformers").

Layout (``p`` the patch size, ``N = (H / p)(W / p)`` tokens of width ``d = hidden_size``)::

    x (B, C, H, W) -> patchify -> (B, N, p p C) -> Linear -> + pos (fixed 2-D sin-cos) -> tokens h (B, N, d)
    c = temb(t_in) [+ y_emb(class)]                                     (B, d)
    depth x DiTBlock(h, c)   (adaLN-Zero)
    FinalLayer(h, c) -> (B, N, p p C) -> unpatchify -> (B, C, H, W)

DiTBlock with adaptive LayerNorm, its six modulations regressed from ``c``::

    (shift1, scale1, gate1, shift2, scale2, gate2) = Linear(SiLU(c))
    h = h + gate1 * Attn(LN(h) (1 + scale1) + shift1)
    h = h + gate2 * MLP(LN(h) (1 + scale2) + shift2)

(``LN`` without affine parameters). **adaLN-Zero**: the modulation Linear of every block and of the final layer,
and the final projection, start at exactly zero, so every block starts as the identity and the network's output
is exactly 0 at initialisation. Time: ``temb = Linear(SiLU(Linear(emb(t_in))))``, ``emb`` sinusoidal (for
``t_in = 999 t``, VP / sub-VP) or Gaussian Fourier of ``log t_in`` (for ``t_in = sigma``, VE). Class
conditioning (``num_classes`` set): a table of ``num_classes + 1`` embeddings whose last row is the *null class*
(classifier-free guidance: ``class_labels=None`` or the label ``num_classes`` means unconditional).

Initialisation (seeded, ``layers.dense``): Xavier-uniform Linear weights (``variance_scaling_`` with scale 1,
fan_avg, uniform, is exactly ``xavier_uniform_``), zero biases; class table ``N(0, 0.02^2)`` as DiT.
Sizes: ``PRESETS`` (``dit_tiny`` for 8x8 digits on a CPU, the paper's DiT-S/2 and DiT-B/2).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn
from torch.nn import functional as F

from .layers import LabelEmbedding, _check_dim, check_class_labels, dense, make_time_embedding
from .mlp import _check_dropout

__all__ = ["DiT", "PRESETS", "patchify", "unpatchify", "sincos_pos_embed_2d"]

TIME_EMBEDDINGS = ("sinusoidal", "fourier")

# named sizes (the configs model=dit_tiny / dit_s / dit_b set exactly these fields; a test keeps them equal)
PRESETS = {
    "dit_tiny": dict(patch_size=2, hidden_size=96, depth=4, num_heads=4),   # 8x8 digits: 16 tokens, 707k parameters
    "dit_s": dict(patch_size=2, hidden_size=384, depth=12, num_heads=6),    # DiT-S/2: 32.9M at 32x32x4 with 1000 classes (paper: 33.0M)
    "dit_b": dict(patch_size=2, hidden_size=768, depth=12, num_heads=12),   # DiT-B/2: 130.7M at 32x32x4 with 1000 classes (paper: 130M)
}


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """``(B, C, H, W) -> (B, N, p p C)``, ``N = (H/p)(W/p)`` tokens in row-major order; token ``(i, j)`` holds the
    pixels ``x[:, c, i p + a, j p + b]`` at index ``(a p + b) C + c`` (DiT's ``unpatchify`` layout)."""
    B, C, H, W = x.shape
    h, w = H // p, W // p
    x = x.reshape(B, C, h, p, w, p).permute(0, 2, 4, 3, 5, 1)  # (B, h, w, p, p, C)
    return x.reshape(B, h * w, p * p * C)


def unpatchify(tokens: torch.Tensor, p: int, C: int, h: int, w: int) -> torch.Tensor:
    """The inverse of ``patchify``: ``(B, h w, p p C) -> (B, C, h p, w p)``."""
    B = tokens.shape[0]
    x = tokens.reshape(B, h, w, p, p, C).permute(0, 5, 1, 3, 2, 4)  # (B, C, h, p, w, p)
    return x.reshape(B, C, h * p, w * p)


def sincos_pos_embed_2d(d: int, h: int, w: int) -> torch.Tensor:
    """Fixed 2-D sin-cos position embedding ``(h w, d)`` (MAE / DiT): half the channels encode the row, half
    the column, each as ``[sin(pos w_k), cos(pos w_k)]`` with ``w_k = 10000^(-k / (d/4))``, ``k < d/4``.
    Needs ``d`` divisible by 4. Computed in float64."""
    k = torch.arange(d // 4, dtype=torch.float64)
    omega = 1.0 / 10000 ** (k / (d // 4))

    def emb(pos):
        a = pos.reshape(-1, 1).double() * omega[None, :]
        return torch.cat([torch.sin(a), torch.cos(a)], dim=1)  # (n, d/2)

    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    return torch.cat([emb(rows), emb(cols)], dim=1)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x (1 + scale) + shift`` with per-sample ``shift, scale (B, d)`` broadcast over the tokens of ``x (B, N, d)``."""
    return x * (1 + scale[:, None, :]) + shift[:, None, :]


class _Attention(nn.Module):
    """Multi-head self-attention over the tokens: ``(B, N, d) -> (B, N, d)``."""

    def __init__(self, d: int, num_heads: int, g: torch.Generator):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = dense(d, 3 * d, g)
        self.proj = dense(d, d, g)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, d = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        h = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # (B, heads, N, d / heads)
        return self.proj(h.transpose(1, 2).reshape(B, N, d))


class DiTBlock(nn.Module):
    """A transformer block with adaLN-Zero conditioning (module docstring): ``h (B, N, d), c (B, d) -> (B, N, d)``."""

    def __init__(self, d: int, num_heads: int, mlp_ratio: float, dropout: float, g: torch.Generator):
        super().__init__()
        hidden = int(d * mlp_ratio)
        self.norm1 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.attn = _Attention(d, num_heads, g)
        self.norm2 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(dense(d, hidden, g), nn.GELU(approximate="tanh"),
                                 nn.Dropout(dropout) if dropout > 0 else nn.Identity(), dense(hidden, d, g))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), dense(d, 6 * d, g, scale=0.0))

    def forward(self, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).chunk(6, dim=1)
        h = h + gate1[:, None, :] * self.attn(modulate(self.norm1(h), shift1, scale1))
        return h + gate2[:, None, :] * self.mlp(modulate(self.norm2(h), shift2, scale2))


class FinalLayer(nn.Module):
    """``LN(h) (1 + scale) + shift -> Linear -> (B, N, p p C)`` with ``(shift, scale) = Linear(SiLU(c))``; both
    Linear layers start at zero (adaLN-Zero)."""

    def __init__(self, d: int, out_features: int, g: torch.Generator):
        super().__init__()
        self.norm = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), dense(d, 2 * d, g, scale=0.0))
        self.linear = dense(d, out_features, g, scale=0.0)

    def forward(self, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm(h), shift, scale))


def _check_number(name: str, value, low: float, low_open: bool = True) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < low or (low_open and value == low):
        rel = ">" if low_open else ">="
        raise ValueError(f"{name} must be a finite number {rel} {low}; got {value!r}")
    return float(value)


class DiT(nn.Module):
    """Diffusion transformer ``f(x, t_in)`` for images (layout and adaLN-Zero in the module docstring).

    Args:
        in_channels: image channels ``C`` (input and output).
        image_size: side ``H = W``; must be divisible by ``patch_size``. Inputs must have this size (the position
            embedding is fixed to its ``(H/p)^2`` tokens).
        patch_size: side ``p`` of the square patches (tokens).
        hidden_size: token width ``d``; divisible by ``num_heads`` and by 4 (2-D sin-cos position embedding).
        depth: number of DiT blocks.
        num_heads: attention heads.
        mlp_ratio: MLP hidden width ``mlp_ratio * d``.
        dropout: dropout inside the MLPs, in [0, 1) (torch's global random state in training mode).
        num_classes: ``None`` (unconditional) or the number of classes; the class table then has one extra
            row, the null class (label ``num_classes``), used when ``class_labels`` is ``None``.
        time_embedding: ``"sinusoidal"`` (for ``t_in = 999 t``) or ``"fourier"`` (embeds ``log t_in``; ``t_in = sigma``).
        fourier_scale: std of the Fourier frequencies (``time_embedding="fourier"`` only).
        seed: weights are drawn from ``torch.Generator().manual_seed(seed)``.

    ``forward(x (B, C, H, W), t_in (B,), class_labels (B,) long or None) -> (B, C, H, W)``.
    Presets: ``PRESETS`` (``dit_tiny`` 8x8 digits; DiT-S/2, DiT-B/2). Parameters at 1x8x8: dit_tiny 707,428.
    """

    def __init__(
        self,
        in_channels: int = 1,
        image_size: int = 8,
        patch_size: int = 2,
        hidden_size: int = 96,
        depth: int = 4,
        num_heads: int = 4,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        num_classes: Optional[int] = None,
        time_embedding: str = "sinusoidal",
        fourier_scale: float = 16.0,
        seed: int = 0,
    ):
        super().__init__()
        self.in_channels = _check_dim("in_channels", in_channels)
        self.image_size = _check_dim("image_size", image_size)
        self.patch_size = _check_dim("patch_size", patch_size)
        if image_size % patch_size:
            raise ValueError(f"image_size must be divisible by patch_size = {patch_size}; got {image_size}")
        d = _check_dim("hidden_size", hidden_size)
        _check_dim("depth", depth)
        _check_dim("num_heads", num_heads)
        if d % num_heads or d % 4:
            raise ValueError(f"hidden_size must be divisible by num_heads = {num_heads} and by 4; got {hidden_size}")
        mlp_ratio = _check_number("mlp_ratio", mlp_ratio, 0.0)
        if int(d * mlp_ratio) < 1:
            raise ValueError(f"mlp_ratio * hidden_size must be >= 1; got {mlp_ratio} * {d}")
        dropout = _check_dropout(dropout)
        if num_classes is not None:
            _check_dim("num_classes", num_classes)
        self.num_classes = num_classes
        if time_embedding not in TIME_EMBEDDINGS:
            raise ValueError(f"time_embedding must be one of {TIME_EMBEDDINGS}; got {time_embedding!r}")
        fourier_scale = _check_number("fourier_scale", fourier_scale, 0.0)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an integer; got {seed!r}")
        g = torch.Generator().manual_seed(int(seed))
        p, C = patch_size, in_channels
        self.grid = image_size // p
        self.x_embedder = dense(p * p * C, d, g)
        self.register_buffer("pos_embed", sincos_pos_embed_2d(d, self.grid, self.grid).float(), persistent=False)
        self.t_embed = make_time_embedding(time_embedding, d, fourier_scale, seed)
        self.t_mlp = nn.Sequential(dense(d, d, g), nn.SiLU(), dense(d, d, g))
        if num_classes is not None:
            self.y_embedder = LabelEmbedding(num_classes, d, g, std=0.02)
        self.blocks = nn.ModuleList(DiTBlock(d, num_heads, mlp_ratio, dropout, g) for _ in range(depth))
        self.final_layer = FinalLayer(d, p * p * C, g)

    def _check_inputs(self, x: torch.Tensor, t_in: torch.Tensor, class_labels) -> None:
        s = self.image_size
        if x.dim() != 4 or x.shape[1] != self.in_channels or x.shape[2] != s or x.shape[3] != s:
            raise ValueError(f"x must have shape (B, C, H, W) = (B, {self.in_channels}, {s}, {s}); got {tuple(x.shape)}")
        if not torch.is_tensor(t_in) or t_in.shape != (x.shape[0],):
            shape = tuple(t_in.shape) if torch.is_tensor(t_in) else type(t_in).__name__
            raise ValueError(f"t_in must have shape (B,) = ({x.shape[0]},); got {shape}")
        check_class_labels(class_labels, self.num_classes, x.shape[0], "DiT")

    def condition(self, t_in: torch.Tensor, class_labels: Optional[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        """``c = temb(t_in) [+ y_emb(class_labels or the null class)]``: ``(B,) -> (B, d)``."""
        c = self.t_mlp(self.t_embed(t_in.to(dtype)))
        if self.num_classes is not None:
            c = c + self.y_embedder(class_labels, t_in.shape[0])
        return c

    def forward(self, x: torch.Tensor, t_in: torch.Tensor, class_labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        if not torch.jit.is_tracing() and not torch.compiler.is_compiling():
            self._check_inputs(x, t_in, class_labels)
        p = self.patch_size
        h = self.x_embedder(patchify(x, p)) + self.pos_embed.to(x.dtype)
        c = self.condition(t_in, class_labels, x.dtype)
        for block in self.blocks:
            h = block(h, c)
        return unpatchify(self.final_layer(h, c), p, self.in_channels, self.grid, self.grid)
